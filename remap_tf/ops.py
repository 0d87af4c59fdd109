"""Pure tensor functions behind the pooling layers.

Feature maps are ``(batch, height, width, channels)``; region tensors are
``(batch, regions, channels)``. Norms, powers and sums of squares are computed in float32
whatever the input dtype (mixed precision), and the result is cast back to the input dtype.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from remap_tf.contract import MIN_IMAGE_SIZE
from remap_tf.errors import InvalidInputError
from remap_tf.regions import ROUNDING_SLACK, scale_regions

# Floor of the max-abs scale: far below any real activation (float32's smallest normal is
# 1.2e-38), so it only keeps an all-zero vector at zero instead of producing NaN.
_TINY = 1e-30


def check_feature_map(features, name: str = "features"):
    """Returns ``features`` as a tensor; ValueError unless it is ``(batch, h, w, channels)``."""
    try:
        rank = len(features.shape)
    except (TypeError, ValueError):  # a tf.TensorShape of unknown rank
        rank = None
    if rank is not None and rank != 4:
        raise InvalidInputError(
            f"`{name}` must have rank 4 (batch, height, width, channels), received shape "
            f"{tuple(features.shape)} (rank {rank})."
        )
    return tf.convert_to_tensor(features)


def l2_normalize(x, axis: int = -1):
    """L2-normalises ``x`` along ``axis`` in float32, whatever the scale of ``x``.

    ``x`` is first divided by its largest absolute value, so the sum of squares is between 1
    and the length of the axis: activations of 1e-10 (a random-init backbone) or 1e4 give unit
    vectors alike, where an epsilon on the sum of squares (``tf.math.l2_normalize``'s 1e-12)
    dominates small activations and squares overflow float16. An all-zero vector stays zero.
    """
    x = tf.convert_to_tensor(x)
    x32 = tf.cast(x, tf.float32)
    scale = tf.maximum(tf.reduce_max(tf.abs(x32), axis=axis, keepdims=True), _TINY)
    y = tf.math.l2_normalize(x32 / scale, axis=axis, epsilon=_TINY)
    return tf.cast(y, x.dtype)


def resized_shape(height, width, long_side: int):
    """Target ``(height, width)`` with the long side ``long_side``, aspect kept.

    Both sides are at least `remap_tf.contract.MIN_IMAGE_SIZE` (very elongated images are
    stretched to it). The one resize rule of the project: the exported graph and the training
    and evaluation pipelines use it, so the model sees the same geometry everywhere.

    Args:
        height, width: scalar int tensors (or ints), the image size.
        long_side: the target long side.

    Returns:
        two int32 scalar tensors.
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    scale = tf.cast(long_side, tf.float64) / tf.maximum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), MIN_IMAGE_SIZE)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), MIN_IMAGE_SIZE)
    return new_h, new_w


def resize_images(pixels, long_side: int | None, fixed_size=None):
    """Resizes RGB images for the model (bilinear with antialiasing), to float32 0-255.

    Args:
        pixels: ``(batch, height, width, 3)`` or ``(height, width, 3)``, any real dtype.
        long_side: the long side after resizing (aspect kept), when ``fixed_size`` is None.
        fixed_size: ``(height, width)`` to resize to exactly (models with a fixed input).

    Returns:
        float32 images of the same rank, values 0-255.
    """
    pixels = tf.convert_to_tensor(pixels)
    shape = tf.shape(pixels)
    if fixed_size is not None:
        size = tf.constant(fixed_size, tf.int32)
    else:
        size = tf.stack(resized_shape(shape[-3], shape[-2], long_side))
    resized = tf.image.resize(tf.cast(pixels, tf.float32), size, antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def mac(features):
    """MAC: global max pooling, ``(batch, h, w, c) -> (batch, c)`` (Tolias et al. 2016)."""
    features = check_feature_map(features)
    return tf.reduce_max(features, axis=[1, 2])


def spoc(features):
    """SPoC: global sum (here mean) pooling, ``(batch, h, w, c) -> (batch, c)``.

    Babenko & Lempitsky, ICCV 2015. The mean differs from the sum by a constant factor per
    image, which the L2 normalisation that follows removes.
    """
    features = check_feature_map(features)
    return tf.reduce_mean(features, axis=[1, 2])


def gem(features, p, epsilon: float = 1e-6):
    """GeM: generalised mean pooling ``(mean x^p)^(1/p)`` (Radenović et al., TPAMI 2018).

    ``p = 1`` is average pooling and ``p -> inf`` tends to max pooling. Values are clipped to
    ``epsilon`` first so the power is defined for post-ReLU zeros.
    """
    features = check_feature_map(features)
    x = tf.maximum(tf.cast(features, tf.float32), epsilon)
    p = tf.cast(p, tf.float32)
    pooled = tf.pow(tf.reduce_mean(tf.pow(x, p), axis=[1, 2]), 1.0 / p)
    return tf.cast(pooled, features.dtype)


def region_bounds(relative: np.ndarray, height, width):
    """Integer region bounds for a map of (possibly dynamic) size ``height × width``.

    The graph version of `remap_tf.regions.scale_regions`; identical results.

    Returns:
        int32 tensor ``(regions, 4)`` of ``(top, left, bottom, right)``.
    """
    size = tf.cast(tf.stack([height, width, height, width]), tf.float64)
    scaled = tf.constant(relative, tf.float64) * size
    start = tf.floor(scaled[:, :2] + ROUNDING_SLACK)
    end = tf.math.ceil(scaled[:, 2:] - ROUNDING_SLACK)
    start = tf.minimum(start, size[:2] - 1)
    end = tf.clip_by_value(tf.maximum(end, start + 1), tf.ones_like(size[:2]), size[:2])
    return tf.cast(tf.concat([start, end], axis=1), tf.int32)


def region_max_pool(features, relative: np.ndarray, normalize: bool = True):
    """Max-pools a feature map inside each region: ``(b, h, w, c) -> (b, regions, c)``.

    Args:
        features: ``(batch, height, width, channels)`` feature map (height and width may be
            dynamic).
        relative: ``(regions, 4)`` relative region grid from
            `remap_tf.regions.relative_regions`.
        normalize: L2-normalise each region vector (REMAP and R-MAC do).

    Returns:
        ``(batch, regions, channels)``, in the dtype of ``features``.
    """
    features = check_feature_map(features)
    pooled = [
        tf.reduce_max(features[:, top:bottom, left:right, :], axis=[1, 2])
        for top, left, bottom, right in _region_bounds_list(features, relative)
    ]
    regions = tf.stack(pooled, axis=1)
    return l2_normalize(regions, axis=-1) if normalize else regions


def region_gem_pool(features, relative: np.ndarray, p, epsilon: float = 1e-6, normalize=True):
    """Regional GeM: GeM pooling inside each region, ``(b, h, w, c) -> (b, regions, c)``.

    Each region vector is ``(mean over the region of x^p)^(1/p)``: ``p = 1`` is regional
    average pooling and ``p -> inf`` tends to `region_max_pool` (R-MAC's max). Computed in
    float32 (the power overflows float16), values clipped to ``epsilon`` first as in `gem`.

    Args:
        features: ``(batch, height, width, channels)`` feature map (dynamic sizes allowed).
        relative: ``(regions, 4)`` relative region grid (`remap_tf.regions.relative_regions`).
        p: the exponent, a scalar (a Python float or a trainable variable).
        epsilon: lower clip before the power.
        normalize: L2-normalise each region vector.

    Returns:
        ``(batch, regions, channels)``, in the dtype of ``features``.

    Reference: Radenović, Tolias & Chum, TPAMI 2018 (GeM), on the R-MAC regions of Tolias,
    Sicre & Jégou, ICLR 2016.
    """
    features = check_feature_map(features)
    p = tf.cast(p, tf.float32)
    powered = tf.pow(tf.maximum(tf.cast(features, tf.float32), epsilon), p)
    pooled = [
        tf.reduce_mean(powered[:, top:bottom, left:right, :], axis=[1, 2])
        for top, left, bottom, right in _region_bounds_list(features, relative)
    ]
    regions = tf.pow(tf.stack(pooled, axis=1), 1.0 / p)
    regions = l2_normalize(regions, axis=-1) if normalize else regions
    return tf.cast(regions, features.dtype)


def _region_bounds_list(features, relative):
    """``(top, left, bottom, right)`` per region: ints for a static map, else scalar tensors."""
    relative = np.asarray(relative, dtype=np.float64)
    if relative.ndim != 2 or relative.shape[1] != 4:
        raise InvalidInputError(
            f"`relative` must have shape (regions, 4), received {relative.shape}."
        )
    height, width = features.shape[1], features.shape[2]
    if height is not None and width is not None:
        # Static shape: the bounds are Python ints and the slices are static (XLA friendly).
        return scale_regions(relative, height, width).tolist()
    dyn = tf.shape(features)
    bounds = region_bounds(relative, dyn[1], dyn[2])
    return [tf.unstack(row) for row in tf.unstack(bounds, num=len(relative))]


def weighted_region_sum(regions, weights):
    """``sum_r weights[r] * regions[:, r, :]``: ``(b, regions, c), (regions,) -> (b, c)``."""
    regions = tf.convert_to_tensor(regions)
    weights = tf.cast(weights, tf.float32)
    summed = tf.einsum("brc,r->bc", tf.cast(regions, tf.float32), weights)
    return tf.cast(summed, regions.dtype)
