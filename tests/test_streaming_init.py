"""KL region weights and whitening from streams: the same results as in memory on small
inputs, bounded memory on 20k rows (measured with tracemalloc while a generator makes the
batches lazily), and the model-based initialisations on a tf.data.Dataset of mixed sizes."""

import tracemalloc

import numpy as np
import pytest
import tensorflow as tf

import remap_tf
from remap_tf.errors import InvalidInputError
from remap_tf.pairs import sample_pairs
from remap_tf.region_weights import kl_divergence_per_region, kl_region_weights_from_stream
from remap_tf.whitening import (
    learned_whitening,
    learned_whitening_from_stream,
    pca_whitening,
    pca_whitening_from_stream,
)

MB = 1 << 20


def traced_peak(function, *args, **kwargs):
    """``(result, peak bytes)`` of NumPy and Python allocations during the call."""
    tracemalloc.start()
    try:
        return function(*args, **kwargs), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def region_stream(num_rows, batch, centres, noise, seed=0):
    """Lazy ``(region_vectors (b, R, C) float32, labels (b,))`` batches: a class's centre
    plus noise whose scale grows with the region, so early regions separate classes best."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_rows, batch):
        labels = rng.integers(0, len(centres), size=min(batch, num_rows - start))
        vectors = rng.standard_normal((len(labels), *centres.shape[1:]), dtype=np.float32)
        vectors *= noise
        vectors += centres[labels]
        yield vectors, labels


def descriptor_stream(num_rows, batch, centres, scales, seed=0):
    """Lazy ``(descriptors (b, D) float32, labels (b,))`` batches."""
    rng = np.random.default_rng(seed)
    for start in range(0, num_rows, batch):
        labels = rng.integers(0, len(centres), size=min(batch, num_rows - start))
        noise = rng.standard_normal((len(labels), len(scales)), dtype=np.float32) * scales
        yield noise + centres[labels], labels


def kl_bound(max_images, regions, channels, max_pairs, batch, classes):
    """The bound the docstrings state: vectors kept + 3 MB of pair-difference temporaries +
    distances (float32 and the float64 copy) + the sample's state; plus the generator's
    batch and its temporaries."""
    kept = max_images * regions * channels * 4
    distances = max_pairs * regions * 24
    sample = 200 * classes + 64 * (max_images + batch)
    return kept + 3 * MB + distances + sample + 4 * batch * regions * channels * 4


def whitening_bound(dim, max_images, batch, classes):
    """3 D² float64 arrays at most + the descriptors kept + pair-difference temporaries
    (~2 MB) + the sample's state; plus a batch in float64 and its temporaries."""
    return 3 * dim * dim * 8 + max_images * dim * 4 + 2 * MB + 200 * classes + 6 * batch * dim * 8


def test_kl_from_a_stream_equals_the_in_memory_computation():
    """200 rows, all kept (max_images 512): the same pairs as `sample_pairs` on the labels,
    the same distances and KL values as the in-memory path."""
    centres = np.random.default_rng(1).normal(size=(50, 6, 16)).astype(np.float32)
    noise = np.linspace(0.3, 3.0, 6)[:, None].astype(np.float32)
    batches = list(region_stream(200, 32, centres, noise))
    vectors = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    weights = kl_region_weights_from_stream(iter(batches), max_pairs=300, seed=2)

    matching, non_matching = sample_pairs(labels, max_pairs=300, seed=2)

    def distances(pairs):
        return np.linalg.norm(vectors[pairs[:, 0]] - vectors[pairs[:, 1]], axis=-1)

    kl = kl_divergence_per_region(distances(matching), distances(non_matching))
    np.testing.assert_allclose(weights[0], kl / kl.mean(), rtol=1e-6)
    # Two taps come back as two rows; the second tap's vectors are the first's 5 channels.
    two = kl_region_weights_from_stream(([v, v[:, :, :5]], y) for v, y in batches)
    assert two.shape == (2, 6)
    with pytest.raises(InvalidInputError, match="same number of regions"):
        kl_region_weights_from_stream(([v, v[:, :3]], y) for v, y in batches)


def test_kl_from_a_stream_of_20k_rows_stays_under_the_stated_bound():
    """20k rows of 8 regions × 64 channels: the in-memory path would hold 41 MB of region
    vectors; the stream keeps 512 rows (1 MB) and stays under the stated bound (~6 MB).
    Regions with less noise still get larger weights."""
    rows, regions, channels, batch, classes = 20_000, 8, 64, 64, 2000
    centres = np.random.default_rng(1).normal(size=(classes, regions, channels))
    centres = centres.astype(np.float32)
    noise = np.geomspace(0.3, 3.0, regions)[:, None].astype(np.float32)
    weights, peak = traced_peak(
        kl_region_weights_from_stream,
        region_stream(rows, batch, centres, noise),
        max_images=512,
        max_pairs=2000,
    )
    bound = kl_bound(512, regions, channels, 2000, batch, classes)
    assert peak < bound, (peak / MB, bound / MB)
    assert bound < rows * regions * channels * 4 / 4
    assert weights.shape == (1, regions)
    assert np.all(np.diff(weights[0]) < 0), weights


def test_whitening_from_a_stream_equals_the_in_memory_whitening():
    """600 float32 descriptors, all kept: learned whitening takes the same matching pairs
    (`matching_pairs(labels)`) and gives the same kernel and bias; PCA likewise, also from
    batches of descriptors without labels."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(600) % 150)
    centres = rng.normal(0, 3, size=(150, 12))
    x = (centres[labels] + rng.normal(size=(600, 12)) * np.linspace(0.3, 2, 12) + 5).astype(
        np.float32
    )
    batches = [(x[s : s + 50], labels[s : s + 50]) for s in range(0, 600, 50)]
    for streamed, in_memory in [
        (learned_whitening_from_stream(iter(batches), dim=8), learned_whitening(x, labels, dim=8)),
        (pca_whitening_from_stream(iter(batches), dim=8), pca_whitening(x, dim=8)),
        (pca_whitening_from_stream(b[0] for b in batches), pca_whitening(x)),
    ]:
        for got, want in zip(streamed, in_memory, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_learned_whitening_from_a_stream_of_20k_rows_stays_under_the_stated_bound():
    """20k descriptors of D = 256 (41 MB in float64 in memory): the stream keeps moments and
    1000 descriptors and stays under the stated bound (~8 MB). Classes differ along the
    first 8 dimensions only, with little noise there: the 8 leading whitened dimensions
    must read those."""
    rows, dim, batch, classes = 20_000, 256, 128, 2000
    rng = np.random.default_rng(1)
    centres = np.zeros((classes, dim), np.float32)
    centres[:, :8] = rng.normal(0, 3, size=(classes, 8))
    scales = np.where(np.arange(dim) < 8, 0.3, 2.0).astype(np.float32)
    (kernel, bias), peak = traced_peak(
        learned_whitening_from_stream,
        descriptor_stream(rows, batch, centres, scales),
        dim=8,
        max_images=1000,
    )
    bound = whitening_bound(dim, 1000, batch, classes)
    assert peak < bound, (peak / MB, bound / MB)
    assert bound < rows * dim * 8 / 4
    assert kernel.shape == (dim, 8) and bias.shape == (8,)
    assert np.square(kernel[:8]).sum() > 10 * np.square(kernel[8:]).sum()


def test_stream_inputs_are_checked():
    with pytest.raises(InvalidInputError, match=r"batch 1 .*\(batch, 4\)"):
        pca_whitening_from_stream(iter([np.ones((3, 4)), np.ones((3, 5))]))
    with pytest.raises(InvalidInputError, match="batch 0 .* pair"):
        learned_whitening_from_stream(iter([np.ones((3, 4))]))
    with pytest.raises(InvalidInputError, match="at least 2 descriptors"):
        pca_whitening_from_stream(iter([np.ones((1, 4))]))
    with pytest.raises(InvalidInputError, match="matching pair"):
        learned_whitening_from_stream(iter([(np.eye(4), [0, 1, 2, 3])]))
    with pytest.raises(InvalidInputError, match="regions, channels"):
        kl_region_weights_from_stream(iter([(np.ones((3, 4)), [0, 0, 1])]))


@pytest.fixture(scope="module")
def tiny_model_and_images():
    """A random-init MobileNetV2 (α 0.35) tapping two narrow layers (32 + 112 channels,
    40 regions each), BatchNorm recalibrated; 24 images of 6 objects at 96 px."""
    rng = np.random.default_rng(0)
    objects = rng.uniform(0, 255, size=(6, 96, 96, 3))
    labels = np.repeat(np.arange(6), 4)
    images = np.clip(objects[labels] + rng.normal(0, 40, size=(24, 96, 96, 3)), 0, 255)
    images = images.astype("float32")
    model = remap_tf.REMAP(
        "mobilenet_v2",
        backbone_kwargs={"alpha": 0.35},
        taps=("block_12_add", "block_16_project_BN"),
        dim=16,
    )
    remap_tf.recalibrate_batch_norm(model, images, batch_size=24)
    return model, images, labels


def mixed_dataset(images, labels):
    """Batches of 5, alternately at 96 px and resized to 64 px."""
    small = tf.image.resize(images, (64, 64)).numpy()

    def batches():
        for number, start in enumerate(range(0, len(images), 5)):
            yield (small if number % 2 else images)[start : start + 5], labels[start : start + 5]

    signature = (
        tf.TensorSpec((None, None, None, 3), tf.float32),
        tf.TensorSpec((None,), tf.int64),
    )
    return tf.data.Dataset.from_generator(batches, output_signature=signature)


def test_init_region_weights_from_a_dataset(tiny_model_and_images):
    """An array and a dataset of the same images give the same weights (12 of 24 images
    kept: the same subset online as from the labels); mixed-size batches work."""
    model, images, labels = tiny_model_and_images
    from_array = remap_tf.init_region_weights(model, images, labels, max_images=12)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(7)
    from_dataset = remap_tf.init_region_weights(model, dataset, max_images=12)
    np.testing.assert_allclose(from_dataset, from_array, rtol=1e-4)
    assert from_array.shape == (2, 40) and np.ptp(from_array) > 0

    weights = remap_tf.init_region_weights(model, mixed_dataset(images, labels))
    assert weights.shape == (2, 40) and np.all(np.isfinite(weights))
    np.testing.assert_allclose(weights.mean(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(remap_tf.get_region_weights(model), weights)
    with pytest.raises(InvalidInputError, match="`labels` must be None"):
        remap_tf.init_region_weights(model, dataset, labels)
    with pytest.raises(InvalidInputError, match="`labels` are needed"):
        remap_tf.init_region_weights(model, images)


def test_init_whitening_from_a_dataset(tiny_model_and_images):
    model, images, labels = tiny_model_and_images
    kernel, bias = remap_tf.init_whitening(model, images, labels)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(7)
    streamed = remap_tf.init_whitening(model, dataset)
    for got, want in zip(streamed, (kernel, bias), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    kernel, bias = remap_tf.init_whitening(model, mixed_dataset(images, labels))
    assert kernel.shape == (144, 16) and np.all(np.isfinite(kernel))
    np.testing.assert_array_equal(model.get_layer("whitening").kernel.numpy(), kernel)
    pca = remap_tf.init_whitening(model, mixed_dataset(images, labels), method="pca")
    images_only = mixed_dataset(images, labels).map(lambda x, y: x)
    np.testing.assert_array_equal(
        remap_tf.init_whitening(model, images_only, method="pca")[0], pca[0]
    )
    with pytest.raises(InvalidInputError, match="batch 0 .* pair"):
        remap_tf.init_whitening(model, images_only, method="learned")
