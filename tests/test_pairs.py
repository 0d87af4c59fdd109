"""The pair sampler and the bounded image samples: exact on small label sets (against the
N² enumeration), O(N + max_pairs) memory on large ones, seeded, without duplicates."""

import tracemalloc
from collections import Counter

import numpy as np
import pytest

from remap_tf.errors import InvalidInputError
from remap_tf.pairs import ImageSample, matching_pairs, sample_images, sample_pairs


def all_pairs(labels):
    """The N² reference: every pair i < j, split by equal / different labels."""
    i, j = np.triu_indices(len(labels), k=1)
    same = labels[i] == labels[j]
    return np.stack([i[same], j[same]], 1), np.stack([i[~same], j[~same]], 1)


def check_pairs(pairs, labels, matching: bool):
    assert pairs.dtype == np.int64 and pairs.ndim == 2 and pairs.shape[1] == 2
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert len(np.unique(pairs, axis=0)) == len(pairs), "duplicate pairs"
    equal = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    assert np.all(equal) if matching else not np.any(equal)


def peak_bytes(function, *args, **kwargs):
    tracemalloc.start()
    try:
        result = function(*args, **kwargs)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_all_pairs_equal_the_n_squared_enumeration():
    """With no cap, the unranked pairs are exactly the N² list's, in the same order."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        labels = rng.integers(0, rng.integers(2, 8), size=rng.integers(4, 40))
        matching, non_matching = all_pairs(labels)
        np.testing.assert_array_equal(matching_pairs(labels, max_pairs=None), matching)
        if len(matching) >= 2 and len(non_matching) >= 2:
            got = sample_pairs(labels, max_pairs=10**6)
            np.testing.assert_array_equal(got[0], matching)
            np.testing.assert_array_equal(got[1], non_matching)


def test_capped_pairs_are_uniform_without_replacement():
    """Classes of 3, 2, 4 and 1 images: 10 matching and 35 non-matching pairs. Drawing 3 of
    each over 4000 seeds, every pair turns up about 4000·3/10 = 1200 (resp. 343) times."""
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    counts = [Counter(), Counter()]
    for seed in range(4000):
        for count, pairs in zip(counts, sample_pairs(labels, max_pairs=3, seed=seed), strict=True):
            check_pairs(pairs, labels, matching=count is counts[0])
            assert len(pairs) == 3
            count.update(map(tuple, pairs.tolist()))
    assert len(counts[0]) == 10 and len(counts[1]) == 35
    assert all(1050 < n < 1350 for n in counts[0].values()), counts[0]
    assert all(270 < n < 420 for n in counts[1].values()), counts[1]


def test_pairs_of_a_million_labels_take_memory_linear_in_n_not_n_squared():
    """200k images in classes of 1 to 15 (about 1e5 matching and 2e10 non-matching pairs)
    and 1M images in one giant class plus 3 small ones (5e11 matching pairs): 2000 pairs of
    each kind in well under 48 bytes per label, where the N² list of 200k labels would need
    320 GB."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25_000), rng.integers(1, 16, size=25_000))[:200_000]
    labels = rng.permutation(labels)
    (matching, non_matching), peak = peak_bytes(sample_pairs, labels, max_pairs=2000, seed=3)
    assert len(matching) == len(non_matching) == 2000
    check_pairs(matching, labels, matching=True)
    check_pairs(non_matching, labels, matching=False)
    assert peak < 48 * labels.size + 128 * 4000, peak
    again = sample_pairs(labels, max_pairs=2000, seed=3)
    np.testing.assert_array_equal(again[0], matching)
    np.testing.assert_array_equal(again[1], non_matching)
    other = sample_pairs(labels, max_pairs=2000, seed=4)
    assert len({*map(tuple, other[0].tolist())} & {*map(tuple, matching.tolist())}) < 200
    np.testing.assert_array_equal(matching_pairs(labels, 2000, seed=3), matching)

    giant = np.concatenate([np.zeros(999_994, np.int64), [1, 1, 2, 2, 3, 3]])
    (matching, non_matching), peak = peak_bytes(sample_pairs, giant, max_pairs=2000)
    check_pairs(matching, giant, matching=True)
    check_pairs(non_matching, giant, matching=False)
    assert len(matching) == len(non_matching) == 2000
    assert peak < 48 * giant.size, peak


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros(100_000, np.int64), "got 2000 and 0 from 100000 images of 1 classes"),
        (np.arange(100_000), "got 0 and 2000 from 100000 images of 100000 classes"),
        (np.array(["a", "b", "c", "a"]), "got 1 and 5 from 4 images of 3 classes"),
    ],
)
def test_too_few_pairs_are_refused_with_a_clear_error(labels, message):
    with pytest.raises(InvalidInputError, match=message):
        sample_pairs(labels, max_pairs=2000)


def test_bad_caps_are_refused():
    with pytest.raises(InvalidInputError, match="max_pairs.*-1"):
        sample_pairs([0, 0, 1, 1], max_pairs=-1)
    with pytest.raises(InvalidInputError, match="max_images.*0"):
        sample_images([0, 0, 1, 1], max_images=0)
    with pytest.raises(InvalidInputError, match="more than .* to enumerate; pass `max_pairs`"):
        matching_pairs(np.zeros(20_000), max_pairs=None)
    assert matching_pairs([0, 1, 2]).shape == (0, 2)


def test_sample_images_takes_per_class_images_from_classes_with_partners():
    """Class c has c images (c = 1..10, 55 in all). 24 images at 4 per class: whole blocks
    of min(c, 4) images from classes in priority order (the last one possibly cut), never
    the single-image class while paired images remain."""
    labels = np.repeat(np.arange(1, 11), np.arange(1, 11))
    labels = np.random.default_rng(0).permutation(labels)
    chosen = sample_images(labels, max_images=24, seed=1, per_class=4)
    assert len(chosen) == 24 and np.all(np.diff(chosen) > 0)
    sizes = Counter(labels[chosen].tolist())
    assert 1 not in sizes and len(sizes) >= 6
    assert sum(size != min(4, label) for label, size in sizes.items()) <= 1
    np.testing.assert_array_equal(sample_images(labels, 24, seed=1, per_class=4), chosen)
    assert not np.array_equal(sample_images(labels, 24, seed=2, per_class=4), chosen)
    # Enough room: every paired image first, then the single image.
    assert set(labels[sample_images(labels, 54, seed=1)].tolist()) == set(range(2, 11))
    np.testing.assert_array_equal(sample_images(labels, 55), np.arange(55))


def test_image_sample_online_equals_sample_images_in_memory_bounded_by_max_images():
    """Without single-image classes, the online sample of a stream cut into batches of any
    sizes keeps exactly the images `sample_images` picks, and its slots hold them."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(400), rng.integers(2, 12, size=400)))
    for max_images in (7, 100, 1000, len(labels)):
        sample = ImageSample(max_images, seed=5, per_class=3)
        stored = np.full(max_images, -1)
        start = 0
        while start < len(labels):
            size = int(rng.integers(1, 90))
            rows, slots = sample.offer(labels[start : start + size])
            assert np.all(rows < size) and len(rows) == len(slots)
            stored[slots] = start + rows  # the 'vector' of a row is its index
            start += size
            assert len(sample.kept()[0]) <= max_images
        slots, kept_labels = sample.kept()
        expected = sample_images(labels, max_images, seed=5, per_class=3)
        np.testing.assert_array_equal(stored[slots], expected)
        np.testing.assert_array_equal(kept_labels, labels[expected])


def test_sample_images_memory_is_linear():
    labels = np.random.default_rng(0).integers(0, 50_000, size=200_000)
    chosen, peak = peak_bytes(sample_images, labels, 4096)
    assert len(chosen) == 4096
    assert peak < 128 * labels.size, peak
