"""tf.data input pipelines for training and evaluation that survive bad image files.

Decoding is done by Pillow inside ``tf.numpy_function`` (run in parallel by ``map``; Pillow
releases the GIL while decoding), because a decode error inside a TensorFlow op cannot be caught
per file: here a zero-byte, truncated, corrupt or non-image file raises `BadImageError`, is
recorded once by path in a `BadFileLog`, and never stops training.

Every image becomes RGB uint8 (`decode_image_file`): grayscale is repeated over the channels,
palette and CMYK are converted, RGBA/LA/transparent palettes are composited over white, 16-bit
samples are scaled to 8 bits (``round(v / 257)``), EXIF orientation is applied, GIFs give their
first frame.

Geometry (``geometry``):

- ``"aspect"`` (the default): the geometry an exported model sees. Evaluation images are
  resized, aspect kept, so that their long side is ``image_size`` (`remap_tf.ops
  .resized_shape`, the rule the exported graph uses), one image per batch. Training batches
  take one aspect ratio each (4:3, 1:1 or 3:4, drawn per batch), long side ``image_size``:
  every image is cropped to that aspect (in training a random crop of `MIN_CROP_AREA`-100%
  of the largest such rectangle, the whole middle one otherwise) and resized, never stretched.
- ``"crop"`` resizes the shorter side to ``image_size`` and crops the centre square (a random
  square in training); ``"pad"`` resizes the longer side and pads with black to a square.

Training augmentation (light, seeded per image with stateless random ops, so the same seed gives
the same batches): the random crop above (25-100% of the largest rectangle of the batch's
aspect; ``"crop"``/``"pad"``: 80-100% of each side), a
horizontal flip, brightness +-10%, contrast and saturation x[0.9, 1.1].

Batches are class balanced, ``P x K`` (``classes_per_batch`` classes, ``images_per_class``
images of each), as in Hermans et al., "In defense of the triplet loss" (2017).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

from remap_tf.checks import check_choice, check_int
from remap_tf.errors import InvalidInputError
from remap_tf.ops import resized_shape
from remap_tf.training.data import Manifest

logger = logging.getLogger("remap.training")

GEOMETRIES = ("aspect", "crop", "pad")
# Width / height of a training batch in "aspect" geometry: one of these per batch.
BATCH_ASPECTS = (4 / 3, 1.0, 3 / 4)
# A training crop keeps this to 100% of the largest rectangle of its aspect: down to a
# quarter of the frame, so training sees the partial views retrieval queries often are.
MIN_CROP_AREA = 0.25
BAD_LABEL = -1  # the label `make_eval_dataset` gives a file it could not decode
_DRAFT_MARGIN = 1.25  # decode JPEGs at >= 1/0.8 of the target size: the random crop keeps 80%


class BadImageError(ValueError):
    """An image file that cannot be decoded; ``path`` and ``reason`` name the file and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


def decode_image_file(path, draft_size: int | None = None) -> np.ndarray:
    """Reads an image file robustly as RGB uint8.

    Args:
        path: a JPEG, PNG, GIF or BMP file (other formats Pillow reads also work).
        draft_size: when set, a large JPEG may be decoded at 1/2, 1/4 or 1/8 scale, never
            smaller than ``draft_size`` on either side (much faster for big photos).

    Returns:
        uint8 ``(height, width, 3)`` RGB (see the module docstring for the conversions).

    Raises:
        BadImageError (a ValueError): the file is missing, empty, truncated, corrupt, not an
            image, or in a mode that has no RGB conversion. The message names the path.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft(None, (int(draft_size), int(draft_size)))
            image.load()  # a truncated file fails here
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not an image file Pillow can identify") from None
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError...
        reason = str(error) or type(error).__name__
        raise BadImageError(path, f"corrupt or unsupported image ({reason})") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise InvalidInputError(f"unexpected decoded shape {rgb.shape}")
    return rgb


class BadFileLog:
    """A thread-safe record of skipped image files, each once, in the order found.

    ``add`` is called from the tf.data worker threads; `BadFileReporter` reports new entries at
    the end of each epoch.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[tuple[str, str]] = []
        self._seen: set[str] = set()

    def add(self, path, reason: str) -> bool:
        """Records ``path`` (with ``reason``); returns False if it was already recorded."""
        path = os.fspath(path)
        with self._lock:
            if path in self._seen:
                return False
            self._seen.add(path)
            self._entries.append((path, str(reason)))
            return True

    def __contains__(self, path) -> bool:
        with self._lock:
            return os.fspath(path) in self._seen

    @property
    def entries(self) -> list[tuple[str, str]]:
        """``(path, reason)`` pairs in the order found."""
        with self._lock:
            return list(self._entries)

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.entries]

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def report(self) -> str:
        """A human-readable summary: the count, then one ``path: reason`` line per file."""
        entries = self.entries
        if not entries:
            return "No bad image files."
        lines = [f"{len(entries)} bad image file(s) skipped:"]
        lines += [f"  {path}: {reason}" for path, reason in entries]
        return "\n".join(lines)


class BadFileReporter(keras.callbacks.Callback):
    """Reports newly skipped image files at the end of each epoch, once each, by path.

    Each new file is printed with ``print_fn`` and logged as a warning on the
    ``"remap.training"`` logger. When logging is not configured at all (no handler anywhere),
    the log record is skipped: Python's last-resort handler would print the same line a second
    time. ``logs["bad_files"]`` gets the total count so far (so History and TensorBoard record
    it).

    Args:
        log: the `BadFileLog` given to the datasets.
        print_fn: where the lines are printed (default `print`; None to only log).

    Example:
        >>> bad = BadFileLog()
        >>> model.fit(make_train_dataset(manifest, bad_files=bad), steps_per_epoch=100,
        ...           callbacks=[BadFileReporter(bad)])
    """

    def __init__(self, log: BadFileLog, print_fn=print):
        super().__init__()
        if not isinstance(log, BadFileLog):
            raise InvalidInputError(f"`log` must be a BadFileLog, received {type(log).__name__}.")
        self.log = log
        self.print_fn = print_fn
        self._reported = 0

    def _report_new(self, when: str) -> None:
        entries = self.log.entries
        # Keras' progress bar (verbose=1) leaves its line open until after this callback.
        newline = "\n" if (self.params or {}).get("verbose") == 1 else ""
        for path, reason in entries[self._reported :]:
            message = f"Skipped bad image file {path} ({reason}) [{when}]"
            if self.print_fn is None or logger.hasHandlers():
                logger.warning(message)
            if self.print_fn is not None:
                self.print_fn(newline + message)
                newline = ""
        self._reported = len(entries)

    def on_epoch_end(self, epoch, logs=None):
        self._report_new(f"epoch {epoch + 1}")
        if logs is not None:
            logs["bad_files"] = self.log.count

    def on_train_end(self, logs=None):
        self._report_new("end of training")


class _ExitGate:
    """Lets interpreter exit proceed while tf.data threads are still calling into Python.

    A live iterator over these datasets at exit (a global, or one held by the traceback of
    an exception or Ctrl-C) would hang the process: its prefetch threads call the Python
    decoder, and during finalisation a thread that needs the GIL blocks forever while the main
    thread waits for it. At exit (`atexit`, while Python still runs normally) the gate closes:
    calls in flight finish, later calls return at once with a placeholder, and the prefetch
    buffers fill up so the threads go idle before finalisation starts.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._active = 0
        self._last_call = 0.0
        self.closed = False

    def enter(self) -> bool:
        with self._condition:
            self._last_call = time.monotonic()
            if self.closed:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._condition:
            self._active -= 1
            self._last_call = time.monotonic()
            self._condition.notify_all()

    def close(self, quiet: float = 0.5, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._condition:
            self.closed = True
            while time.monotonic() < deadline:
                idle = time.monotonic() - self._last_call
                if self._active == 0 and idle >= quiet:
                    return
                self._condition.wait(timeout=max(quiet - idle, 0.05))


_EXIT_GATE = _ExitGate()
atexit.register(_EXIT_GATE.close)


def gated(function, placeholder):
    """``function`` behind `_EXIT_GATE`; after exit starts it returns ``placeholder()``."""

    def call(*args):
        if not _EXIT_GATE.enter():
            return placeholder()
        try:
            return function(*args)
        finally:
            _EXIT_GATE.leave()

    return call


class _Loader:
    """Python side of the decode step: decodes ``manifest.paths[index]``, recording failures.

    With ``substitute``, a bad file is replaced by another image of its class, tried in an order
    fixed by ``(seed, position)``, so a P x K batch stays balanced and deterministic.
    """

    def __init__(
        self, manifest: Manifest, bad_files: BadFileLog, seed: int, draft_size, substitute
    ):
        self.paths = manifest.paths
        self.labels = manifest.labels
        self.bad_files = bad_files
        self.seed = int(seed)
        self.draft_size = draft_size
        self.substitute = substitute
        self._members = None
        if substitute:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(manifest.num_classes + 1))
            self._members = (order, bounds)

    def _try(self, index: int):
        path = self.paths[index]
        if path in self.bad_files:
            return None
        try:
            return decode_image_file(path, self.draft_size)
        except BadImageError as error:
            self.bad_files.add(path, error.reason)
            return None

    def __call__(self, index, position):
        index = int(index)
        label = int(self.labels[index])
        image = self._try(index)
        if image is None and self.substitute:
            order, bounds = self._members
            members = order[bounds[label] : bounds[label + 1]]
            rng = np.random.default_rng([self.seed, int(position)])
            for other in rng.permutation(members):
                if other != index:
                    image = self._try(int(other))
                    if image is not None:
                        break
        if image is None:
            return np.zeros((1, 1, 3), np.uint8), np.int32(BAD_LABEL), np.bool_(False)
        return image, np.int32(label), np.bool_(True)


def _exit_placeholder():
    # "ok" so that filters downstream stop pulling and the buffers fill (see _ExitGate).
    return np.zeros((1, 1, 3), np.uint8), np.int32(0), np.bool_(True)


def _decode_op(loader: _Loader, index, position):
    image, label, ok = tf.numpy_function(
        gated(loader, _exit_placeholder),
        [index, position],
        [tf.uint8, tf.int32, tf.bool],
        stateful=False,
    )
    image.set_shape([None, None, 3])
    label.set_shape([])
    ok.set_shape([])
    return image, label, ok


def _to_square(image, size: int, square: str, crop_seed=None):
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


def _aspect_crop(image, size, seed=None, min_area: float = MIN_CROP_AREA):
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


def _long_side(image, size: int):
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


def _augment(image, size, geometry: str, seed, min_area: float = MIN_CROP_AREA):
    """Light augmentation of one uint8 image with stateless ops; returns float32 0-255.

    ``size`` is the batch's ``(h, w)`` in "aspect" geometry, the square's side otherwise.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    if geometry == "aspect":
        image = _aspect_crop(image, size, seed=seeds[0], min_area=min_area)
        return _jitter(image, seeds[3:])
    shape = tf.shape(image)[:2]
    fraction = tf.random.stateless_uniform([], seeds[0], minval=0.8, maxval=1.0)
    crop = tf.maximum(tf.cast(tf.cast(shape, tf.float32) * fraction, tf.int32), 1)
    image = tf.image.stateless_random_crop(image, tf.concat([crop, [3]], 0), seed=seeds[1])
    image = _to_square(tf.cast(image, tf.float32), size, geometry, crop_seed=seeds[2])
    return _jitter(image, seeds[3:])


def check_manifest(manifest) -> Manifest:
    if not isinstance(manifest, Manifest):
        raise InvalidInputError(
            f"`manifest` must be a training.data.Manifest (see load_manifest), received "
            f"{type(manifest).__name__}."
        )
    if len(manifest) == 0:
        raise InvalidInputError("The manifest has no images.")
    return manifest


def balanced_batch_indices(labels, classes_per_batch: int, images_per_class: int, seed: int = 0):
    """An infinite dataset of class-balanced index batches, each int64 ``(P * K,)``.

    Batch ``t`` takes ``P`` distinct classes at random, then ``K`` images of each: a random
    permutation of the class's images, cycled when the class has fewer than ``K``. All choices
    use stateless random ops seeded by ``(seed, t)``, so the stream is reproducible. Classes
    with no image are never picked.

    Args:
        labels: int ``(num_images,)`` class labels.
        classes_per_batch: ``P``; at most the number of classes present.
        images_per_class: ``K``.
        seed: the stream's seed.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    order = np.argsort(labels, kind="stable")
    classes, lengths = np.unique(labels[order], return_counts=True)
    if classes_per_batch > classes.size:
        raise InvalidInputError(
            f"`classes_per_batch`={classes_per_batch} but the data has only {classes.size} "
            "usable classes."
        )
    members = tf.RaggedTensor.from_row_lengths(
        tf.constant(order, tf.int64), tf.constant(lengths, tf.int64)
    )
    num_classes = int(classes.size)
    p, k = int(classes_per_batch), int(images_per_class)

    def batch(step):
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.constant(seed, tf.int64), step]), num=2
        )
        keys = tf.random.stateless_uniform([num_classes], seeds[0])
        chosen = tf.argsort(keys)[:p]
        rows = tf.gather(members, chosen)
        values = rows.flat_values
        noise = tf.random.stateless_uniform(tf.shape(values), seeds[1], dtype=tf.float64)
        shuffled = tf.gather(values, tf.argsort(tf.cast(rows.value_rowids(), tf.float64) + noise))
        starts = rows.row_starts()
        offsets = tf.range(k, dtype=tf.int64)[None, :] % rows.row_lengths()[:, None]
        return tf.reshape(tf.gather(shuffled, starts[:, None] + offsets), [-1])

    return tf.data.Dataset.counter(dtype=tf.int64).map(batch)


def images_from_indices(
    index_batches,
    manifest,
    *,
    batch: int,
    image_size,
    augment,
    seed,
    geometry,
    bad_files,
    aspects=BATCH_ASPECTS,
    min_area: float = MIN_CROP_AREA,
):
    """``index_batches`` (int64 ``(batch,)`` each) -> ``(images, labels)`` training batches.

    In "aspect" geometry each batch has its own shape (`batch_shape`); a batch that lost an
    image (every image of a class unreadable) is dropped rather than mixed into the next.
    """
    loader = _Loader(
        manifest,
        bad_files,
        seed,
        draft_size=int(np.ceil(image_size * _DRAFT_MARGIN)),
        substitute=True,
    )

    def load(position, index):
        image, label, ok = _decode_op(loader, index, position)
        step = position // batch
        size = batch_shape(image_size, seed, step, aspects) if geometry == "aspect" else image_size
        if augment:
            element_seed = tf.stack([tf.constant(seed, tf.int64), position])
            image = _augment(image, size, geometry, element_seed, min_area)
        elif geometry == "aspect":
            image = _aspect_crop(image, size)
        else:
            image = _to_square(tf.cast(image, tf.float32), image_size, geometry)
        return image, label, ok, step

    elements = (
        index_batches.unbatch()
        .enumerate()
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .filter(lambda image, label, ok, step: ok)
    )
    if geometry == "aspect":  # a batch holds the images of one step, all of one shape
        batches = elements.group_by_window(
            key_func=lambda image, label, ok, step: step,
            reduce_func=lambda key, window: window.batch(batch, drop_remainder=True),
            window_size=batch,
        )
    else:
        batches = elements.batch(batch, drop_remainder=True)
    return batches.map(lambda image, label, ok, step: (image, label)).prefetch(tf.data.AUTOTUNE)


def resolve_log(bad_files) -> BadFileLog:
    if bad_files is None:
        return _LoggingBadFileLog()
    if not isinstance(bad_files, BadFileLog):
        raise InvalidInputError(
            f"`bad_files` must be a BadFileLog or None, received {type(bad_files).__name__}."
        )
    return bad_files


class _LoggingBadFileLog(BadFileLog):
    """Used when the caller passes no log: each bad file is logged as soon as it is found."""

    def add(self, path, reason: str) -> bool:
        new = super().add(path, reason)
        if new:
            logger.warning("Skipped bad image file %s (%s)", os.fspath(path), reason)
        return new


def _check_shard(shard, batch: int) -> tuple[int, int]:
    try:
        num_shards, index = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"`shard` must be (num_shards, index), received {shard!r}."
        ) from None
    if num_shards < 1 or not 0 <= index < num_shards or batch % num_shards:
        raise InvalidInputError(
            f"`shard` {shard!r} needs 0 <= index < num_shards and the batch of {batch} images "
            "divisible by num_shards."
        )
    return num_shards, index


def make_train_dataset(
    manifest: Manifest,
    image_size: int = 224,
    classes_per_batch: int = 8,
    images_per_class: int = 4,
    augment: bool = True,
    seed: int = 0,
    bad_files: BadFileLog | None = None,
    geometry: str = "aspect",
    shard: tuple[int, int] | None = None,
    aspects: tuple[float, ...] = BATCH_ASPECTS,
    min_crop_area: float = MIN_CROP_AREA,
) -> tf.data.Dataset:
    """An infinite dataset of class-balanced ``P x K`` training batches.

    Classes with a single image are dropped with a warning (no positive for a triplet). A bad
    file is recorded in ``bad_files`` and replaced by another image of its class; a class whose
    images are all bad leaves its batch one image short, in which case the stream is re-batched
    (batch shapes stay static).

    Args:
        manifest: a `training.data.Manifest`.
        image_size: the long side ``S`` of the images (the side of the squares in
            ``"crop"``/``"pad"`` geometry; see the module docstring).
        classes_per_batch: ``P`` (>= 2: negatives need another class).
        images_per_class: ``K`` (>= 2: positives need another image of the class).
        augment: apply the light augmentation.
        seed: seed of the class sampling and of the augmentation.
        bad_files: a `BadFileLog` to record skipped files in; None logs each as found.
        geometry: ``"aspect"`` (default), ``"crop"`` or ``"pad"``.
        aspects: the aspect ratios (width / height) batches draw from in ``"aspect"``
            geometry; one value gives every batch the same shape.
        min_crop_area: the smallest share of the frame a training crop keeps (``"aspect"``).
        shard: ``(num_shards, index)``: keep only slice ``index`` of every global ``P x K``
            batch, for one input pipeline per worker (``(ctx.num_input_pipelines,
            ctx.input_pipeline_id)`` of a ``tf.distribute.InputContext``). All shards draw the
            same global batches (same ``seed``) and decode only their own images; with ``P``
            divisible by ``num_shards`` each shard holds whole classes. ``P * K`` must be
            divisible by ``num_shards``.

    Returns:
        a ``tf.data.Dataset`` of ``(images, labels)``: float32 ``(B, H, W, 3)`` RGB 0-255
        (``H, W`` the batch's shape, long side ``S``; ``S x S`` for squares) and
        int32 ``(B,)`` labels (indices into ``manifest.class_names``), ``B = P * K`` (divided by
        ``num_shards`` with ``shard``); repeats forever, so give ``model.fit`` a
        ``steps_per_epoch``.

    Example:
        >>> dataset = make_train_dataset(load_manifest("photos/"), image_size=224)
        >>> model.compile(optimizer="adam", loss=remap_tf.losses.TripletLoss())
        >>> model.fit(dataset, steps_per_epoch=100, epochs=10)
    """
    manifest = check_manifest(manifest).drop_small_classes(2)
    image_size = check_int("image_size", image_size, minimum=1)
    p = check_int("classes_per_batch", classes_per_batch, minimum=2)
    k = check_int("images_per_class", images_per_class, minimum=2)
    geometry = check_choice("geometry", geometry, GEOMETRIES)
    if len(manifest) == 0:
        raise InvalidInputError(
            "No class has two or more images: triplet training needs positives."
        )
    indices = balanced_batch_indices(manifest.labels, p, k, seed)
    batch = p * k
    if shard is not None:
        num_shards, index = _check_shard(shard, batch)
        batch //= num_shards
        indices = indices.map(lambda row: row[index * batch : (index + 1) * batch])
    return images_from_indices(
        indices,
        manifest,
        batch=batch,
        image_size=image_size,
        augment=bool(augment),
        seed=int(seed),
        geometry=geometry,
        bad_files=resolve_log(bad_files),
        aspects=tuple(aspects),
        min_area=float(min_crop_area),
    )


def embed_dataset(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and labels of a dataset of ``(images, labels)`` batches, in order.

    Runs ``model`` in inference mode through one ``tf.function`` that tolerates batches of
    different shapes (``reduce_retracing``), as "aspect" geometry gives, where
    ``model.predict`` would trace a new graph for every shape.

    Returns:
        ``(descriptors float32 (n, dim), labels int32 (n,))``.
    """

    @tf.function(reduce_retracing=True)
    def embed(images):
        return model(images, training=False)

    descriptors, labels = [], []
    for images, batch_labels in dataset:
        descriptors.append(np.asarray(embed(tf.cast(images, tf.float32)), np.float32))
        labels.append(np.asarray(batch_labels))
    if not descriptors:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(descriptors), np.concatenate(labels)


def make_eval_dataset(
    manifest: Manifest,
    image_size: int = 224,
    batch_size: int = 16,
    bad_files: BadFileLog | None = None,
    geometry: str = "aspect",
) -> tf.data.Dataset:
    """A finite dataset of the manifest's images in order, without augmentation.

    A bad file is recorded in ``bad_files`` and keeps its place: its image is all zeros and its
    label is `BAD_LABEL` (-1), so row ``i`` of the concatenated batches is always manifest
    image ``i``; drop rows with ``labels < 0`` before scoring.

    Args:
        manifest: a `training.data.Manifest`.
        image_size: the long side ``S`` (the square's side in ``"crop"``/``"pad"``).
        batch_size: images per batch; the last batch may be smaller. In ``"aspect"``
            geometry every image keeps its own shape, so batches hold one image.
        bad_files: a `BadFileLog`; None logs each bad file as found.
        geometry: ``"aspect"`` (default: what an exported model sees), ``"crop"`` or
            ``"pad"`` (see the module docstring).

    Returns:
        a ``tf.data.Dataset`` of ``(images float32 (b, h, w, 3) 0-255, labels int32 (b,))``.
    """
    manifest = check_manifest(manifest)
    image_size = check_int("image_size", image_size, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    geometry = check_choice("geometry", geometry, GEOMETRIES)
    loader = _Loader(manifest, resolve_log(bad_files), 0, draft_size=image_size, substitute=False)

    def load(index):
        image, label, _ = _decode_op(loader, index, index)
        if geometry == "aspect":
            return _long_side(image, image_size), label
        return _to_square(tf.cast(image, tf.float32), image_size, geometry), label

    return (
        tf.data.Dataset.range(len(manifest))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(1 if geometry == "aspect" else batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
