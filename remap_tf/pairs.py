"""Image pairs and image samples from class labels: the one pair sampler of the project.

KL-divergence region weights (`remap_tf.region_weights`) need matching and non-matching pairs;
learned whitening (`remap_tf.whitening`) needs matching pairs. Both take them from here.
Pairs are index pairs ``(i, j)`` with ``i < j`` into the labelled images. NumPy only.

**No N² enumeration.** Pairs are drawn by *unranking*: the images are grouped by class (one
stable sort), every pair of a kind gets a rank in ``[0, count)`` from the class sizes alone,
``max_pairs`` ranks are drawn without replacement and mapped back to ``(i, j)``. Time
``O(N log N + max_pairs log N)``, memory ``O(N + max_pairs)`` (about 40 bytes per label plus
64 per pair; 1M labels need ~40 MB, where the N² pair list would need 8 TB).

**Bounded image samples.** KL weights and learned whitening keep the vectors of a bounded
subset of the images only. `sample_images` chooses it from the labels; `ImageSample` chooses
the same subset online from a stream of labelled batches. Both prefer images that have
same-class partners: classes come in a seeded random order and contribute ``per_class``
images each before any class contributes more (P×K style), so the subset holds many
matching pairs across many classes.
"""

from __future__ import annotations

import numpy as np

from remap_tf.checks import check_int
from remap_tf.errors import InvalidInputError

# matching_pairs(max_pairs=None) enumerates every matching pair; beyond this it asks for a cap.
MAX_ENUMERATED_PAIRS = 50_000_000


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.size != labels.shape[0]:
        raise InvalidInputError(f"`labels` must be (num_images,), received shape {labels.shape}.")
    return labels.reshape(-1)


def _classes(labels: np.ndarray):
    """``(order, starts, sizes)``: image indices sorted by class (stable), and where each
    class starts in that order and how many images it has."""
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    starts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    del ordered
    starts = np.concatenate([[0], starts]).astype(np.int64)
    sizes = np.diff(np.append(starts, labels.size))
    return order, starts, sizes


def _draw(count: int, max_pairs: int | None, rng) -> np.ndarray:
    """Ranks in ``[0, count)``: all of them, or ``max_pairs`` drawn without replacement.

    ``Generator.choice`` uses Floyd's algorithm (memory O(max_pairs)) when max_pairs is small
    against count, and a partial shuffle of at most ~50 × max_pairs ranks otherwise."""
    if max_pairs is None or count <= max_pairs:
        return np.arange(count, dtype=np.int64)
    return np.sort(rng.choice(count, size=max_pairs, replace=False)).astype(np.int64)


def _unrank(ranks, per_class, order, starts, locate):
    """Maps pair ranks to image index pairs. ``per_class[c]`` pairs belong to class ``c``;
    ``locate(c, r)`` gives the two positions (in class-sorted order) of its r-th pair."""
    first = np.cumsum(per_class) - per_class
    c = np.searchsorted(first, ranks, side="right") - 1
    a, b = locate(c, ranks - first[c])
    i, j = order[a], order[b]
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _matching(labels, max_pairs, rng, classes=None) -> np.ndarray:
    order, starts, sizes = classes or _classes(labels)
    per_class = sizes * (sizes - 1) // 2

    def locate(c, r):
        # Pair (a, b), a < b, of a class has rank b(b-1)/2 + a: invert the triangle number.
        b = ((1 + np.sqrt(1 + 8 * r.astype(np.float64))) // 2).astype(np.int64)
        b -= b * (b - 1) // 2 > r  # float rounding: at most one step either way
        b += (b + 1) * b // 2 <= r
        return starts[c] + r - b * (b - 1) // 2, starts[c] + b

    total = int(per_class.sum())
    if max_pairs is None and total > MAX_ENUMERATED_PAIRS:
        raise InvalidInputError(
            f"{labels.size} labels have {total} matching pairs, more than "
            f"{MAX_ENUMERATED_PAIRS} to enumerate; pass `max_pairs`."
        )
    return _unrank(_draw(total, max_pairs, rng), per_class, order, starts, locate)


def _non_matching(labels, max_pairs, rng, classes) -> np.ndarray:
    order, starts, sizes = classes
    ends = starts + sizes
    # Class c pairs each of its images with every image of a later class (ends[c]..N-1).
    later = labels.size - ends
    per_class = sizes * later

    def locate(c, r):
        return starts[c] + r // later[c], ends[c] + r % later[c]

    return _unrank(_draw(int(per_class.sum()), max_pairs, rng), per_class, order, starts, locate)


def matching_pairs(labels, max_pairs: int | None = 20000, seed: int = 0) -> np.ndarray:
    """All (or ``max_pairs`` sampled) index pairs ``i < j`` with equal labels.

    Sampled uniformly without replacement, without listing all N² pairs (see the module
    docstring): memory O(N + max_pairs).

    Args:
        labels: ``(num_images,)`` class labels.
        max_pairs: cap on the number of pairs (None: all of them, ``sum n_c (n_c - 1) / 2``
            for class sizes ``n_c``; refused above `MAX_ENUMERATED_PAIRS`).
        seed: seeds the sampling.

    Returns:
        int64 ``(num_pairs, 2)``, rows sorted; empty if no class has two images.
    """
    labels = _labels(labels)
    max_pairs = check_int("max_pairs", max_pairs, minimum=0, allow_none=True)
    return _matching(labels, max_pairs, np.random.default_rng(seed))


def sample_pairs(labels, max_pairs: int = 2000, seed: int = 0):
    """Matching and non-matching index pairs from class labels.

    Each kind is drawn uniformly without replacement, without listing all N² pairs: time
    ``O(N log N + max_pairs log N)``, memory ``O(N + max_pairs)``. The matching pairs equal
    ``matching_pairs(labels, max_pairs, seed)``.

    Args:
        labels: ``(num_images,)`` class labels.
        max_pairs: cap on each kind of pair (sampled without replacement, seeded).
        seed: random seed.

    Returns:
        ``(matching (P, 2), non_matching (Q, 2))`` int64 arrays of image indices, ``i < j``,
        rows sorted.

    Raises:
        InvalidInputError: fewer than 2 pairs of either kind.
    """
    labels = _labels(labels)
    max_pairs = check_int("max_pairs", max_pairs, minimum=0)
    classes = _classes(labels)
    rng = np.random.default_rng(seed)
    matching = _matching(labels, max_pairs, rng, classes)
    non_matching = _non_matching(labels, max_pairs, rng, classes)
    if len(matching) < 2 or len(non_matching) < 2:
        raise InvalidInputError(
            f"Need at least 2 matching and 2 non-matching pairs, got {len(matching)} and "
            f"{len(non_matching)} from {labels.size} images of {len(classes[1])} "
            "classes; give several images per class and at least two classes."
        )
    return matching, non_matching


def _priority(block, prio, rank, seq) -> np.ndarray:
    """Indices sorting images best first: by block, then class priority, rank, arrival."""
    return np.lexsort((seq, rank, prio, block))


def sample_images(labels, max_images: int, seed: int = 0, per_class: int = 4) -> np.ndarray:
    """A bounded, class-aware subset of the images: indices of at most ``max_images``.

    Classes get a seeded random priority (drawn in order of first appearance); each class's
    images are numbered in order of appearance. Its images ``0..per_class-1`` form block 0,
    the next ``per_class`` block 1, and so on; images of classes with a single image come
    last (they have no matching partner). The subset is the ``max_images`` first images by
    (block, class priority, number, position): every class contributes ``per_class`` images
    before any contributes more, so the subset holds matching pairs from many classes.
    `ImageSample` chooses the same subset online (except that it cannot tell single-image
    classes in advance).

    Args:
        labels: ``(num_images,)`` class labels.
        max_images: size of the subset (all images if there are no more).
        seed: seeds the class priorities.
        per_class: images a class contributes per block, >= 2.

    Returns:
        int64 sorted indices into ``labels``. Memory O(N).
    """
    labels = _labels(labels)
    max_images = check_int("max_images", max_images, minimum=1)
    per_class = check_int("per_class", per_class, minimum=2)
    if labels.size <= max_images:
        return np.arange(labels.size, dtype=np.int64)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    appearance = np.empty(first.size, dtype=np.int64)
    appearance[np.argsort(first)] = np.arange(first.size)
    prio = np.random.default_rng(seed).random(first.size)[appearance]
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(labels.size, dtype=np.int64)
    rank[order] = np.arange(labels.size) - starts[inverse[order]]
    block = rank // per_class
    block[sizes[inverse] == 1] = labels.size  # single-image classes last
    chosen = _priority(block, prio[inverse], rank, np.arange(labels.size))[:max_images]
    return np.sort(chosen)


class ImageSample:
    """The `sample_images` subset of a stream of labelled batches, chosen online.

    Keeps the keys of at most ``max_images`` images; `offer` takes one batch's labels and
    says which of its rows enter the sample and which slot (``0..max_images-1``) each takes,
    evicting the worst images kept so far. The caller stores the rows' vectors at those
    slots, so it holds ``max_images`` rows at most, and may skip computing vectors for the
    rows that do not enter. The images kept at the end are the ``max_images`` best of the
    whole stream by `sample_images`' order, except that a class's first image counts as
    paired (the stream's future is unknown). State: O(max_images) plus about 200 bytes
    per class seen.

    Example:
        >>> sample = ImageSample(max_images=4, per_class=2)
        >>> sample.offer([7, 7, 7])
        (array([0, 1, 2]), array([0, 1, 2]))
        >>> sample.offer([8, 8])  # a new class's pair displaces class 7's third image
        (array([0, 1]), array([2, 3]))
        >>> sample.kept()
        (array([0, 1, 2, 3]), array([7, 7, 8, 8]))
    """

    def __init__(self, max_images: int, seed: int = 0, per_class: int = 4):
        self.max_images = check_int("max_images", max_images, minimum=1)
        self.per_class = check_int("per_class", per_class, minimum=2)
        self._rng = np.random.default_rng(seed)
        self._classes: dict = {}  # label -> [images seen, priority]
        self._keys = np.empty((4, 0))  # rows: block, priority, rank, arrival; one column a slot
        self._slots = np.empty(0, dtype=np.int64)
        self._labels = [None] * self.max_images
        self.seen = 0

    def _batch_keys(self, labels: list) -> np.ndarray:
        new = [label for label in dict.fromkeys(labels) if label not in self._classes]
        for label, prio in zip(new, self._rng.random(len(new)), strict=True):
            self._classes[label] = [0, float(prio)]
        keys = np.empty((4, len(labels)))
        for column, label in enumerate(labels):
            entry = self._classes[label]
            keys[:, column] = (entry[0] // self.per_class, entry[1], entry[0], self.seen + column)
            entry[0] += 1
        self.seen += len(labels)
        return keys

    def offer(self, labels):
        """Takes one batch's labels; returns ``(rows, slots)``: the batch rows (sorted)
        that enter the sample and the slot each takes."""
        labels = _labels(labels).tolist()
        keys = np.concatenate([self._keys, self._batch_keys(labels)], axis=1)
        kept = len(self._slots)
        best = np.sort(_priority(*keys)[: self.max_images])
        rows = best[best >= kept] - kept
        survivors = best[best < kept]
        free = np.setdiff1d(np.arange(self.max_images), self._slots[survivors])
        slots = free[: rows.size]
        self._keys = keys[:, best]
        self._slots = np.concatenate([self._slots[survivors], slots])
        for row, slot in zip(rows.tolist(), slots.tolist(), strict=True):
            self._labels[slot] = labels[row]
        return rows, slots

    def kept(self):
        """``(slots, labels)`` of the images kept, in order of arrival."""
        order = np.argsort(self._keys[3], kind="stable")
        slots = self._slots[order]
        return slots, np.asarray([self._labels[slot] for slot in slots.tolist()])
