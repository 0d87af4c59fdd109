"""tf.data input pipelines for training and evaluation that survive bad image files.

The dataset builders, each one call: `make_train_dataset` (infinite, class-balanced ``P x K``
training batches), `make_indexed_dataset` (training batches of the images a Python function
picks, e.g. the mined tuples of `training.mining`), `make_eval_dataset` (the manifest's images
in order), and `embed_dataset` / `embed_batches` (descriptors of such a dataset, of any
image batches). They put together:

- `training.images`: decoding with Pillow, the bad-file log and its Keras callback; a bad
  file is recorded once by path in a `BadFileLog` and never stops training;
- `training.geometry`: the ``"aspect"``, ``"crop"`` and ``"pad"`` geometries and the light
  training augmentation;
- `training.sampling`: the ``P x K`` class-balanced index batches.

Decoding runs in Python (``tf.numpy_function``, in parallel under ``map``), so these datasets
pass every such call through an exit gate: a live iterator at interpreter exit would otherwise
hang the process (see `_ExitGate`).

The names of those modules that users import from here (`BadFileLog`, `BadFileReporter`,
`decode_image_file`, `balanced_batch_indices`, ...) stay importable from here.
"""

from __future__ import annotations

import atexit
import threading
import time

import numpy as np
import tensorflow as tf

from remap_tf.checks import check_choice, check_int
from remap_tf.errors import InvalidInputError
from remap_tf.training.data import Manifest
from remap_tf.training.geometry import (
    BATCH_ASPECTS,
    GEOMETRIES,
    MIN_CROP_AREA,
    aspect_crop,
    augment_image,
    batch_shape,
    resize_long_side,
    to_square,
)
from remap_tf.training.images import (
    BadFileLog,
    BadFileReporter,
    BadImageError,
    decode_image_file,
    resolve_log,
)
from remap_tf.training.sampling import balanced_batch_indices, shard_batches

__all__ = [
    "BAD_LABEL",
    "BATCH_ASPECTS",
    "GEOMETRIES",
    "MIN_CROP_AREA",
    "BadFileLog",
    "BadFileReporter",
    "BadImageError",
    "balanced_batch_indices",
    "check_manifest",
    "decode_image_file",
    "embed_batches",
    "embed_dataset",
    "make_eval_dataset",
    "make_indexed_dataset",
    "make_train_dataset",
]

BAD_LABEL = -1  # the label `make_eval_dataset` gives a file it could not decode
_DRAFT_MARGIN = 1.25  # decode JPEGs at >= 1/0.8 of the target size: the random crop keeps 80%


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


def _gated(function, placeholder):
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
        self,
        manifest: Manifest,
        bad_files: BadFileLog,
        seed: int,
        draft_size,
        substitute,
        min_classes: int = 0,
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
        # A batch needs ``min_classes`` classes that still have a readable image (a class
        # with one is enough: it stands in for the others); below that, no batch can ever be
        # made and the pipeline would wait forever, so the loader stops it (`_count_bad`).
        self.min_classes = int(min_classes)
        self._class_size = np.bincount(self.labels, minlength=manifest.num_classes)
        self._class_bad = np.zeros_like(self._class_size)
        self._bad: set[int] = set()
        self._lock = threading.Lock()

    def _try(self, index: int):
        path = self.paths[index]
        if path in self.bad_files:
            self._count_bad(index)
            return None
        try:
            return decode_image_file(path, self.draft_size)
        except BadImageError as error:
            self.bad_files.add(path, error.reason)
            self._count_bad(index)
            return None

    def _count_bad(self, index: int) -> None:
        if not self.min_classes:
            return
        with self._lock:  # every bad file, new or not, asks again: a new iterator must stop too
            if index not in self._bad:
                self._bad.add(index)
                self._class_bad[self.labels[index]] += 1
            alive = int(np.count_nonzero(self._class_bad < self._class_size))
        if alive < self.min_classes:
            examples = "; ".join(f"{path}: {reason}" for path, reason in self.bad_files.entries[:3])
            total = len(self._class_size)
            self.bad_files.unusable = (
                f"no batch can be made: {total - alive} of {total} classes have no readable "
                f"image, which leaves at most {alive} and a batch needs {self.min_classes}; "
                f"{self.bad_files.count} file(s) could not be read (e.g. {examples})"
            )
            raise InvalidInputError(self.bad_files.unusable)

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
        _gated(loader, _exit_placeholder),
        [index, position],
        [tf.uint8, tf.int32, tf.bool],
        stateful=False,
    )
    image.set_shape([None, None, 3])
    label.set_shape([])
    ok.set_shape([])
    return image, label, ok


def check_manifest(manifest) -> Manifest:
    """``manifest`` if it is a `training.data.Manifest` with images; else InvalidInputError."""
    if not isinstance(manifest, Manifest):
        raise InvalidInputError(
            f"`manifest` must be a training.data.Manifest (see load_manifest), received "
            f"{type(manifest).__name__}."
        )
    if len(manifest) == 0:
        raise InvalidInputError("The manifest has no images.")
    return manifest


def _images_from_indices(
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
    min_classes: int = 2,
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
        min_classes=min_classes,
    )

    def load(position, index):
        image, label, ok = _decode_op(loader, index, position)
        step = position // batch
        size = batch_shape(image_size, seed, step, aspects) if geometry == "aspect" else image_size
        if augment:
            element_seed = tf.stack([tf.constant(seed, tf.int64), position])
            image = augment_image(image, size, geometry, element_seed, min_area)
        elif geometry == "aspect":
            image = aspect_crop(image, size)
        else:
            image = to_square(tf.cast(image, tf.float32), image_size, geometry)
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
            ``"crop"``/``"pad"`` geometry; see `training.geometry`).
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
        indices, batch = shard_batches(indices, batch, shard)
    return _images_from_indices(
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
        min_classes=p,
    )


def make_indexed_dataset(
    manifest: Manifest,
    next_indices,
    *,
    batch: int,
    image_size: int = 224,
    augment: bool = True,
    seed: int = 0,
    bad_files: BadFileLog | None = None,
    geometry: str = "aspect",
) -> tf.data.Dataset:
    """An infinite dataset of training batches of the images a Python function picks.

    ``next_indices(step)`` is called for batch ``step`` = 0, 1, ... from a tf.data thread
    (behind the exit gate) and returns int64 ``(batch,)`` manifest indices, the batch's
    images in order; `training.mining` feeds its mined tuples this way. The images are decoded,
    shaped and augmented as in `make_train_dataset` (a bad file replaced by another image of its
    class).

    Args:
        manifest: a `training.data.Manifest`.
        next_indices: ``step (int64 scalar) -> int64 (batch,)`` manifest indices.
        batch: images per batch.
        image_size, augment, seed, bad_files, geometry: as `make_train_dataset`.

    Returns:
        a ``tf.data.Dataset`` of ``(images float32 (batch, H, W, 3) 0-255, labels int32
        (batch,))``; repeats forever.
    """
    manifest = check_manifest(manifest)
    batch = check_int("batch", batch, minimum=1)
    image_size = check_int("image_size", image_size, minimum=1)
    geometry = check_choice("geometry", geometry, GEOMETRIES)
    pick = _gated(next_indices, lambda: np.zeros(batch, np.int64))

    def indices(step):
        values = tf.numpy_function(pick, [step], tf.int64, stateful=True)
        values.set_shape([batch])
        return values

    return _images_from_indices(
        tf.data.Dataset.counter(dtype=tf.int64).map(indices),
        manifest,
        batch=batch,
        image_size=image_size,
        augment=bool(augment),
        seed=int(seed),
        geometry=geometry,
        bad_files=resolve_log(bad_files),
    )


def embed_batches(model, batches) -> np.ndarray:
    """Descriptors of image batches, in order.

    Runs ``model`` in inference mode through one ``tf.function`` that tolerates batches of
    different shapes (``reduce_retracing``), as "aspect" geometry gives, where
    ``model.predict`` would trace a new graph for every shape.

    Args:
        model: a REMAP ``keras.Model``.
        batches: an iterable of ``(b, h, w, 3)`` RGB 0-255 image batches (arrays or tensors);
            ``h, w`` may change from batch to batch.

    Returns:
        float32 ``(num_images, dim)`` descriptors, ``(0, 0)`` for no batches.
    """

    @tf.function(reduce_retracing=True)
    def embed(images):
        return model(images, training=False)

    descriptors = [np.asarray(embed(tf.cast(images, tf.float32)), np.float32) for images in batches]
    if not descriptors:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(descriptors)


def embed_dataset(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and labels of a dataset of ``(images, labels)`` batches, in order.

    The descriptors are `embed_batches` of the images.

    Returns:
        ``(descriptors float32 (n, dim), labels int32 (n,))``.
    """
    labels = []

    def images():
        for batch_images, batch_labels in dataset:
            labels.append(np.asarray(batch_labels))
            yield batch_images

    descriptors = embed_batches(model, images())
    if not labels:
        return descriptors, np.zeros((0,), np.int32)
    return descriptors, np.concatenate(labels)


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
            ``"pad"`` (see `training.geometry`).

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
            return resize_long_side(image, image_size), label
        return to_square(tf.cast(image, tf.float32), image_size, geometry), label

    return (
        tf.data.Dataset.range(len(manifest))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(1 if geometry == "aspect" else batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
