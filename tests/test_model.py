"""The REMAP model: R-MAC equivalence, every backbone, gradients, constraints, save/load."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import remap_tf
from remap_tf.regions import relative_regions, scale_regions
from remap_tf.specs import BACKBONES

TINY = {"backbone": "mobilenet", "backbone_kwargs": {"alpha": 0.25}}


def images(n=2, height=96, width=96, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, height, width, 3)).astype("float32")


def tiny(**kwargs):
    """A tiny random-init model with BatchNorm statistics from random images, so its
    features are O(1) (uncalibrated, a random MobileNet's taps are ~1e-12)."""
    model = remap_tf.REMAP(**{**TINY, **kwargs})
    remap_tf.recalibrate_batch_norm(model, images(16, 96, 96, seed=99), batch_size=16)
    return model


def numpy_rmac(feature_maps, levels=4, grid_shape=(24, 32)):
    """R-MAC from the tapped feature maps: per layer, L2(sum_r L2(max over region r)),
    layers concatenated, then L2 (the identity whitening does nothing)."""
    rel = relative_regions(levels, grid_shape)
    parts = []
    for fmap in feature_maps:
        fmap = np.asarray(fmap, dtype=np.float64)
        boxes = scale_regions(rel, fmap.shape[1], fmap.shape[2])
        regions = np.stack([fmap[:, t:b, x0:x1].max(axis=(1, 2)) for t, x0, b, x1 in boxes], 1)
        regions /= np.linalg.norm(regions, axis=-1, keepdims=True)
        summed = regions.sum(axis=1)
        parts.append(summed / np.linalg.norm(summed, axis=-1, keepdims=True))
    out = np.concatenate(parts, axis=-1)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.mark.parametrize("pooling", ["remap", "rmac"])
@pytest.mark.parametrize("size", [(96, 128), (160, 96)])
def test_remap_with_unit_weights_and_identity_whitening_equals_numpy_rmac(pooling, size):
    model = tiny(pooling=pooling)
    np.testing.assert_array_equal(remap_tf.get_region_weights(model), 1.0)
    x = images(2, *size)
    taps = model.get_layer("backbone")(model.get_layer("preprocessing")(x))
    assert min(float(np.abs(np.asarray(t)).max()) for t in taps) > 0.1
    np.testing.assert_allclose(np.asarray(model(x)), numpy_rmac(taps), rtol=1e-4, atol=1e-5)


# The required backbones run in the default suite; the larger extras are slow.
EXTRA_BACKBONES = {"resnet152", "vgg19", "efficientnet_v2_s"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in EXTRA_BACKBONES else n
        for n in sorted(BACKBONES)
    ],
)
def test_every_backbone_builds_small_with_unit_norm_rows(name):
    model = remap_tf.REMAP(name, input_shape=(64, 64, 3))
    out = np.asarray(model(images(2, 64, 64)))
    assert out.shape[0] == 2 and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("pooling", remap_tf.POOLINGS)
def test_every_pooling_shares_the_interface_and_reloads_safely(pooling, tmp_path):
    model = tiny(pooling=pooling, dim=32)
    x = images(3, 80, 112)
    out = np.asarray(model(x))
    assert out.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    path = tmp_path / f"{pooling}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(x)), out, rtol=1e-6, atol=1e-6)


def test_gradients_reach_backbone_region_weights_and_whitening():
    model = tiny()
    x = images(2, 96, 96)
    direction = tf.random.stateless_normal((2, model.output_shape[-1]), seed=(1, 2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) * direction)
    grads = dict(
        zip(
            [v.path for v in model.trainable_variables],
            tape.gradient(loss, model.trainable_variables),
            strict=True,
        )
    )
    wanted = {
        "backbone": next(p for p in grads if p.startswith("conv1/") and "kernel" in p),
        "region weights": "region_weights_0/region_weights",
        "region weights (layer 2)": "region_weights_1/region_weights",
        "whitening": "whitening/kernel",
    }
    for what, path in wanted.items():
        assert grads[path] is not None, what
        assert float(tf.reduce_max(tf.abs(grads[path]))) > 0, f"no gradient reaches {what}"


def test_region_weights_stay_non_negative_after_large_learning_rate_steps():
    """The learning rate is chosen so that one plain SGD step would drive the weight with
    the largest positive gradient to about -4; the NonNeg constraint must clip it to 0."""
    model = tiny()
    x = images(4, 96, 96)
    target = np.random.default_rng(3).normal(size=(4, model.output_shape[-1]))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.mean_squared_error(target, model(x, training=True)))
    weights = [v for v in model.trainable_variables if "region_weights" in v.path]
    grads = np.concatenate([g.numpy() for g in tape.gradient(loss, weights)])
    assert grads.max() > 0
    learning_rate = 5.0 / float(grads.max())
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate), loss="mse")
    model.fit(x, target, epochs=3, batch_size=4, verbose=0)
    learned = remap_tf.get_region_weights(model)
    assert learned.min() >= 0.0
    assert np.any(learned == 0.0) and np.any(learned != 1.0)


def test_rmac_weights_are_frozen_and_remap_weights_trainable():
    assert not any(
        "region_weights" in v.path
        for v in remap_tf.REMAP(pooling="rmac", **TINY).trainable_variables
    )
    assert any("region_weights" in v.path for v in remap_tf.REMAP(**TINY).trainable_variables)


def test_any_input_size_and_batch_size_including_in_a_graph():
    model = remap_tf.REMAP(**TINY)
    dims = set()
    for n, h, w in [(1, 64, 64), (3, 64, 200), (2, 150, 70), (5, 97, 131)]:
        out = model.predict(images(n, h, w), verbose=0, batch_size=n)
        assert out.shape[0] == n
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
        dims.add(out.shape[1])
    assert len(dims) == 1


def test_descriptor_does_not_depend_on_the_batch():
    model = tiny()
    x = images(4, 96, 96)
    together = np.asarray(model(x))
    alone = np.concatenate([np.asarray(model(x[i : i + 1])) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_mixed_float16_policy_keeps_float32_norms_and_output(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    model = tiny()
    assert model.get_layer("regions_0").compute_dtype == "float32"  # the head stays float32
    out = model(images(2, 96, 96))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-4)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(images(2, 96, 96), np.zeros((2, out.shape[-1])), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    path = tmp_path / "mixed.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        np.asarray(reloaded(images(1))), np.asarray(model(images(1))), atol=1e-6
    )


def test_regional_gem_model_trains_p_reloads_safely_and_runs_mixed(tmp_path):
    """REMAP(region_pooling="gem"): one float32 exponent per tap, initialised at gem_p,
    reached by the gradient; region_model still finds the regions (the KL initialisation
    reads them) and they are unit vectors; .keras reload with safe_mode=True gives equal
    descriptors; under mixed_float16 the head and p stay float32."""
    model = tiny(region_pooling="gem", gem_p=3.0)
    ps = [v for v in model.trainable_variables if v.path.endswith("/p")]
    assert [v.path for v in ps] == ["regions_0/p", "regions_1/p"]
    assert all(float(v.numpy()) == 3.0 and v.dtype == "float32" for v in ps)
    x = images(2, 96, 96)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True)[:, :8])
    assert all(float(tf.abs(g)) > 0 for g in tape.gradient(loss, ps))
    regions = remap_tf.region_model(model)(x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(regions[0]), axis=-1), 1.0, rtol=1e-5)
    path = tmp_path / "regional_gem.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(model(x)), atol=1e-6)
    assert isinstance(reloaded.get_layer("regions_1"), remap_tf.RegionGeMPooling)
    assert not isinstance(remap_tf.REMAP(**TINY).get_layer("regions_0"), remap_tf.RegionGeMPooling)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = tiny(region_pooling="gem")
        out = mixed(x)
        assert mixed.get_layer("regions_0").compute_dtype == "float32"
        assert mixed.get_layer("regions_0").gem_p.dtype == "float32"
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, rtol=1e-4)
    finally:
        keras.config.set_dtype_policy("float32")
    with pytest.raises(ValueError, match="region_pooling.*'mean'"):
        remap_tf.REMAP(**TINY, region_pooling="mean")


def test_set_region_weights_round_trip_and_validation():
    model = remap_tf.REMAP(**TINY)
    values = np.random.default_rng(0).uniform(0, 2, size=(2, 40)).astype("float32")
    remap_tf.set_region_weights(model, values)
    np.testing.assert_array_equal(remap_tf.get_region_weights(model), values)
    with pytest.raises(ValueError, match=r"shape \(2, 40\).*\(40,\)"):
        remap_tf.set_region_weights(model, values[0])
    with pytest.raises(ValueError, match="non-negative"):
        remap_tf.set_region_weights(model, -values)


def test_local_weights_file_loads_and_bad_path_is_named(tmp_path):
    backbone = remap_tf.build_backbone("mobilenet", alpha=0.25, input_shape=(64, 64, 3))
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(path)
    model = remap_tf.REMAP(weights=str(path), **TINY)
    loaded = model.get_layer("backbone").get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(loaded, backbone.get_layer("conv1").get_weights()[0])
    with pytest.raises(ValueError, match="missing.h5"):
        remap_tf.REMAP(weights=str(tmp_path / "missing.h5"), **TINY)
    mismatch = pytest.raises(ValueError, match="Could not load backbone weights")
    with mismatch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns about each mismatched layer first
        remap_tf.REMAP("mobilenet", weights=str(path), backbone_kwargs={"alpha": 0.5})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backbone": "resnet5O"}, r"'resnet5O'.*Did you mean 'resnet50'"),
        ({**TINY, "taps": ["conv_pw_13_relux"]}, r"'conv_pw_13_relux'"),
        ({**TINY, "levels": 0}, r"levels.*0"),
        ({**TINY, "pooling": "max"}, r"'max'"),
        ({**TINY, "input_shape": (32, 32, 3)}, r"\(32, 32, 3\)"),
        ({**TINY, "input_shape": (64, 64)}, r"\(64, 64\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        remap_tf.REMAP(**kwargs)


def test_wrong_rank_input_is_a_value_error_with_the_shape():
    model = remap_tf.REMAP(**TINY)
    with pytest.raises(ValueError, match=r"\(96, 96, 3\)|ndim=3|rank"):
        model(np.zeros((96, 96, 3), np.float32))


def test_recalibration_brings_random_init_features_to_unit_scale():
    model = remap_tf.REMAP(**TINY)
    x = images(2, 96, 96)
    before = model.get_layer("backbone")(model.get_layer("preprocessing")(x))
    assert float(np.abs(np.asarray(before[-1])).max()) < 1e-6
    assert remap_tf.recalibrate_batch_norm(model, images(16, seed=5), batch_size=8) == 27
    after = model.get_layer("backbone")(model.get_layer("preprocessing")(x))
    assert 0.1 < float(np.abs(np.asarray(after[-1])).max()) < 100
