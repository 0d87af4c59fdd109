"""KL-divergence initialisation of REMAP's region weights (Husain & Bober, TIP 2019, §III-B).

For every (layer, region), REMAP measures how well that region alone separates matching from
non-matching image pairs: the Euclidean distances between the pair's L2-normalised region
vectors form one distribution for matching pairs and one for non-matching pairs, and the KL
divergence between the two is the region's initial weight. Regions whose distances tell the
two kinds of pair apart get large weights; regions that do not (background, borders) get
small ones.

**Bounded memory.** The region vectors of a bounded, class-aware sample of at most
``max_images`` images are kept (`remap_tf.pairs.sample_images` for an array,
`remap_tf.pairs.ImageSample` online for a stream of batches), and pairs are drawn among them
without listing all N² pairs. Memory, whatever the number of images:
``max_images × regions × channels × 4`` bytes per tapped layer, plus 3 MB of temporaries,
``max_pairs × regions × 24`` bytes per layer for the distances, one batch, and (streams)
about 200 bytes per class seen. With the defaults (``max_images=512``, 40 regions):
MobileNet v1 α=0.75 (384 + 768 channels) 94 MB (peak RSS growth 110 MiB measured on 100k
images by `bench.init_memory`); ResNet50 (1024 + 2048 channels) 252 MB.
"""

from __future__ import annotations

import numpy as np

from remap_tf.checks import check_int
from remap_tf.errors import InvalidInputError
from remap_tf.model import (
    batch_predictor,
    region_weighting_layers,
    set_region_weights,
)
from remap_tf.pairs import ImageSample, sample_images, sample_pairs
from remap_tf.streams import (
    array_batches,
    image_array,
    is_stream,
    labelled_batches,
)

# Default cap on the images whose region vectors are kept (see the module docstring).
DEFAULT_MAX_IMAGES = 512
# Pair differences are computed this many floats at a time, bounding the temporaries.
_CHUNK_FLOATS = 1 << 18


def _check_distances(name: str, values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] < 2:
        raise InvalidInputError(
            f"`{name}` must be (num_pairs, num_regions) with at least 2 pairs, received "
            f"shape {values.shape}."
        )
    if not np.all(np.isfinite(values)):
        raise InvalidInputError(f"`{name}` contains NaN or infinite distances.")
    return values


def kl_divergence_per_region(
    matching, non_matching, bins: int = 64, smoothing: float = 0.5
) -> np.ndarray:
    """KL(matching || non-matching) of per-region distance distributions, one per region.

    Both distributions are histograms on the same bins (spanning the pooled range of the two
    samples, per region). ``smoothing``, a pseudo-count added to every bin of both
    histograms, keeps empty bins from making the divergence infinite; its bias vanishes as
    the samples grow.

    Args:
        matching: ``(num_matching_pairs, num_regions)`` distances of matching pairs.
        non_matching: ``(num_non_matching_pairs, num_regions)`` distances of non-matching
            pairs.
        bins: number of shared histogram bins.
        smoothing: pseudo-count per bin, > 0.

    Returns:
        float64 ``(num_regions,)``, >= 0. For two Gaussians it approaches the closed form
        ``log(s2/s1) + (s1² + (m1 - m2)²) / (2 s2²) - 1/2`` as the samples grow.
    """
    matching = _check_distances("matching", matching)
    non_matching = _check_distances("non_matching", non_matching)
    if matching.shape[1] != non_matching.shape[1]:
        raise InvalidInputError(
            f"`matching` and `non_matching` must have the same number of regions, received "
            f"{matching.shape[1]} and {non_matching.shape[1]}."
        )
    if int(bins) != bins or bins < 2:
        raise InvalidInputError(f"`bins` must be an integer >= 2, received {bins!r}.")
    if not smoothing > 0:
        raise InvalidInputError(f"`smoothing` must be > 0, received {smoothing!r}.")

    divergences = np.empty(matching.shape[1])
    for region in range(matching.shape[1]):
        pos, neg = matching[:, region], non_matching[:, region]
        low = min(pos.min(), neg.min())
        high = max(pos.max(), neg.max())
        if high <= low:  # both samples constant and equal: the region cannot separate
            divergences[region] = 0.0
            continue
        edges = np.linspace(low, high, int(bins) + 1)
        p = np.histogram(pos, edges)[0] + smoothing
        q = np.histogram(neg, edges)[0] + smoothing
        p, q = p / p.sum(), q / q.sum()
        divergences[region] = float(np.sum(p * np.log(p / q)))
    return divergences


def _as_taps(vectors, rows: int) -> list[np.ndarray]:
    """One batch's region vectors as a list, one ``(rows, regions, channels)`` per tap."""
    taps = list(vectors) if isinstance(vectors, (list, tuple)) else [vectors]
    taps = [np.asarray(tap, dtype=np.float32) for tap in taps]
    for tap in taps:
        if tap.ndim != 3 or len(tap) != rows:
            raise InvalidInputError(
                f"Region vectors must be ({rows}, regions, channels) per tap, received shape "
                f"{tap.shape}."
            )
    return taps


class _RegionVectors:
    """Region vectors of a bounded `ImageSample` of a stream: ``(max_images, regions,
    channels)`` float32 per tap, allocated on the first batch that enters."""

    def __init__(self, max_images: int, seed: int, per_class: int):
        self.sample = ImageSample(max_images, seed=seed, per_class=per_class)
        self.taps = None

    def add(self, labels, regions_of) -> None:
        """``regions_of(rows)`` gives the region vectors of the batch rows that enter."""
        rows, slots = self.sample.offer(labels)
        if rows.size == 0:
            return
        vectors = _as_taps(regions_of(rows), rows.size)
        if self.taps is None:
            if len({tap.shape[1] for tap in vectors}) > 1:
                raise InvalidInputError(
                    "Every tap must have the same number of regions, received "
                    f"{[tap.shape[1] for tap in vectors]}."
                )
            size = self.sample.max_images
            self.taps = [np.empty((size, *tap.shape[1:]), np.float32) for tap in vectors]
        shapes = [tap.shape[1:] for tap in self.taps]
        if [tap.shape[1:] for tap in vectors] != shapes:
            raise InvalidInputError(
                f"Every batch must give the same taps of (regions, channels) {shapes}, "
                f"received {[tap.shape[1:] for tap in vectors]}."
            )
        for buffer, tap in zip(self.taps, vectors, strict=True):
            buffer[slots] = tap

    def distances(self, max_pairs: int, seed: int):
        """Per tap, ``(matching (P, regions), non_matching (Q, regions))`` distances of
        pairs sampled among the images kept (`sample_pairs` on their labels, in arrival
        order)."""
        slots, labels = self.sample.kept()
        matching, non_matching = sample_pairs(labels, max_pairs=max_pairs, seed=seed)
        return [
            (_pair_distances(tap, slots[matching]), _pair_distances(tap, slots[non_matching]))
            for tap in self.taps
        ]


def _pair_distances(regions: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``(P, regions)`` Euclidean distances between the pairs' region vectors, a bounded
    chunk of pairs at a time (temporaries of at most ~3 × `_CHUNK_FLOATS` floats)."""
    out = np.empty((len(pairs), regions.shape[1]), np.float32)
    step = max(1, _CHUNK_FLOATS // (regions.shape[1] * regions.shape[2]))
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        difference = regions[chunk[:, 0]]
        difference -= regions[chunk[:, 1]]
        out[start : start + step] = np.linalg.norm(difference, axis=-1)
    return out


def _collect(batches, regions_of, max_images: int, seed: int, per_class: int):
    """Streams ``(item, labels)`` batches into a `_RegionVectors`; ``regions_of(item, rows)``
    computes the region vectors of the rows that enter the sample."""
    vectors = _RegionVectors(max_images, seed, per_class)
    for item, labels in batches:
        if labels is None:
            raise InvalidInputError("Every batch needs its labels.")
        vectors.add(labels, lambda rows, item=item: regions_of(item, rows))
    if vectors.taps is None:
        raise InvalidInputError("No images to initialise the region weights from.")
    return vectors


def _weights_from(distances, bins: int, smoothing: float) -> np.ndarray:
    """Each layer's KL values divided by their mean (a layer of zeros keeps weights 1)."""
    weights = []
    for matching, non_matching in distances:
        kl = kl_divergence_per_region(matching, non_matching, bins=bins, smoothing=smoothing)
        mean = kl.mean()
        weights.append(kl / mean if mean > 0 else np.ones_like(kl))
    return np.stack(weights).astype(np.float32)


def kl_region_weights_from_stream(
    batches,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_pairs: int = 2000,
    seed: int = 0,
    per_class: int = 4,
    bins: int = 64,
    smoothing: float = 0.5,
) -> np.ndarray:
    """KL region weights from a stream of region vectors, in bounded memory.

    Keeps the region vectors of at most ``max_images`` images, chosen online by
    `remap_tf.pairs.ImageSample` (class-aware: ``per_class`` images per class before any
    class gets more), samples pairs among them (`remap_tf.pairs.sample_pairs`), and turns
    each region's KL divergence (`kl_divergence_per_region`) into weights that average 1 per
    layer, as `init_region_weights` does.

    Memory: ``max_images × regions × channels × 4`` bytes per tap for the vectors kept, plus
    3 MB of pair-difference temporaries and ``2 × max_pairs × regions × 12`` bytes of
    distances per tap; the stream's own batches are read one at a time.

    Args:
        batches: iterable of ``(region_vectors, labels)``: ``region_vectors`` is
            ``(batch, regions, channels)`` or a list of them, one per tap (as
            `remap_tf.model.region_model` gives); ``labels`` is ``(batch,)``.
        max_images, per_class, seed: the sample (`remap_tf.pairs.ImageSample`); ``seed``
            also seeds the pairs.
        max_pairs: cap on each kind of pair.
        bins, smoothing: see `kl_divergence_per_region`.

    Returns:
        float32 ``(num_taps, num_regions)`` weights, each row averaging 1.
    """

    def regions_of(vectors, rows):
        taps = vectors if isinstance(vectors, (list, tuple)) else [vectors]
        return [np.asarray(tap)[rows] for tap in taps]

    vectors = _collect(batches, regions_of, max_images, seed, per_class)
    return _weights_from(vectors.distances(max_pairs, seed), bins, smoothing)


def region_pair_distances(
    model,
    images,
    labels=None,
    batch_size: int = 16,
    max_pairs: int = 2000,
    seed: int = 0,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    per_class: int = 4,
):
    """Per-region distances of matching and non-matching pairs, for every tapped layer.

    Runs `remap_tf.model.region_model` only on the images of a bounded sample: from an
    array, the rows `remap_tf.pairs.sample_images` picks; from a stream, the rows that
    enter the online `remap_tf.pairs.ImageSample` (rows that do not enter are not run).
    Memory: ``max_images × regions × channels × 4`` bytes per tap (see
    `kl_region_weights_from_stream`).

    Args:
        model: a REMAP model (`remap_tf.model.REMAP` with ``pooling="remap"``).
        images: ``(num_images, height, width, 3)`` RGB 0-255 with ``labels``, or a stream
            (``tf.data.Dataset``, generator) of ``(images (b, h, w, 3), labels (b,))``
            batches, read once; sizes may differ between batches.
        labels: ``(num_images,)`` class labels for an array; None for a stream.
        batch_size: images per forward pass (arrays).
        max_pairs: cap on each kind of pair.
        seed: seeds the sample and the pairs.
        max_images, per_class: the sample (`remap_tf.pairs.sample_images`).

    Returns:
        list, one entry per layer, of ``(matching (P, regions), non_matching (Q, regions))``.
    """
    predict = batch_predictor(model, "regions")

    def regions_of(images, rows):
        return predict(images[rows])

    if is_stream(images):
        batches = labelled_batches(images, labels, batch_size)
    else:
        images, labels = image_array(images, labels)
        rows = sample_images(labels, max_images, seed=seed, per_class=per_class)
        batches = array_batches(
            images, labels, check_int("batch_size", batch_size, minimum=1), rows
        )
        max_images = max(1, len(rows))
    vectors = _collect(batches, regions_of, max_images, seed, per_class)
    return vectors.distances(max_pairs, seed)


def init_region_weights(
    model,
    images,
    labels=None,
    batch_size: int = 16,
    max_pairs: int = 2000,
    seed: int = 0,
    bins: int = 64,
    smoothing: float = 0.5,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    per_class: int = 4,
) -> np.ndarray:
    """Sets a REMAP model's region weights from KL divergences on a labelled image set.

    Each layer's KL values are divided by their mean, so the weights average 1 as R-MAC's do
    (the scale of a layer's weights does not change its L2-normalised vector, but it sets how
    far an optimiser step moves them). A layer whose regions all score 0 keeps weight 1.

    Memory is bounded by the sample, not by the number of images:
    ``max_images × regions × channels × 4`` bytes per tap (see the module docstring for the
    defaults' figures), so a stream of 100k images needs no more than one of 512.

    Args:
        model: a REMAP model (``pooling="remap"``).
        images: ``(num_images, height, width, 3)`` RGB 0-255, several images per class, or
            a stream of ``(images, labels)`` batches (see `region_pair_distances`).
        labels: ``(num_images,)`` class labels for an array; None for a stream.
        batch_size, max_pairs, seed, max_images, per_class: see `region_pair_distances`.
        bins, smoothing: see `kl_divergence_per_region`.

    Returns:
        the weights set, ``(num_layers, num_regions)``.
    """
    if not region_weighting_layers(model):
        raise InvalidInputError(f"Model {model.name!r} has no learnable region weights.")
    distances = region_pair_distances(
        model,
        images,
        labels,
        batch_size=batch_size,
        max_pairs=max_pairs,
        seed=seed,
        max_images=max_images,
        per_class=per_class,
    )
    weights = _weights_from(distances, bins, smoothing)
    set_region_weights(model, weights)
    return weights
