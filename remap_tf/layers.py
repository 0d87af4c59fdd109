"""Keras 3 layers of the REMAP head and of the baselines (MAC, SPoC, GeM, R-MAC).

Every layer wraps a pure function of `remap_tf.ops`, lists all of its arguments in
``get_config`` and is registered for serialization, so models save to ``.keras`` and load
with ``safe_mode=True``.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf

from remap_tf import ops
from remap_tf.checks import check_choice
from remap_tf.contract import KERAS_PACKAGE
from remap_tf.errors import InvalidInputError
from remap_tf.regions import distinct_regions, min_distinct_long_side, relative_regions

# Per-channel means of the Caffe-trained ImageNet models, in BGR order.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("caffe", "tf", "torch", "none")


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw RGB in [0, 255] to what a backbone was trained on, inside the model.

    Modes follow ``keras.applications``' ``preprocess_input``: ``"caffe"`` (RGB->BGR, minus
    the ImageNet mean; VGG, ResNet), ``"tf"`` (scale to [-1, 1]; MobileNet), ``"torch"`` (to
    [0, 1], minus mean, over std) and ``"none"`` (the backbone rescales itself, as
    EfficientNetV2 does).

    Call arguments:
        images: ``(batch, height, width, 3)`` RGB, 0-255, any float or integer dtype.

    Returns:
        ``(batch, height, width, 3)`` in the layer's compute dtype.
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        self.mode = check_choice("preprocessing mode", mode, PREPROCESSING_MODES)

    def call(self, images):
        x = tf.cast(ops.check_feature_map(images, "images"), tf.float32)
        if self.mode == "caffe":
            x = x[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            x = (x / 255.0 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
        return tf.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class RegionMaxPooling(keras.layers.Layer):
    """Max-pools a feature map in the R-MAC multi-scale regions, then L2-normalises each.

    The region grid is fixed once on a reference map of ``grid_shape`` and scaled to the
    incoming map (see `remap_tf.regions`), so the region count and order are the same for
    every input size.

    Args:
        levels: number of R-MAC scales ``L`` (4 gives 40 regions on the default grid).
        grid_shape: reference feature-map ``(height, width)``; (24, 32) is a 1024×768 image
            at stride 32.
        normalize: L2-normalise every region vector.

    Call arguments:
        features: ``(batch, height, width, channels)``.

    Returns:
        ``(batch, regions, channels)``.

    Reference: Tolias, Sicre & Jégou, "Particular object retrieval with integral
    max-pooling of CNN activations", ICLR 2016.
    """

    def __init__(self, levels: int = 4, grid_shape=(24, 32), normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.levels = levels
        self.grid_shape = tuple(int(v) for v in grid_shape)
        self.normalize = normalize
        # Validates levels and grid_shape now, not at the first call.
        self._relative = relative_regions(levels, self.grid_shape)

    @property
    def num_regions(self) -> int:
        return int(self._relative.shape[0])

    def build(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        if height is not None and width is not None:
            warn_if_regions_collide(self._relative, height, width, self.levels, self.grid_shape)

    def call(self, features):
        return ops.region_max_pool(features, self._relative, normalize=self.normalize)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_regions, input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "levels": self.levels,
            "grid_shape": list(self.grid_shape),
            "normalize": self.normalize,
        }


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class RegionGeMPooling(RegionMaxPooling):
    """Regional GeM: GeM pooling with a learnable exponent inside each R-MAC region.

    The same region grid as `RegionMaxPooling` (it is one, for `remap_tf.model.region_model`
    and the KL initialisation), with each region pooled by ``(mean x^p)^(1/p)`` instead of
    the max: ``p = 1`` is average pooling, ``p -> inf`` max pooling. One exponent per layer
    (per tap), initialised at ``p``, trained end to end and kept ``>= 1`` by a constraint
    applied after every optimiser step. Computed in float32 under any dtype policy.

    Args:
        levels: number of R-MAC scales ``L``.
        grid_shape: reference feature-map ``(height, width)``.
        normalize: L2-normalise every region vector.
        p: initial exponent (3, as GeM's).
        trainable_p: learn ``p`` with the rest of the model.
        epsilon: lower clip applied before the power.

    Call arguments:
        features: ``(batch, height, width, channels)``.

    Returns:
        ``(batch, regions, channels)``.

    Reference: Radenović, Tolias & Chum, TPAMI 2018 (GeM); Tolias, Sicre & Jégou, ICLR 2016
    (the regions).
    """

    def __init__(
        self,
        levels: int = 4,
        grid_shape=(24, 32),
        normalize: bool = True,
        p: float = 3.0,
        trainable_p: bool = True,
        epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(levels, grid_shape, normalize, **kwargs)
        self.p = _check_gem_p(p)
        self.trainable_p = trainable_p
        self.epsilon = epsilon

    def build(self, input_shape):
        super().build(input_shape)
        self.gem_p = _add_gem_p(self, self.p, self.trainable_p)

    def call(self, features):
        return ops.region_gem_pool(
            features, self._relative, self.gem_p, self.epsilon, normalize=self.normalize
        )

    def get_config(self):
        return {
            **super().get_config(),
            "p": self.p,
            "trainable_p": self.trainable_p,
            "epsilon": self.epsilon,
        }


def _check_gem_p(p) -> float:
    try:
        value = None if isinstance(p, bool) else float(p)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0:
        raise InvalidInputError(f"GeM exponent `p` must be > 0, received {p!r}.")
    return value


def _add_gem_p(layer: keras.layers.Layer, p: float, trainable: bool):
    """The scalar float32 GeM exponent of ``layer``, initialised at ``p``."""
    return layer.add_weight(
        name="p",
        shape=(),
        initializer=keras.initializers.Constant(p),
        # p stays >= 1 so that the pooling stays between average and max.
        constraint=lambda v: tf.maximum(v, 1.0),
        trainable=trainable,
        dtype="float32",
    )


class RegionGridWarning(UserWarning):
    """A feature map too small for the region grid: some regions are the same cells."""


def warn_if_regions_collide(relative, height: int, width: int, levels: int, grid_shape) -> bool:
    """Warns (`RegionGridWarning`) when regions coincide on a ``height x width`` map.

    Duplicate regions give identical vectors: their weights act as one weight and training
    cannot tell them apart. Returns True when it warned.
    """
    distinct = distinct_regions(relative, int(height), int(width))
    if distinct == len(relative):
        return False
    cells = min_distinct_long_side(int(levels), tuple(grid_shape))
    warnings.warn(
        f"On a {height}x{width} feature map only {distinct} of the {len(relative)} regions "
        f"(levels={levels}) differ; duplicates cannot be told apart in training. Maps need a "
        f"long side of at least {cells} cells, about {32 * cells} px at stride 32 "
        "(ResNet, VGG, MobileNet).",
        RegionGridWarning,
        stacklevel=3,
    )
    return True


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class RegionWeighting(keras.layers.Layer):
    """REMAP's region entropy weighting: a non-negative weighted sum of region vectors.

    One learnable weight per region, kept non-negative by a `keras.constraints.NonNeg`
    constraint applied after every optimiser step. Initialised to 1 (which makes the layer
    R-MAC's plain sum) and typically set from KL divergences with
    `remap_tf.region_weights.init_region_weights`. Built with ``trainable=False`` it is
    R-MAC.

    Args:
        num_regions: number of regions (must match the incoming tensor).
        normalize: L2-normalise the weighted sum.

    Call arguments:
        regions: ``(batch, regions, channels)``.

    Returns:
        ``(batch, channels)``.

    Reference: Husain & Bober, "REMAP: Multi-layer entropy-guided pooling of dense CNN
    features for image retrieval", IEEE TIP 2019.
    """

    def __init__(self, num_regions: int, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_regions, bool) or int(num_regions) != num_regions or num_regions < 1:
            raise InvalidInputError(
                f"`num_regions` must be a positive integer, received {num_regions!r}"
            )
        self.num_regions = int(num_regions)
        self.normalize = normalize

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] != self.num_regions:
            raise InvalidInputError(
                f"{self.name} expects {self.num_regions} regions, received input shape "
                f"{tuple(input_shape)}."
            )
        self.region_weights = self.add_weight(
            name="region_weights",
            shape=(self.num_regions,),
            initializer="ones",
            constraint=keras.constraints.NonNeg(),
            trainable=True,
        )

    def call(self, regions):
        summed = ops.weighted_region_sum(regions, self.region_weights)
        return ops.l2_normalize(summed) if self.normalize else summed

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {
            **super().get_config(),
            "num_regions": self.num_regions,
            "normalize": self.normalize,
        }


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class MACPooling(keras.layers.Layer):
    """MAC: global max pooling, ``(batch, h, w, c) -> (batch, c)``, then L2 normalisation."""

    def call(self, features):
        return ops.l2_normalize(ops.mac(features))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class SPoCPooling(keras.layers.Layer):
    """SPoC: global average pooling, ``(batch, h, w, c) -> (batch, c)``, then L2 norm."""

    def call(self, features):
        return ops.l2_normalize(ops.spoc(features))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class GeMPooling(keras.layers.Layer):
    """GeM pooling with a learnable exponent ``p``, then L2 normalisation.

    Args:
        p: initial exponent (3 as in Radenović et al.); ``p = 1`` is average pooling.
        trainable_p: learn ``p`` with the rest of the model.
        epsilon: lower clip applied before the power.

    Call arguments:
        features: ``(batch, height, width, channels)``.

    Returns:
        ``(batch, channels)``.

    Reference: Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
    annotation", TPAMI 2018.
    """

    def __init__(self, p: float = 3.0, trainable_p: bool = True, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p = _check_gem_p(p)
        self.trainable_p = trainable_p
        self.epsilon = epsilon

    def build(self, input_shape):
        self.gem_p = _add_gem_p(self, self.p, self.trainable_p)

    def call(self, features):
        return ops.l2_normalize(ops.gem(features, self.gem_p, self.epsilon))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "p": self.p,
            "trainable_p": self.trainable_p,
            "epsilon": self.epsilon,
        }


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class L2Normalization(keras.layers.Layer):
    """L2-normalises along ``axis`` with the norm computed in float32."""

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, inputs):
        return ops.l2_normalize(inputs, axis=self.axis)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class Whitening(keras.layers.Layer):
    """PCA whitening as an affine layer, ``x -> x @ kernel + bias``, computed in float32.

    Starts as the identity (truncated to ``units`` columns when ``units`` is smaller than the
    input) and is set from data with `set_whitening` (see `remap_tf.whitening` for learned
    whitening from matching pairs and plain PCA whitening). It then stays trainable, so the
    whitening is fine-tuned end to end with the rest of the model.

    Args:
        units: output dimension, or None to keep the input dimension.
        selection: how the whitening was chosen, when `remap_tf.whitening.select_whitening`
            chose it (the choice and the held-out mAP of every candidate), or None; saved with
            the model so the choice travels with it.

    Call arguments:
        inputs: ``(batch, input_dim)``.

    Returns:
        ``(batch, units)``.

    Reference: Radenović, Tolias & Chum, TPAMI 2018 (learned whitening).
    """

    def __init__(self, units: int | None = None, selection: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.selection = selection
        if units is not None and (int(units) != units or units < 1):
            raise InvalidInputError(
                f"`units` must be a positive integer or None, received {units!r}"
            )
        self.units = None if units is None else int(units)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise InvalidInputError(
                f"{self.name} needs a known last dimension, received {input_shape}"
            )
        units = self.units or input_dim
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, units),
            initializer=keras.initializers.Identity(),
            dtype="float32",
        )
        self.bias = self.add_weight(name="bias", shape=(units,), initializer="zeros")

    def call(self, inputs):
        y = tf.matmul(tf.cast(inputs, tf.float32), tf.cast(self.kernel, tf.float32))
        y = y + tf.cast(self.bias, tf.float32)
        return tf.cast(y, self.compute_dtype)

    def set_whitening(self, kernel, bias) -> None:
        """Sets the projection: ``kernel`` ``(input_dim, units)`` and ``bias`` ``(units,)``."""
        kernel = np.asarray(kernel, dtype=np.float32)
        bias = np.asarray(bias, dtype=np.float32)
        want = tuple(self.kernel.shape)
        if kernel.shape != want or bias.shape != (want[1],):
            raise InvalidInputError(
                f"{self.name}: expected kernel {want} and bias ({want[1]},), received "
                f"{kernel.shape} and {bias.shape}."
            )
        self.kernel.assign(kernel)
        self.bias.assign(bias)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units or input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "units": self.units, "selection": self.selection}
