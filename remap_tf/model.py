"""The REMAP model and its baselines on one code path.

``REMAP(backbone, pooling=...)`` builds, for every pooling, the same graph:

    images (b, h, w, 3) RGB 0-255
      -> ImagePreprocessing                         (the backbone's own preprocessing)
      -> backbone taps [(b, h_i, w_i, c_i), ...]     (default: the last two stages)
      -> per tap: pooling -> (b, c_i), L2-normalised
      -> concatenate (b, sum c_i) -> Whitening (b, dim) -> L2Normalization (b, dim) float32

with pooling one of ``"remap"`` (region max pooling, learned non-negative region weights),
``"rmac"`` (the same with every weight fixed at 1), ``"mac"``, ``"spoc"`` and ``"gem"``.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from remap_tf.backbones import build_backbone, tap_model
from remap_tf.checks import check_choice
from remap_tf.contract import MIN_IMAGE_SIZE
from remap_tf.errors import InvalidInputError
from remap_tf.layers import (
    GeMPooling,
    ImagePreprocessing,
    L2Normalization,
    MACPooling,
    RegionGeMPooling,
    RegionMaxPooling,
    RegionWeighting,
    SPoCPooling,
    Whitening,
)
from remap_tf.ops import l2_normalize, resize_images
from remap_tf.regions import relative_regions
from remap_tf.specs import POOLINGS, REGION_POOLINGS, get_spec

WHITENING_LAYER = "whitening"
DESCRIPTOR_LAYER = "descriptor"
CONCAT_LAYER = "layer_descriptors"
# batch_predictor's traced functions, per model (weakly: they die with the model).
_PREDICTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def REMAP(  # the public name the users asked for
    backbone: str = "resnet50",
    *,
    pooling: str = "remap",
    taps=None,
    levels: int = 4,
    grid_shape=(24, 32),
    dim: int | None = None,
    weights: str | None = None,
    input_shape=(None, None, 3),
    gem_p: float = 3.0,
    backbone_kwargs: dict | None = None,
    name: str | None = None,
    region_pooling: str = "max",
) -> keras.Model:
    """Builds a REMAP (or baseline) global-descriptor model on a keras.applications backbone.

    Args:
        backbone: a key of `remap_tf.specs.BACKBONES` (``"resnet50"``, ``"vgg16"``,
            ``"mobilenet_v2"``, ...).
        pooling: ``"remap"``, ``"rmac"``, ``"mac"``, ``"spoc"`` or ``"gem"``.
        taps: backbone layer names to pool, shallow to deep; default the spec's last two
            stages.
        levels: R-MAC scales ``L`` (remap/rmac only); 4 gives 40 regions on the default grid.
        grid_shape: reference feature-map ``(height, width)`` on which the region grid is
            defined (see `remap_tf.regions`).
        dim: descriptor size after whitening; None keeps the concatenated size.
        weights: backbone weights: None, ``"imagenet"`` or a local weights file.
        input_shape: ``(height, width, 3)``; None sizes (the default) accept any size from
            64 px up.
        gem_p: initial GeM exponent (gem, and remap/rmac with ``region_pooling="gem"``).
        backbone_kwargs: extra constructor arguments (e.g. ``{"alpha": 0.75}``).
        name: model name; default ``"{pooling}_{backbone}"``.
        region_pooling: how remap/rmac pool each region: ``"max"`` (the paper's, the
            default) or ``"gem"`` (regional GeM, a learnable exponent per tap initialised at
            ``gem_p``, `remap_tf.layers.RegionGeMPooling`).

    Returns:
        a ``keras.Model`` mapping ``(batch, height, width, 3)`` RGB 0-255 to L2-normalised
        float32 descriptors ``(batch, dim)``.

    Example:
        >>> model = REMAP("mobilenet_v2", input_shape=(128, 128, 3))
        >>> model(np.zeros((2, 128, 128, 3))).shape
        TensorShape([2, 1376])

    Reference: Husain & Bober, "REMAP: Multi-layer entropy-guided pooling of dense CNN
    features for image retrieval", IEEE TIP 2019 (arXiv 1906.06626).
    """
    spec = get_spec(backbone)
    check_choice("pooling", pooling, POOLINGS)
    check_choice("region_pooling", region_pooling, REGION_POOLINGS)
    input_shape = _check_input_shape(input_shape)
    if pooling in ("remap", "rmac"):
        relative_regions(levels, tuple(grid_shape))  # validates both before building anything

    images = keras.Input(shape=input_shape, name="images")
    x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(images)
    base = build_backbone(
        backbone, weights=weights, input_shape=input_shape, **(backbone_kwargs or {})
    )
    features = tap_model(base, taps or spec.taps, name="backbone", relu=spec.relu_taps)(x)
    if not isinstance(features, (list, tuple)):
        features = [features]

    options = {"levels": levels, "grid_shape": grid_shape, "gem_p": gem_p}
    branches = [
        _pool(feature_map, i, pooling, region_pooling=region_pooling, **options)
        for i, feature_map in enumerate(features)
    ]
    if len(branches) > 1:
        x = keras.layers.Concatenate(name=CONCAT_LAYER, dtype=HEAD_DTYPE)(branches)
    else:
        x = L2Normalization(name=CONCAT_LAYER, dtype=HEAD_DTYPE)(branches[0])
    x = Whitening(dim, name=WHITENING_LAYER, dtype=HEAD_DTYPE)(x)
    outputs = L2Normalization(name=DESCRIPTOR_LAYER, dtype=HEAD_DTYPE)(x)
    return keras.Model(images, outputs, name=name or f"{pooling}_{backbone}")


# The head (pooling, region weighting, normalisation, whitening) runs in float32 under any
# policy: it is a small part of the cost, and float16 loses small activations and norms.
HEAD_DTYPE = "float32"


def _pool(feature_map, i: int, pooling: str, *, levels, grid_shape, gem_p, region_pooling):
    """Tap ``i``'s branch: ``(batch, h, w, c)`` -> L2-normalised ``(batch, c)``, float32."""
    head = {"dtype": HEAD_DTYPE}
    if pooling in ("remap", "rmac"):
        if region_pooling == "gem":
            pool = RegionGeMPooling(levels, grid_shape, p=gem_p, name=f"regions_{i}", **head)
        else:
            pool = RegionMaxPooling(levels, grid_shape, name=f"regions_{i}", **head)
        regions = pool(feature_map)
        num_regions = relative_regions(levels, tuple(grid_shape)).shape[0]
        weighting = RegionWeighting(
            num_regions, trainable=pooling == "remap", name=f"region_weights_{i}", **head
        )
        return weighting(regions)
    if pooling == "mac":
        return MACPooling(name=f"mac_{i}", **head)(feature_map)
    if pooling == "spoc":
        return SPoCPooling(name=f"spoc_{i}", **head)(feature_map)
    return GeMPooling(p=gem_p, name=f"gem_{i}", **head)(feature_map)


def _check_input_shape(input_shape) -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise InvalidInputError(
            f"`input_shape` must be (height, width, 3), received {input_shape!r}."
        )
    for size in shape[:2]:
        if size is not None and (int(size) != size or size < MIN_IMAGE_SIZE):
            raise InvalidInputError(
                f"`input_shape` sizes must be None or >= {MIN_IMAGE_SIZE}, received "
                f"{input_shape!r}."
            )
    return shape


def multiscale_descriptors(model: keras.Model, pixels, long_sides, fixed_size=None):
    """Descriptors of images embedded at several sizes, summed and L2-normalised.

    The one multi-scale rule of the project (the exported graph's ``--scales``, ``remap
    evaluate --scales`` and ``bench.quality`` use it): each image is resized to every long
    side (aspect kept, `remap_tf.ops.resize_images`), embedded, and the float32 descriptors
    are summed and re-normalised, as cirtorch's multi-scale evaluation does (scales 1,
    1/sqrt(2), sqrt(2); Radenović et al., TPAMI 2018). One size is the single-scale
    descriptor, unchanged.

    Args:
        model: images ``(batch, h, w, 3)`` RGB 0-255 -> ``(batch, dim)`` descriptors.
        pixels: ``(batch, height, width, 3)`` images of one size, any real dtype.
        long_sides: the long side at every scale, e.g. ``[362, 512, 724]``.
        fixed_size: ``(height, width)`` for a model with a fixed input (one size only).

    Returns:
        ``(batch, dim)`` float32 tensor.
    """
    descriptors = [
        tf.cast(model(resize_images(pixels, side, fixed_size), training=False), tf.float32)
        for side in long_sides
    ]
    if len(descriptors) == 1:
        return descriptors[0]
    return l2_normalize(tf.add_n(descriptors))


def region_weighting_layers(model: keras.Model) -> list[RegionWeighting]:
    """The `RegionWeighting` layers of ``model``, one per tap, in tap order."""
    layers = [layer for layer in model.layers if isinstance(layer, RegionWeighting)]
    return sorted(layers, key=lambda layer: int(layer.name.rsplit("_", 1)[-1]))


def get_region_weights(model: keras.Model) -> np.ndarray:
    """Region weights ``(num_taps, num_regions)`` of a remap or rmac model."""
    layers = region_weighting_layers(model)
    if not layers:
        raise InvalidInputError(
            f"Model {model.name!r} has no region weights (pooling is not remap)."
        )
    return np.stack([np.asarray(layer.region_weights.numpy()) for layer in layers])


def set_region_weights(model: keras.Model, values) -> None:
    """Sets the region weights from ``values`` ``(num_taps, num_regions)``, all >= 0."""
    layers = region_weighting_layers(model)
    values = np.asarray(values, dtype=np.float32)
    want = (len(layers), layers[0].num_regions) if layers else None
    if want is None or values.shape != want:
        raise InvalidInputError(f"Region weights must have shape {want}, received {values.shape}.")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InvalidInputError("Region weights must be finite and non-negative.")
    for layer, row in zip(layers, values, strict=True):
        layer.region_weights.assign(row)


def region_model(model: keras.Model) -> keras.Model:
    """A model from images to the per-tap region vectors ``[(b, regions, c_i), ...]``."""
    layers = [layer for layer in model.layers if isinstance(layer, RegionMaxPooling)]
    if not layers:
        raise InvalidInputError(
            f"Model {model.name!r} has no region pooling (pooling is not remap)."
        )
    layers.sort(key=lambda layer: int(layer.name.rsplit("_", 1)[-1]))
    return keras.Model(model.input, [layer.output for layer in layers], name="regions")


def pre_whitening_model(model: keras.Model) -> keras.Model:
    """A model from images to the concatenated layer descriptors fed to the whitening."""
    return keras.Model(model.input, model.get_layer(CONCAT_LAYER).output, name="pre_whitening")


def whitening_layer(model: keras.Model) -> Whitening:
    return model.get_layer(WHITENING_LAYER)


def batch_predictor(model: keras.Model, part: str):
    """A function ``images (b, h, w, 3) -> outputs`` (NumPy; a list for several taps) of
    ``part`` of ``model`` in inference mode: ``"regions"`` (`region_model`) or
    ``"pre_whitening"`` (`pre_whitening_model`), for batches of any size and images of any
    size the model accepts. Inputs are cast to float32 (the model's RGB 0-255 input).

    Traced once per model and part, for an unknown batch and image size, and kept while
    the model lives: ``model.predict_on_batch`` traces again for every new input shape,
    which a stream of mixed-size batches would pay on every batch.
    """
    parts = _PREDICTORS.setdefault(model, {})
    if part not in parts:
        builders = {"regions": region_model, "pre_whitening": pre_whitening_model}
        extractor = builders[part](model)
        signature = tf.TensorSpec((None, *extractor.input_shape[1:]), tf.float32)
        forward = tf.function(
            lambda images: extractor(images, training=False), input_signature=[signature]
        )

        def predict(images):
            outputs = forward(tf.cast(images, tf.float32))
            if isinstance(outputs, (list, tuple)):
                return [np.asarray(output) for output in outputs]
            return np.asarray(outputs)

        parts[part] = predict
    return parts[part]
