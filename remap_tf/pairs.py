"""Image pairs from class labels: the one pair sampler of the project.

KL-divergence region weights (`remap_tf.region_weights`) need matching and non-matching pairs;
learned whitening (`remap_tf.whitening`) needs matching pairs. Both take them from here.
Pairs are index pairs ``(i, j)`` with ``i < j`` into the labelled images. NumPy only.
"""

from __future__ import annotations

import numpy as np

from remap_tf.errors import InvalidInputError


def _labels(labels) -> np.ndarray:
    return np.asarray(labels).reshape(-1)


def _all_pairs(labels: np.ndarray):
    i, j = np.triu_indices(labels.size, k=1)
    return i, j, labels[i] == labels[j]


def _subsample(pairs: np.ndarray, max_pairs: int | None, rng) -> np.ndarray:
    """At most ``max_pairs`` of ``pairs``, drawn without replacement, kept in order."""
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
    return pairs


def matching_pairs(labels, max_pairs: int | None = 20000, seed: int = 0) -> np.ndarray:
    """All (or ``max_pairs`` sampled) index pairs ``i < j`` with equal labels.

    Args:
        labels: ``(num_images,)`` class labels.
        max_pairs: cap on the number of pairs (None: all of them).
        seed: seeds the sampling.

    Returns:
        int ``(num_pairs, 2)``.
    """
    labels = _labels(labels)
    i, j, same = _all_pairs(labels)
    pairs = np.stack([i[same], j[same]], axis=1)
    return _subsample(pairs, max_pairs, np.random.default_rng(seed))


def sample_pairs(labels, max_pairs: int = 2000, seed: int = 0):
    """Matching and non-matching index pairs from class labels.

    Args:
        labels: ``(num_images,)`` class labels.
        max_pairs: cap on each kind of pair (sampled without replacement, seeded).
        seed: random seed.

    Returns:
        ``(matching (P, 2), non_matching (Q, 2))`` int arrays of image indices, ``i < j``.

    Raises:
        InvalidInputError: fewer than 2 pairs of either kind.
    """
    labels = _labels(labels)
    i, j, same = _all_pairs(labels)
    rng = np.random.default_rng(seed)
    matching = _subsample(np.stack([i[same], j[same]], axis=1), max_pairs, rng)
    non_matching = _subsample(np.stack([i[~same], j[~same]], axis=1), max_pairs, rng)
    if len(matching) < 2 or len(non_matching) < 2:
        raise InvalidInputError(
            f"Need at least 2 matching and 2 non-matching pairs, got {len(matching)} and "
            f"{len(non_matching)} from {labels.size} images of {np.unique(labels).size} "
            "classes; give several images per class and at least two classes."
        )
    return matching, non_matching
