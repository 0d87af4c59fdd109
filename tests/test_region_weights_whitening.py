"""KL region weights against the Gaussian closed form; learned and PCA whitening."""

import numpy as np
import pytest

import remap_tf
from remap_tf.pairs import matching_pairs, sample_pairs
from remap_tf.region_weights import kl_divergence_per_region
from remap_tf.whitening import learned_whitening, pca_whitening, select_whitening


def gaussian_kl(m1, s1, m2, s2):
    """KL(N(m1, s1²) || N(m2, s2²)) = log(s2/s1) + (s1² + (m1 - m2)²) / (2 s2²) - 1/2."""
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


@pytest.mark.parametrize(
    "m1, s1, m2, s2", [(0.5, 0.1, 0.8, 0.15), (1.0, 0.2, 1.1, 0.2), (0.3, 0.05, 0.9, 0.2)]
)
def test_kl_matches_the_closed_form_for_two_gaussians(m1, s1, m2, s2):
    rng = np.random.default_rng(0)
    matching = rng.normal(m1, s1, size=(200_000, 1))
    non_matching = rng.normal(m2, s2, size=(200_000, 1))
    estimate = kl_divergence_per_region(matching, non_matching, bins=200)[0]
    expected = gaussian_kl(m1, s1, m2, s2)
    assert estimate == pytest.approx(expected, rel=0.05, abs=0.01)


def test_more_separable_regions_score_higher():
    """Region r's matching distances sit r·0.1 below the non-matching ones."""
    rng = np.random.default_rng(1)
    gaps = np.array([0.0, 0.1, 0.2, 0.4, 0.8])
    non_matching = rng.normal(1.0, 0.1, size=(5000, 5))
    matching = rng.normal(1.0 - gaps, 0.1, size=(5000, 5))
    kl = kl_divergence_per_region(matching, non_matching)
    assert kl[0] < 0.05
    assert np.all(np.diff(kl) > 0)


def test_kl_inputs_are_validated():
    with pytest.raises(ValueError, match="same number of regions"):
        kl_divergence_per_region(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        kl_divergence_per_region(np.full((5, 1), np.nan), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="bins.*1"):
        kl_divergence_per_region(np.zeros((5, 1)), np.ones((5, 1)), bins=1)
    assert kl_divergence_per_region(np.ones((5, 1)), np.ones((5, 1)))[0] == 0.0


def test_sample_pairs_needs_two_classes_with_several_images():
    matching, non_matching = sample_pairs([0, 0, 1, 1, 1], max_pairs=100)
    assert {tuple(p) for p in matching} == {(0, 1), (2, 3), (2, 4), (3, 4)}
    assert len(non_matching) == 6
    with pytest.raises(ValueError, match="at least 2 matching"):
        sample_pairs([0, 1, 2, 3])


def test_init_region_weights_favours_the_region_that_holds_the_object():
    """Each image is one of 4 'objects' (a scikit-image photograph, shrunk to a quarter of
    the image) pasted in the top-left quarter over fresh noise. The top-left region sees the
    object, so matching pairs are close there and the KL weight of the top-left region must
    exceed that of the bottom-right one, in both tapped layers of the bundled ImageNet
    MobileNet. (Random textures do not work as objects: ImageNet features at stride 32 see
    every patch of uniform noise alike, so matching and non-matching pairs are as far apart.)
    """
    import skimage.data
    import tensorflow as tf

    side, half = 384, 192
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    photos.append(skimage.data.rocket())
    objects = np.stack([tf.image.resize(photo, (half, half)).numpy() for photo in photos])
    labels = np.repeat(np.arange(4), 5)
    images = rng.uniform(0, 255, size=(20, side, side, 3))
    images[:, :half, :half] = objects[labels] + rng.normal(0, 8, size=(20, half, half, 3))
    images = np.clip(images, 0, 255).astype("float32")
    model = remap_tf.REMAP("mobilenet", grid_shape=(12, 12), levels=2)  # stride 32
    weights = remap_tf.init_region_weights(model, images, labels, max_pairs=500)
    assert weights.shape == (2, 5)
    np.testing.assert_allclose(weights.mean(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(remap_tf.get_region_weights(model), weights)
    # Grid of a 12x12 map, L=2: [whole map, top-left, top-right, bottom-left, bottom-right].
    top_left, bottom_right = 1, 4
    assert np.all(weights[:, top_left] > weights[:, bottom_right])


def test_pca_whitening_gives_identity_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6)) + 3.0
    kernel, bias = pca_whitening(x, shrinkage=0.0)
    y = x @ kernel + bias
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(6), atol=1e-3)
    kernel3, _ = pca_whitening(x, dim=3, shrinkage=0.0)
    np.testing.assert_allclose(kernel3, kernel[:, :3], atol=1e-6)


def test_learned_whitening_whitens_matching_differences_and_ranks_by_discriminance():
    """Classes differ along the first 2 of 5 dims; within-class noise is large along dims
    2-4. The learned projection must make matching-pair differences white and put the
    class-separating directions first."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(50), 6)
    centres = np.zeros((50, 5))
    centres[:, :2] = rng.normal(0, 3.0, size=(50, 2))
    noise = rng.normal(size=(300, 5)) * np.array([0.3, 0.3, 2.0, 2.0, 2.0])
    x = centres[labels] + noise
    kernel, bias = learned_whitening(x, labels, shrinkage=0.0)
    y = x @ kernel + bias
    pairs = matching_pairs(labels)
    diffs = y[pairs[:, 0]] - y[pairs[:, 1]]
    np.testing.assert_allclose(diffs.T @ diffs / len(diffs), np.eye(5), atol=1e-6)
    top2 = np.abs(kernel[:, :2])
    assert top2[:2].sum() > 5 * top2[2:].sum(), "class directions must come first"
    # Truncation keeps the leading dimensions.
    kernel2, bias2 = learned_whitening(x, labels, dim=2, shrinkage=0.0)
    np.testing.assert_allclose(np.abs(kernel2), np.abs(kernel[:, :2]), atol=1e-6)
    np.testing.assert_allclose(np.abs(bias2), np.abs(bias[:2]), atol=1e-6)


def test_whitening_inputs_are_validated():
    with pytest.raises(ValueError, match=r"dim.*\[1, 3\].*7"):
        pca_whitening(np.ones((4, 3)), dim=7)
    with pytest.raises(ValueError, match="labels.*pairs"):
        learned_whitening(np.ones((4, 3)))
    with pytest.raises(ValueError, match="matching pair"):
        learned_whitening(np.eye(4, 3), labels=[0, 1, 2, 3])


def test_init_whitening_sets_the_model_layer():
    rng = np.random.default_rng(0)
    objects = rng.uniform(0, 255, size=(6, 96, 96, 3))
    labels = np.repeat(np.arange(6), 4)
    images = np.clip(objects[labels] + rng.normal(0, 40, size=(24, 96, 96, 3)), 0, 255)
    images = images.astype("float32")
    model = remap_tf.REMAP("mobilenet", backbone_kwargs={"alpha": 0.25}, dim=16)
    remap_tf.recalibrate_batch_norm(model, images, batch_size=24)
    kernel, bias = remap_tf.init_whitening(model, images, labels, method="learned")
    # Taps conv_pw_12 and conv_pw_13 of MobileNet alpha 0.25: 256 + 256 channels.
    assert kernel.shape == (512, 16) and bias.shape == (16,)
    np.testing.assert_array_equal(model.get_layer("whitening").kernel.numpy(), kernel)
    out = model.predict(images, verbose=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="'zca'"):
        remap_tf.init_whitening(model, images, labels, method="zca")


def _whitening_lowers(seed=0):
    """16 classes of 3 images in 32-d: unit class centres plus isotropic noise (0.25). Raw
    cosine already separates them; with 36 images to fit 32 dimensions every whitening
    amplifies noise directions, and held-out mAP drops (about 87 -> 42-78)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(16, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, 3, axis=0) + rng.normal(0, 0.25, size=(48, 32))
    return x, np.repeat(np.arange(16), 3)


def _whitening_raises(seed=0):
    """16 classes of 4 images in 8-d: the class signal lives in dims 0-3 (spread 1, noise
    0.1, under a common offset of 10) and dims 4-7 carry per-image noise of 5. Raw cosine
    sees mostly the noise (held-out mAP about 20); whitening learns to drop it (about 50)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((16, 8))
    centres[:, :4] = rng.normal(0, 1, size=(16, 4))
    x = np.repeat(centres, 4, axis=0)
    x[:, :4] += 10 + rng.normal(0, 0.1, size=(64, 4))
    x[:, 4:] += rng.normal(0, 5, size=(64, 4))
    return x, np.repeat(np.arange(16), 4)


@pytest.mark.parametrize("method", ["learned", "pca"])
def test_select_whitening_keeps_the_identity_where_whitening_lowers_heldout_map(method):
    x, labels = _whitening_lowers()
    chosen = select_whitening(x, labels, units=32, method=method)
    scores = [c["heldout_map"] for c in chosen.candidates]
    assert chosen.candidates[0]["method"] == "identity" and len(scores) == 10  # 1 + 3 dims x 3
    assert max(scores[1:]) < scores[0]  # every whitening loses on the held-out classes
    assert chosen.choice == chosen.candidates[0]
    np.testing.assert_array_equal(chosen.kernel, np.eye(32, dtype=np.float32))
    np.testing.assert_array_equal(chosen.bias, 0.0)
    assert chosen.heldout["classes"] == 5 and chosen.heldout["images"] == 15  # 0.3 of 16
    # A layer smaller than the input: every candidate, the identity too, has its size.
    smaller = select_whitening(x, labels, units=8, method=method)
    assert [c["dim"] for c in smaller.candidates][:2] == [8, 8] and smaller.kernel.shape == (32, 8)


@pytest.mark.parametrize("method", ["learned", "pca"])
def test_select_whitening_picks_a_whitening_where_it_raises_heldout_map(method):
    x, labels = _whitening_raises()
    chosen = select_whitening(x, labels, units=8, method=method, shrinkages=[0.1])
    assert chosen.choice["method"] == method
    assert chosen.choice["heldout_map"] == max(c["heldout_map"] for c in chosen.candidates)
    assert chosen.choice["heldout_map"] > chosen.candidates[0]["heldout_map"] + 10
    # Refitted on every image with the chosen dimension and shrinkage, zero-padded to 8.
    dim, fit = chosen.choice["dim"], pca_whitening if method == "pca" else learned_whitening
    if method == "pca":
        kernel, bias = fit(x, dim=dim, shrinkage=0.1)
    else:
        kernel, bias = fit(x, dim=dim, pairs=matching_pairs(labels, seed=0), shrinkage=0.1)
    np.testing.assert_allclose(chosen.kernel[:, :dim], kernel, rtol=1e-6)
    np.testing.assert_allclose(chosen.bias[:dim], bias, rtol=1e-6)
    np.testing.assert_array_equal(chosen.kernel[:, dim:], 0.0)
    assert chosen.record()["choice"] == chosen.choice


def test_select_whitening_inputs_are_validated():
    x, labels = _whitening_raises()
    with pytest.raises(ValueError, match="holdout.*1.5"):
        select_whitening(x, labels, holdout=1.5)
    with pytest.raises(ValueError, match="at least 4 classes.*received 3"):
        select_whitening(x[:12], labels[:12])
    with pytest.raises(ValueError, match="'zca'"):
        select_whitening(x, labels, method="zca")


def test_init_whitening_select_records_the_choice_in_the_saved_model(tmp_path):
    """select=True sets the chosen whitening and records the choice and the held-out
    figures in the whitening layer's config, which the .keras file keeps."""
    import keras

    rng = np.random.default_rng(0)
    objects = rng.uniform(0, 255, size=(8, 96, 96, 3))
    labels = np.repeat(np.arange(8), 3)
    images = np.clip(objects[labels] + rng.normal(0, 40, size=(24, 96, 96, 3)), 0, 255)
    images = images.astype("float32")
    model = remap_tf.REMAP("mobilenet", backbone_kwargs={"alpha": 0.25}, dim=16)
    remap_tf.recalibrate_batch_norm(model, images, batch_size=24)
    kernel, bias = remap_tf.init_whitening(model, images, labels, select=True, shrinkage=0.3)
    layer = model.get_layer("whitening")
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    record = layer.get_config()["selection"]
    assert record["heldout"] == {"classes": 2, "images": 6}
    assert {c["shrinkage"] for c in record["candidates"][1:]} == {0.1, 0.3, 0.5, 1.0}
    assert record["choice"] in record["candidates"]
    model.save(tmp_path / "selected.keras")
    reloaded = keras.saving.load_model(tmp_path / "selected.keras", safe_mode=True)
    assert reloaded.get_layer("whitening").selection == record
    assert model.get_layer("whitening").get_config()["selection"] is not None
    assert (
        remap_tf.REMAP(backbone="mobilenet", backbone_kwargs={"alpha": 0.25})
        .get_layer("whitening")
        .selection
        is None
    )  # off by default
