"""Pooling functions against NumPy references, and every layer through the shared checks."""

import numpy as np
import pytest
import tensorflow as tf

from remap_tf import layers, ops
from remap_tf.regions import relative_regions, scale_regions
from tests.layer_test_case import run_layer_test


def numpy_region_max_pool(features, regions, normalize=True):
    """Reference: max over each region's cells, then L2 per region."""
    pooled = np.stack(
        [features[:, t:b, x0:x1, :].max(axis=(1, 2)) for t, x0, b, x1 in regions], axis=1
    )
    if normalize:
        pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled


def test_region_max_pool_on_a_hand_readable_map():
    """A 4x4 map with values 0..15 (row-major), one channel, the grid of a 4x4 map with L=2:
    scale 1 is the whole map (max 15); scale 2 has side floor(8/3)=2 at starts 0 and 2, so
    the four quadrants have maxima 5, 7, 13, 15."""
    features = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    rel = relative_regions(2, (4, 4))
    pooled = ops.region_max_pool(features, rel, normalize=False)
    np.testing.assert_array_equal(np.asarray(pooled)[0, :, 0], [15, 5, 7, 13, 15])


@pytest.mark.parametrize("shape", [(2, 24, 32, 8), (3, 7, 5, 4), (1, 1, 1, 3), (2, 2, 9, 6)])
def test_region_max_pool_equals_numpy_static_and_dynamic(shape):
    rng = np.random.default_rng(0)
    features = rng.normal(size=shape).astype(np.float32)
    rel = relative_regions(4, (24, 32))
    expected = numpy_region_max_pool(features, scale_regions(rel, shape[1], shape[2]))

    static = ops.region_max_pool(tf.constant(features), rel)
    np.testing.assert_allclose(np.asarray(static), expected, rtol=1e-5, atol=1e-6)

    dynamic_fn = tf.function(
        lambda x: ops.region_max_pool(x, rel),
        input_signature=[tf.TensorSpec([None, None, None, shape[-1]], tf.float32)],
    )
    np.testing.assert_allclose(np.asarray(dynamic_fn(features)), expected, rtol=1e-5, atol=1e-6)


def numpy_region_gem_pool(features, regions, p):
    """Reference: (mean over each region's cells of x^p)^(1/p), then L2 per region."""
    pooled = np.stack(
        [
            (features[:, t:b, x0:x1, :] ** p).mean(axis=(1, 2)) ** (1 / p)
            for t, x0, b, x1 in regions
        ],
        axis=1,
    )
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_region_gem_pool_limiting_cases_on_a_hand_readable_map():
    """The 4x4 map 0..15 of the max test, L=2 (whole map + four 2x2 quadrants).

    p=1 is regional average pooling: whole map mean 7.5; quadrants [0,1,4,5] -> 2.5,
    [2,3,6,7] -> 4.5, [8,9,12,13] -> 10.5, [10,11,14,15] -> 12.5 (zero clipped to 1e-6,
    which moves the first mean by 2.5e-7). p=20 lies between the mean and the max
    (15, 5, 7, 13, 15), nearer the max: e.g. the quadrant 8, 9, 12, 13 gives about 12.2.
    """
    features = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    rel = relative_regions(2, (4, 4))
    mean = np.array([7.5, 2.5, 4.5, 10.5, 12.5])
    average = ops.region_gem_pool(features, rel, 1.0, normalize=False)
    np.testing.assert_allclose(np.asarray(average)[0, :, 0], mean, 1e-5)
    high = np.asarray(ops.region_gem_pool(features, rel, 20.0, normalize=False))[0, :, 0]
    maxima = np.asarray(ops.region_max_pool(features, rel, normalize=False))[0, :, 0]
    np.testing.assert_array_equal(maxima, [15, 5, 7, 13, 15])
    assert np.all(high > mean) and np.all(high <= maxima + 1e-4)
    assert np.all(maxima - high < high - mean)


@pytest.mark.parametrize("shape", [(2, 24, 32, 8), (3, 7, 5, 4), (1, 1, 1, 3)])
def test_region_gem_pool_equals_numpy_with_unit_regions(shape):
    """Static and dynamic shapes match NumPy; every region vector has unit L2 norm."""
    rng = np.random.default_rng(3)
    features = rng.uniform(0.01, 2.0, size=shape).astype(np.float32)
    rel = relative_regions(4, (24, 32))
    expected = numpy_region_gem_pool(features, scale_regions(rel, shape[1], shape[2]), 3.0)
    static = np.asarray(ops.region_gem_pool(tf.constant(features), rel, 3.0))
    np.testing.assert_allclose(static, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(static, axis=-1), 1.0, rtol=1e-5)
    dynamic_fn = tf.function(
        lambda x: ops.region_gem_pool(x, rel, 3.0),
        input_signature=[tf.TensorSpec([None, None, None, shape[-1]], tf.float32)],
    )
    np.testing.assert_allclose(np.asarray(dynamic_fn(features)), expected, rtol=1e-4, atol=1e-6)


def test_region_gem_layer_p_gets_a_gradient_and_stays_at_least_one():
    """The exponent is a trained float32 weight: a loss on the regions moves it, and the
    constraint puts a value below 1 back at 1."""
    layer = layers.RegionGeMPooling(levels=2, grid_shape=(4, 4))
    rng = np.random.default_rng(4)
    features = tf.constant(rng.uniform(0.1, 1.0, size=(2, 4, 4, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        regions = layer(features)
        loss = tf.reduce_sum(regions[:, :, 0])
    (gradient,) = tape.gradient(loss, [layer.gem_p])
    assert layer.gem_p.dtype == "float32" and float(layer.gem_p.numpy()) == 3.0
    assert gradient is not None and np.isfinite(gradient) and abs(float(gradient)) > 0
    assert layer.gem_p.constraint(tf.constant(0.5)).numpy() == 1.0
    with pytest.raises(ValueError, match="'x'"):
        layers.RegionGeMPooling(p="x")


def test_gem_limiting_cases():
    """GeM with p=1 is average pooling; with a large p it approaches max pooling."""
    rng = np.random.default_rng(1)
    features = rng.uniform(0.1, 1.0, size=(2, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(ops.gem(features, 1.0)), features.mean(axis=(1, 2)), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(ops.gem(features, 200.0)), features.max(axis=(1, 2)), rtol=2e-2
    )
    np.testing.assert_allclose(np.asarray(ops.mac(features)), features.max(axis=(1, 2)))
    np.testing.assert_allclose(
        np.asarray(ops.spoc(features)), features.mean(axis=(1, 2)), rtol=1e-6
    )


def test_weighted_region_sum_and_l2_in_float32_under_float16():
    regions = np.full((1, 3, 4), 300.0, dtype=np.float16)  # sum of squares overflows fp16
    out = ops.l2_normalize(tf.constant(regions))
    assert out.dtype == tf.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), 0.5, rtol=1e-3)
    summed = ops.weighted_region_sum(tf.constant(regions), [1.0, 0.0, 2.0])
    np.testing.assert_allclose(np.asarray(summed, np.float32), 900.0, rtol=1e-3)


def test_rank_is_checked_with_the_shape_in_the_message():
    with pytest.raises(ValueError, match=r"rank 4.*\(2, 3, 4\)"):
        ops.region_max_pool(tf.zeros((2, 3, 4)), relative_regions(1, (2, 2)))


LAYER_CASES = [
    (
        layers.RegionMaxPooling,
        {"levels": 3, "grid_shape": (6, 8), "normalize": True},
        (2, 6, 8, 4),
        (2, 20, 4),
        (0.0, 1.0),
        0,
    ),
    (
        layers.RegionWeighting,
        {"num_regions": 5, "normalize": True},
        (2, 5, 3),
        (2, 3),
        (0.0, 1.0),
        1,
    ),
    (
        layers.RegionGeMPooling,
        {"levels": 2, "grid_shape": (4, 4), "normalize": True, "p": 3.0, "trainable_p": True},
        (2, 4, 4, 3),
        (2, 5, 3),
        (0.0, 1.0),
        1,
    ),
    (layers.MACPooling, {}, (2, 5, 4, 3), (2, 3), (0.0, 1.0), 0),
    (layers.SPoCPooling, {}, (2, 5, 4, 3), (2, 3), (0.0, 1.0), 0),
    (
        layers.GeMPooling,
        {"p": 3.0, "trainable_p": True, "epsilon": 1e-6},
        (2, 5, 4, 3),
        (2, 3),
        (0.0, 1.0),
        1,
    ),
    (layers.L2Normalization, {"axis": -1}, (2, 7), (2, 7), (0.0, 1.0), 0),
    (layers.Whitening, {"units": 4}, (2, 6), (2, 4), (0.0, 1.0), 2),
    (layers.ImagePreprocessing, {"mode": "caffe"}, (2, 8, 8, 3), (2, 8, 8, 3), (0.0, 255.0), 0),
]


@pytest.mark.parametrize(
    "cls, kwargs, in_shape, out_shape, value_range, n_trainable",
    LAYER_CASES,
    ids=[case[0].__name__ for case in LAYER_CASES],
)
def test_layer_contract(cls, kwargs, in_shape, out_shape, value_range, n_trainable, tmp_path):
    run_layer_test(cls, kwargs, in_shape, out_shape, tmp_path, value_range, n_trainable)


@pytest.mark.parametrize("mode", layers.PREPROCESSING_MODES)
def test_preprocessing_matches_keras_applications(mode):
    import keras

    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, size=(2, 4, 5, 3)).astype(np.float32)
    ours = np.asarray(layers.ImagePreprocessing(mode)(images))
    if mode == "none":
        expected = images
    else:
        expected = keras.applications.imagenet_utils.preprocess_input(images.copy(), mode=mode)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


def test_whitening_set_and_shape_check():
    layer = layers.Whitening(2)
    layer.build((None, 3))
    kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
    layer.set_whitening(kernel, [1.0, -1.0])
    np.testing.assert_allclose(np.asarray(layer(np.ones((1, 3), np.float32))), [[7, 8]])
    with pytest.raises(ValueError, match=r"expected kernel \(3, 2\).*\(2, 3\)"):
        layer.set_whitening(kernel.T, [0.0, 0.0])


def test_layer_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="'bgr'"):
        layers.ImagePreprocessing("bgr")
    with pytest.raises(ValueError, match="levels.*0"):
        layers.RegionMaxPooling(levels=0)
    with pytest.raises(ValueError, match="-1"):
        layers.GeMPooling(p=-1)
    with pytest.raises(ValueError, match="expects 5 regions"):
        layers.RegionWeighting(5)(np.zeros((1, 4, 3), np.float32))
