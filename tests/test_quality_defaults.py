"""The pretrained default and the numerics under it (issue 10).

- The ImageNet MobileNet v1 (alpha 0.75) weights ship inside the package, load with the
  network blocked, match the SHA-256 in their NOTICE, and retrieve: a crop of each
  scikit-image photo is closest to its own photo.
- Region and layer vectors are unit vectors whatever the activation scale, also under
  mixed_float16; the head (pooling to descriptor) computes in float32.
- Maps too small for the region grid warn, naming the smallest size.
"""

from __future__ import annotations

import hashlib
import re
import socket
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import remap_tf
from remap_tf.backbones import WEIGHTS_DIR
from remap_tf.errors import InvalidInputError
from remap_tf.layers import RegionGridWarning, RegionMaxPooling
from remap_tf.ops import l2_normalize
from remap_tf.regions import min_distinct_long_side
from remap_tf.specs import BUNDLED_WEIGHTS


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, as on a machine with no route to the internet."""

    def refuse(*args, **kwargs):
        raise OSError("network is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_bundled_weights_match_their_notice():
    notice = (WEIGHTS_DIR / "NOTICE").read_text()
    for _, file_name in BUNDLED_WEIGHTS.values():
        digest = hashlib.sha256((WEIGHTS_DIR / file_name).read_bytes()).hexdigest()
        assert re.search(rf"{file_name}\s+SHA-256 {digest}", notice), file_name
    assert "Apache License" in notice and "238fbc538b0dd3d3993a1ebaf5f68fa679c99fa7" in notice


def _photos() -> dict[str, np.ndarray]:
    from remap_cli.demo.photoset import PHOTOS

    return {name: load()[0] for name, load in PHOTOS.items()}


def _resize(pixels: np.ndarray, long_side: int) -> np.ndarray:
    image = Image.fromarray(pixels)
    scale = long_side / max(image.size)
    size = (max(32, round(image.width * scale)), max(32, round(image.height * scale)))
    return np.asarray(image.resize(size, Image.BILINEAR), np.float32)[None]


def test_bundled_weights_load_offline_and_retrieve_crops(no_network):
    """A centre crop of 40% of each photo's area is closest to its own photo among all 18."""
    model = remap_tf.REMAP("mobilenet", weights="imagenet", backbone_kwargs={"alpha": 0.75})
    photos = _photos()
    full, crops = [], []
    for pixels in photos.values():
        h, w = pixels.shape[:2]
        side = np.sqrt(0.4)
        top, left = int(h * (1 - side) / 2), int(w * (1 - side) / 2)
        crop = pixels[top : top + int(h * side), left : left + int(w * side)]
        full.append(np.asarray(model(_resize(pixels, 320)))[0])
        crops.append(np.asarray(model(_resize(crop, 320)))[0])
    nearest = np.argmax(np.stack(crops) @ np.stack(full).T, axis=1)
    assert list(nearest) == list(range(len(photos))), dict(zip(photos, nearest, strict=True))


def test_random_weights_are_far_from_the_bundled_ones():
    """The bundled file is what 'imagenet' loads (not a random model that happens to work)."""
    bundled = remap_tf.build_backbone("mobilenet", weights="imagenet", alpha=0.75)
    random = remap_tf.build_backbone("mobilenet", weights=None, alpha=0.75)
    reference = keras.applications.MobileNet(alpha=0.75, include_top=False, weights=None)
    reference.load_weights(WEIGHTS_DIR / BUNDLED_WEIGHTS["mobilenet"][1])
    for a, b in zip(bundled.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(bundled.get_weights()[0], random.get_weights()[0])


def test_other_imagenet_weights_offline_fail_in_one_line_naming_the_bundled_ones(no_network):
    with pytest.raises(InvalidInputError) as error:
        remap_tf.REMAP("mobilenet", weights="imagenet", backbone_kwargs={"alpha": 0.5})
    message = str(error.value)
    assert "\n" not in message and "weights='imagenet'" in message
    assert "backbone_kwargs={'alpha': 0.75}" in message


@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e4])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_region_vectors_are_unit_vectors_at_any_scale(scale, policy):
    keras.config.set_dtype_policy(policy)
    features = np.random.default_rng(0).uniform(0, 1, (2, 12, 16, 8)).astype("float32") * scale
    regions = RegionMaxPooling(4, (24, 32), dtype="float32")(features)
    norms = np.linalg.norm(np.asarray(regions, np.float64), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    if scale >= 1.0:  # float16 holds these (1e-10 is below its range); their squares do not
        halves = l2_normalize(tf.constant(features[0, 0], tf.float16))
        norms = np.linalg.norm(np.asarray(halves, np.float64), axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-2)


def test_all_zero_vectors_stay_zero():
    assert np.all(np.asarray(l2_normalize(tf.zeros((2, 5)))) == 0.0)


def test_the_head_runs_in_float32_under_mixed_precision():
    """(With ImageNet weights: a random-init backbone's ~1e-10 activations are below float16's
    range before the head ever sees them; `train` says so when it meets that case.)"""
    keras.config.set_dtype_policy("mixed_float16")
    model = remap_tf.REMAP("mobilenet", weights="imagenet", backbone_kwargs={"alpha": 0.75})
    assert model.get_layer("backbone").compute_dtype == "float16"
    for name in ("regions_0", "region_weights_1", "layer_descriptors", "whitening", "descriptor"):
        assert model.get_layer(name).compute_dtype == "float32", name
    images = np.random.default_rng(1).uniform(0, 255, (2, 96, 128, 3)).astype("float32")
    descriptors = np.asarray(model(images))
    assert descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)


def test_a_random_backbone_with_vanishing_activations_still_gives_unit_vectors():
    """A random-init MobileNet in inference mode emits ~1e-10 activations (issue 10): the
    region vectors used to come out with norms of 0.001-0.003."""
    model = remap_tf.REMAP("mobilenet", backbone_kwargs={"alpha": 0.25})
    regions = remap_tf.region_model(model)(np.full((1, 320, 320, 3), 128.0, np.float32))
    for tap in regions:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(tap), axis=-1), 1.0, rtol=1e-5)


def test_small_maps_warn_and_name_the_smallest_input():
    assert min_distinct_long_side(4, (24, 32)) == 9
    with pytest.warns(RegionGridWarning, match=r"only 15 of the 40 .* 288 px"):
        RegionMaxPooling(4, (24, 32))(np.zeros((1, 3, 3, 4), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegionGridWarning)
        for shape in ((1, 10, 13, 4), (1, 13, 10, 4), (1, 9, 9, 4)):
            RegionMaxPooling(4, (24, 32))(np.zeros(shape, np.float32))


def test_the_package_data_lists_the_weights():
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert '"weights/*.weights.h5"' in setup and '"weights/NOTICE"' in setup


def test_a_trained_model_exports_with_any_size_and_scales(tmp_path):
    """`build_model(config)` takes any size; its export honours --image-size and --scales; a
    640x480 image's exported descriptor equals Keras on the aspect-kept resizes (within
    1e-4); remap.json tells the truth."""
    from remap_tf.contract import read_export_metadata
    from remap_tf.export.graph import resize_images
    from remap_tf.export.saved_model import export_model
    from remap_tf.serving.client import LocalEmbedder
    from remap_tf.training.config import TrainConfig
    from remap_tf.training.fit import build_model

    config = TrainConfig.from_dict(
        {"model": {"backbone": "mobilenet", "backbone_kwargs": {"alpha": 0.25}, "levels": 2}}
    )
    model = build_model(config)
    assert model.input_shape == (None, None, None, 3)
    version = export_model(model, tmp_path / "remap", image_size=160, scales=(1.0, 1.4))
    metadata = read_export_metadata(version)
    assert metadata["fixed_size"] is None and metadata["image_size"] == 160
    assert metadata["scales"] == [1.0, 1.4]
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    exported = LocalEmbedder(version, signature="embed_pixels").embed([pixels])[0]
    parts = []
    for long_side in (160, 224):
        resized = resize_images(pixels[None], long_side)
        assert tuple(resized.shape[1:3]) == (round(480 * long_side / 640), long_side)
        parts.append(np.asarray(model(resized))[0])
    expected = np.sum(parts, axis=0)
    np.testing.assert_allclose(exported, expected / np.linalg.norm(expected), atol=1e-4)
