"""Image geometry (aspect, crop, pad) and the light training augmentation, as TF ops.

Geometry (``geometry``):

- ``"aspect"`` (the default): the geometry an exported model sees. Evaluation images are
  resized, aspect kept, so that their long side is ``image_size`` (`remap_tf.ops
  .resized_shape`, the rule the exported graph uses; `resize_long_side`). Training batches take one
  aspect ratio each (4:3, 1:1 or 3:4, drawn per batch by `batch_shape`), long side
  ``image_size``: every image is cropped to that aspect (in training a random crop of
  `MIN_CROP_AREA`-100% of the largest such rectangle, the whole middle one otherwise;
  `aspect_crop`) and resized, never stretched.
- ``"crop"`` resizes the shorter side to ``image_size`` and crops the centre square (a random
  square in training); ``"pad"`` resizes the longer side and pads with black to a square
  (`to_square`).

Training augmentation (`augment_image`: light, seeded per image with stateless random ops, so the
same seed gives the same batches): the random crop above (25-100% of the largest rectangle of
the batch's aspect; ``"crop"``/``"pad"``: 80-100% of each side), a horizontal flip, brightness
+-10%, contrast and saturation x[0.9, 1.1].
"""

from __future__ import annotations

import tensorflow as tf

from remap_tf.ops import resized_shape
from remap_tf.training.config import MIN_CROP_AREA

GEOMETRIES = ("aspect", "crop", "pad")
# Width / height of a training batch in "aspect" geometry: one of these per batch.
BATCH_ASPECTS = (4 / 3, 1.0, 3 / 4)


def to_square(image, size: int, square: str, crop_seed=None):
    """Float ``(h, w, 3)`` -> ``(size, size, 3)`` keeping the aspect ratio (see module doc)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    if square == "pad":
        return tf.image.resize_with_pad(image, size, size, antialias=True)
    scale = float(size) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.math.ceil(shape * scale), tf.int32), size)
    image = tf.image.resize(image, new, antialias=True)
    if crop_seed is None:
        top = (new[0] - size) // 2
        left = (new[1] - size) // 2
        return tf.slice(image, [top, left, 0], [size, size, 3])
    return tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)


def batch_shape(long_side: int, seed: int, step, aspects=BATCH_ASPECTS):
    """``(height, width)`` of training batch ``step`` in "aspect" geometry: one of ``aspects``
    (width / height), drawn per batch from ``(seed, step)``."""
    shapes = [
        (round(long_side / a), long_side) if a >= 1 else (long_side, round(long_side * a))
        for a in aspects
    ]
    pick = tf.random.stateless_uniform(
        [], tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)]), 0,
        len(shapes), dtype=tf.int64,
    )  # fmt: skip
    return tf.gather(tf.constant(shapes, tf.int32), pick)


def aspect_crop(image, size, seed=None, min_area: float = MIN_CROP_AREA):
    """A crop of ``image`` with the aspect of ``size`` = ``(h, w)``, resized to ``size``.

    The crop is the largest rectangle of that aspect inside the image, shrunk to a random
    ``min_area``-100% of its area at a random place when ``seed`` is given (in the middle,
    whole, otherwise).
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.cast(size, tf.float32)
    fit = tf.reduce_min(shape / target)  # the largest rectangle of this aspect
    if seed is not None:
        seeds = tf.random.experimental.stateless_split(seed, num=2)
        area = tf.random.stateless_uniform([], seeds[0], min_area, 1.0)
        fit = fit * tf.sqrt(area)
    crop = tf.maximum(tf.cast(tf.round(target * fit), tf.int32), 1)
    crop = tf.minimum(crop, tf.shape(image)[:2])
    if seed is not None:
        image = tf.image.stateless_random_crop(image, tf.concat([crop, [3]], 0), seed=seeds[1])
    else:
        offset = (tf.shape(image)[:2] - crop) // 2
        image = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([crop, [3]], 0))
    return tf.image.resize(tf.cast(image, tf.float32), size, antialias=True)


def resize_long_side(image, size: int):
    """The whole image, aspect kept, long side ``size`` (the exported graph's rule)."""
    shape = tf.shape(image)
    target = tf.stack(resized_shape(shape[0], shape[1], size))
    return tf.clip_by_value(
        tf.image.resize(tf.cast(image, tf.float32), target, antialias=True), 0, 255
    )


def _jitter(image, seeds):
    """Flip, brightness, contrast and saturation of a float 0-255 image."""
    image = tf.image.stateless_random_flip_left_right(image, seeds[0]) / 255.0
    image = tf.image.stateless_random_brightness(image, 0.1, seeds[1])
    jitter = tf.random.stateless_uniform([2], seeds[2], minval=0.9, maxval=1.1)
    mean = tf.reduce_mean(image, axis=[0, 1, 2], keepdims=True)
    image = (image - mean) * jitter[0] + mean  # contrast
    gray = tf.reduce_mean(image, axis=2, keepdims=True)
    image = (image - gray) * jitter[1] + gray  # saturation
    return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def augment_image(image, size, geometry: str, seed, min_area: float = MIN_CROP_AREA):
    """Light augmentation of one uint8 image with stateless ops; returns float32 0-255.

    ``size`` is the batch's ``(h, w)`` in "aspect" geometry, the square's side otherwise.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    if geometry == "aspect":
        image = aspect_crop(image, size, seed=seeds[0], min_area=min_area)
        return _jitter(image, seeds[3:])
    shape = tf.shape(image)[:2]
    fraction = tf.random.stateless_uniform([], seeds[0], minval=0.8, maxval=1.0)
    crop = tf.maximum(tf.cast(tf.cast(shape, tf.float32) * fraction, tf.int32), 1)
    image = tf.image.stateless_random_crop(image, tf.concat([crop, [3]], 0), seed=seeds[1])
    image = to_square(tf.cast(image, tf.float32), size, geometry, crop_seed=seeds[2])
    return _jitter(image, seeds[3:])
