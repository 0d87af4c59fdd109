"""Offline hard-negative mining: each epoch, embed a pool and train on the hardest tuples.

REMAP (Husain & Bober, IEEE TIP 2019) trains, like Gordo et al. (IJCV 2017) and Radenović et al.
(TPAMI 2018), on tuples ``(anchor, positive, negative_1..negative_n)`` whose negatives are mined
offline: at the start of every epoch the current model embeds a random pool of images, and each
anchor gets the ``n`` pool images of *other* classes closest to it (squared Euclidean distance;
one per class by default, as cirtorch does, so one near-duplicate class does not fill the list).
The positive is a random other image of the anchor's class.

The tuples are laid out in batches with their class labels, so `remap_tf.losses.TripletLoss`
(or `ContrastiveLoss`, cirtorch's loss on such tuples) trains on them unchanged: with
``mining="batch_hard"`` each anchor's hardest in-batch negative is at least as hard as its mined
ones.

Use it as a Keras callback whose `OfflineHardNegativeMining.dataset` feeds ``model.fit``:

    >>> miner = OfflineHardNegativeMining(manifest, image_size=224, num_negatives=5)
    >>> model.compile(optimizer="adam", loss=TripletLoss())
    >>> model.fit(miner.dataset(), steps_per_epoch=100, epochs=10, callbacks=[miner])

or, for one fixed set of tuples, `make_tuple_dataset(manifest, model)`.
"""

from __future__ import annotations

import logging
import threading

import keras
import numpy as np
import tensorflow as tf

from remap_tf.checks import check_choice, check_int
from remap_tf.errors import InvalidInputError
from remap_tf.training.data import Manifest
from remap_tf.training.geometry import GEOMETRIES
from remap_tf.training.images import BadFileLog, resolve_log
from remap_tf.training.pipeline import (
    check_manifest,
    embed_dataset,
    make_eval_dataset,
    make_indexed_dataset,
)

logger = logging.getLogger("remap.training")


def _squared_distances(anchors: np.ndarray, pool: np.ndarray) -> np.ndarray:
    sq_a = np.einsum("ij,ij->i", anchors, anchors)[:, None]
    sq_p = np.einsum("ij,ij->i", pool, pool)[None, :]
    return np.maximum(sq_a + sq_p - 2.0 * anchors @ pool.T, 0.0)


def mine_hard_negatives(
    descriptors,
    labels,
    num_negatives: int = 5,
    seed: int = 0,
    *,
    pool_descriptors=None,
    pool_labels=None,
    distinct_classes: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """For each anchor, the closest descriptors of other classes (its hard negatives).

    Args:
        descriptors: ``(num_anchors, dim)`` anchor descriptors.
        labels: ``(num_anchors,)`` anchor class labels.
        num_negatives: negatives per anchor.
        seed: seed of the tie-breaking between equally distant candidates.
        pool_descriptors: ``(pool_size, dim)`` candidates; default the anchors themselves.
        pool_labels: ``(pool_size,)`` their labels (required with ``pool_descriptors``).
        distinct_classes: take at most one negative per class (the closest of that class).
        chunk_size: anchors processed at a time (memory is ``chunk_size x pool_size``).

    Returns:
        int64 ``(num_anchors, num_negatives)``: indices into the pool, closest first.

    Raises:
        ValueError: bad shapes, or an anchor with fewer than ``num_negatives`` candidates of other
            classes (of other distinct classes with ``distinct_classes``).

    Example:
        >>> mine_hard_negatives(np.eye(3), [0, 0, 1], num_negatives=1)
        array([[2], [2], [0]])
    """
    anchors = np.asarray(descriptors, dtype=np.float32)
    anchor_labels = np.asarray(labels).reshape(-1)
    if anchors.ndim != 2 or anchors.shape[0] != anchor_labels.shape[0]:
        raise InvalidInputError(
            f"`descriptors` must be (num_anchors, dim) with one label each, received "
            f"{anchors.shape} and {anchor_labels.shape[0]} labels."
        )
    if pool_descriptors is None:
        pool, pool_labels_arr = anchors, anchor_labels
    else:
        if pool_labels is None:
            raise InvalidInputError("`pool_labels` is required with `pool_descriptors`.")
        pool = np.asarray(pool_descriptors, dtype=np.float32)
        pool_labels_arr = np.asarray(pool_labels).reshape(-1)
        if pool.ndim != 2 or pool.shape != (pool_labels_arr.shape[0], anchors.shape[1]):
            raise InvalidInputError(
                f"`pool_descriptors` must be (pool_size, {anchors.shape[1]}) with one label "
                f"each, received {pool.shape} and {pool_labels_arr.shape[0]} labels."
            )
    num_negatives = check_int("num_negatives", num_negatives, minimum=1)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    _check_enough_negatives(anchor_labels, pool_labels_arr, num_negatives, distinct_classes)

    # A random column order makes ties (e.g. duplicate images) fall to different candidates.
    perm = np.random.default_rng(seed).permutation(pool.shape[0])
    pool, pool_labels_arr = pool[perm], pool_labels_arr[perm]
    result = np.empty((anchors.shape[0], num_negatives), dtype=np.int64)
    for start in range(0, anchors.shape[0], chunk_size):
        stop = min(start + chunk_size, anchors.shape[0])
        distances = _squared_distances(anchors[start:stop], pool)
        distances[anchor_labels[start:stop, None] == pool_labels_arr[None, :]] = np.inf
        for row, values in enumerate(distances):
            result[start + row] = _closest(values, pool_labels_arr, num_negatives, distinct_classes)
    return perm[result]


def _check_enough_negatives(anchor_labels, pool_labels, num_negatives, distinct_classes):
    classes, counts = np.unique(pool_labels, return_counts=True)
    for label in np.unique(anchor_labels):
        others = classes != label
        available = int(others.sum()) if distinct_classes else int(counts[others].sum())
        if available < num_negatives:
            kind = "classes" if distinct_classes else "images"
            raise InvalidInputError(
                f"Anchors of class {label!r} have only {available} candidate negative {kind} in "
                f"the pool; `num_negatives`={num_negatives}."
            )


def _closest(distances, labels, count: int, distinct: bool) -> np.ndarray:
    """Columns of the ``count`` smallest finite ``distances`` (one per label if ``distinct``)."""
    size = distances.shape[0]
    if not distinct:
        part = np.argpartition(distances, count - 1)[:count]
        return part[np.argsort(distances[part], kind="stable")]
    window = min(size, count * 8)
    while True:
        if window < size:
            candidates = np.argpartition(distances, window - 1)[:window]
            candidates = candidates[np.lexsort((candidates, distances[candidates]))]
        else:
            candidates = np.argsort(distances, kind="stable")
        candidates = candidates[np.isfinite(distances[candidates])]
        _, first = np.unique(labels[candidates], return_index=True)
        if first.size >= count or window >= size:
            return candidates[np.sort(first)[:count]]
        window = min(size, window * 4)


class OfflineHardNegativeMining(keras.callbacks.Callback):
    """Re-mines hard-negative tuples at the start of every epoch and feeds them to ``fit``.

    Each epoch ``e`` (seeded by ``(seed, e)``): pick ``num_anchors`` anchors among the images of
    classes with two or more images and a pool of ``pool_size`` images; embed both with the model
    being trained (`training.pipeline.embed_dataset` of `make_eval_dataset`, bad files left
    out); give every anchor a random positive of its class and its ``num_negatives`` hardest pool
    negatives of distinct other classes (`mine_hard_negatives`). `dataset` then yields, for each
    batch, ``tuples_per_batch`` tuples laid out ``[a, p, n_1, ..., n_n, a', p', ...]`` with their
    class labels, cycling through the shuffled tuples.

    The dataset prefetches a few batches ahead, so the first batches of an epoch may still come
    from the previous epoch's tuples. Under a distribution strategy ``model.fit`` draws one batch
    before any callback runs: call `mine` once before ``fit`` there. Cost per epoch: one forward
    pass over up to ``num_anchors + pool_size`` images.

    Args:
        manifest: a `training.data.Manifest`.
        image_size: the long side of the images (training and embedding).
        tuples_per_batch: tuples per batch; a batch has ``tuples_per_batch * (2 + num_negatives)``
            images (make it divisible by the number of replicas).
        num_negatives: hard negatives per anchor.
        num_anchors: anchors (tuples) mined per epoch.
        pool_size: images embedded as negative candidates per epoch.
        embed_batch_size: batch size of the embedding pass.
        augment: augment the training images (as `make_train_dataset`).
        seed: seed of every random choice.
        bad_files: a `training.images.BadFileLog`.
        geometry: ``"aspect"`` (default), ``"crop"`` or ``"pad"`` (see `training.geometry`).

    Reference: Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
    annotation", TPAMI 2018 (Sec. 3.3); Husain & Bober, REMAP, IEEE TIP 2019.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        image_size: int = 224,
        tuples_per_batch: int = 2,
        num_negatives: int = 5,
        num_anchors: int = 1000,
        pool_size: int = 2000,
        embed_batch_size: int = 16,
        augment: bool = True,
        seed: int = 0,
        bad_files: BadFileLog | None = None,
        geometry: str = "aspect",
    ):
        super().__init__()
        self.manifest = check_manifest(manifest).drop_small_classes(2)
        if len(self.manifest) == 0:
            raise InvalidInputError("No class has two or more images: tuples need positives.")
        self.image_size = check_int("image_size", image_size, minimum=1)
        self.tuples_per_batch = check_int("tuples_per_batch", tuples_per_batch, minimum=1)
        self.num_negatives = check_int("num_negatives", num_negatives, minimum=1)
        self.num_anchors = check_int("num_anchors", num_anchors, minimum=1)
        self.pool_size = check_int("pool_size", pool_size, minimum=1)
        self.embed_batch_size = check_int("embed_batch_size", embed_batch_size, minimum=1)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.bad_files = resolve_log(bad_files)
        self.geometry = check_choice("geometry", geometry, GEOMETRIES)
        present = int(np.count_nonzero(self.manifest.class_counts()))
        if present <= self.num_negatives:
            raise InvalidInputError(
                f"`num_negatives`={self.num_negatives} needs more than that many classes; the "
                f"data has {present} usable classes."
            )
        self._lock = threading.Lock()
        self._tuples: np.ndarray | None = None

    @property
    def tuple_width(self) -> int:
        return 2 + self.num_negatives

    @property
    def tuples(self) -> np.ndarray | None:
        """The current tuples, int64 ``(num_tuples, 2 + num_negatives)`` manifest indices."""
        with self._lock:
            return None if self._tuples is None else self._tuples.copy()

    def mine(self, model: keras.Model, epoch: int = 0) -> np.ndarray:
        """Embeds anchors and pool with ``model`` and replaces the tuples; returns them."""
        manifest = self.manifest
        rng = np.random.default_rng([self.seed, int(epoch)])
        size = len(manifest)
        anchors = rng.choice(size, size=min(self.num_anchors, size), replace=False)
        pool = rng.choice(size, size=min(self.pool_size, size), replace=False)
        embedded = np.union1d(anchors, pool)
        dataset = make_eval_dataset(
            manifest.subset(embedded),
            image_size=self.image_size,
            batch_size=self.embed_batch_size,
            bad_files=self.bad_files,
            geometry=self.geometry,
        )
        descriptors, labels = embed_dataset(model, dataset)
        readable = labels >= 0
        row = {int(index): i for i, index in enumerate(embedded)}

        labels = manifest.labels
        good_anchors = np.array([a for a in anchors if readable[row[int(a)]]], np.int64)
        good_pool = np.array([p for p in pool if readable[row[int(p)]]], np.int64)
        anchor_rows = np.array([row[int(a)] for a in good_anchors], np.int64)
        pool_rows = np.array([row[int(p)] for p in good_pool], np.int64)
        # An anchor needs num_negatives other classes in the pool; the others wait for an epoch
        # with a luckier pool.
        pool_classes = np.unique(labels[good_pool])
        available = pool_classes.size - np.isin(labels[good_anchors], pool_classes)
        keep = available >= self.num_negatives
        good_anchors, anchor_rows = good_anchors[keep], anchor_rows[keep]
        if good_anchors.size == 0:
            raise InvalidInputError(
                f"Hard-negative mining found no anchor with {self.num_negatives} other classes "
                f"among the {good_pool.size} readable pool images; raise `pool_size` or lower "
                "`num_negatives`."
            )
        negatives = mine_hard_negatives(
            descriptors[anchor_rows],
            labels[good_anchors],
            self.num_negatives,
            seed=int(rng.integers(2**31)),
            pool_descriptors=descriptors[pool_rows],
            pool_labels=labels[good_pool],
        )
        positives = self._positives(good_anchors, rng)
        tuples = np.concatenate(
            [good_anchors[:, None], positives[:, None], good_pool[negatives]], axis=1
        )
        tuples = tuples[rng.permutation(tuples.shape[0])]
        with self._lock:
            self._tuples = tuples
        logger.info(
            "Epoch %d: mined %d tuples (%d negatives each) from a pool of %d images.",
            epoch + 1,
            tuples.shape[0],
            self.num_negatives,
            good_pool.size,
        )
        return tuples

    def _positives(self, anchors: np.ndarray, rng) -> np.ndarray:
        labels = self.manifest.labels
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.manifest.num_classes + 1))
        positives = np.empty_like(anchors)
        for i, anchor in enumerate(anchors):
            label = labels[anchor]
            members = [
                m
                for m in order[bounds[label] : bounds[label + 1]]
                if m != anchor and self.manifest.paths[m] not in self.bad_files
            ]
            # With every other image of the class bad, the anchor is its own (augmented) positive.
            positives[i] = rng.choice(members) if members else anchor
        return positives

    def _next_indices(self, step):
        with self._lock:
            tuples = self._tuples
        if tuples is None:
            raise InvalidInputError(
                "No tuples mined yet: call OfflineHardNegativeMining.mine(model) before "
                "iterating its dataset (model.fit under a distribution strategy draws a batch "
                "before any callback runs), and pass the callback to model.fit to re-mine at "
                "every epoch."
            )
        rows = (int(step) * self.tuples_per_batch + np.arange(self.tuples_per_batch)) % len(tuples)
        return tuples[rows].reshape(-1).astype(np.int64)

    def dataset(self) -> tf.data.Dataset:
        """Infinite ``(images float32 (B, S, S, 3) 0-255, labels int32 (B,))`` tuple batches.

        ``B = tuples_per_batch * (2 + num_negatives)``; a bad file is replaced by another image
        of its class, as in `training.pipeline.make_train_dataset`.
        """
        return make_indexed_dataset(
            self.manifest,
            self._next_indices,
            batch=self.tuples_per_batch * self.tuple_width,
            image_size=self.image_size,
            augment=self.augment,
            seed=self.seed,
            geometry=self.geometry,
            bad_files=self.bad_files,
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.mine(self.model, epoch)


def make_tuple_dataset(manifest: Manifest, model: keras.Model, **kwargs) -> tf.data.Dataset:
    """Mines hard-negative tuples once with ``model`` and returns their infinite dataset.

    ``kwargs`` are those of `OfflineHardNegativeMining`. To re-mine every epoch, use that
    callback instead.
    """
    miner = OfflineHardNegativeMining(manifest, **kwargs)
    miner.mine(model, epoch=0)
    return miner.dataset()
