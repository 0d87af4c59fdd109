"""Labelled image batches from an in-memory array or from a stream, for the initialisations.

`remap_tf.region_weights.init_region_weights` and `remap_tf.whitening.init_whitening` take
their images either as one array ``(num_images, height, width, 3)`` with a label array, or as
a *stream*: a ``tf.data.Dataset`` or any other iterable (a generator, an iterator) of
``(images, labels)`` batches, read once. Batches may differ in size and in image size.
Lists and tuples are arrays, as before. NumPy only: a dataset's tensors are read with
``np.asarray``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from remap_tf.checks import check_int
from remap_tf.errors import InvalidInputError


def is_stream(images) -> bool:
    """True for a ``tf.data.Dataset``, generator or other iterable of batches; False for an
    array, a tensor, a list or a tuple (one array of images)."""
    if isinstance(images, (list, tuple, np.ndarray)) or hasattr(images, "__array__"):
        return False
    return isinstance(images, (Iterable, Iterator))


def _check_images(images, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(
            f"{where} must be (num_images, height, width, 3), received shape {images.shape}."
        )
    return images


def _check_labels(labels, count: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size != count or (labels.ndim > 1 and labels.shape[0] != count):
        raise InvalidInputError(f"{where}: {count} images but labels of shape {labels.shape}.")
    return labels.reshape(-1)


def image_array(images, labels, need_labels: bool = True):
    """Checks an in-memory ``(images, labels)``; returns them as arrays (labels may be None
    when ``need_labels`` is False)."""
    images = _check_images(images, "`images`")
    if labels is None:
        if need_labels:
            raise InvalidInputError("`labels` are needed with an array of `images`.")
        return images, None
    return images, _check_labels(labels, len(images), "`images` and `labels`")


def array_batches(images, labels, batch_size: int, rows=None):
    """``(images, labels)`` batches of ``batch_size`` from checked arrays (`image_array`),
    optionally of the given ``rows`` only; slices, so no copy of the whole array."""
    if rows is None:
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            yield images[start:end], None if labels is None else labels[start:end]
        return
    for start in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[start : start + batch_size])
        yield images[chunk], None if labels is None else labels[chunk]


def stream_batches(stream, need_labels: bool = True):
    """Checked ``(images (b, h, w, 3), labels (b,) or None)`` NumPy batches from a stream of
    ``(images, labels)`` batches (or of image batches alone when ``need_labels`` is False)."""
    for number, element in enumerate(stream):
        where = f"batch {number} of the `images` stream"
        if isinstance(element, (tuple, list)) and len(element) >= 2:
            images, labels = element[0], element[1]
        elif need_labels:
            raise InvalidInputError(f"{where} must be an (images, labels) pair.")
        else:
            images, labels = element, None
        images = _check_images(images, where)
        if labels is not None:
            labels = _check_labels(labels, len(images), where)
        yield images, labels


def labelled_batches(images, labels, batch_size: int, need_labels: bool = True):
    """``(images, labels)`` NumPy batches from an array (with ``labels``) or a stream (whose
    batches carry their labels; ``labels`` must then be None)."""
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if is_stream(images):
        if labels is not None:
            raise InvalidInputError(
                "`labels` must be None when `images` is a stream; each batch carries its labels."
            )
        return stream_batches(images, need_labels)
    images, labels = image_array(images, labels, need_labels)
    return array_batches(images, labels, batch_size)
