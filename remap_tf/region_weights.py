"""KL-divergence initialisation of REMAP's region weights (Husain & Bober, TIP 2019, §III-B).

For every (layer, region), REMAP measures how well that region alone separates matching from
non-matching image pairs: the Euclidean distances between the pair's L2-normalised region
vectors form one distribution for matching pairs and one for non-matching pairs, and the KL
divergence between the two is the region's initial weight. Regions whose distances tell the
two kinds of pair apart get large weights; regions that do not (background, borders) get
small ones.
"""

from __future__ import annotations

import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.model import region_model, region_weighting_layers, set_region_weights
from remap_tf.pairs import sample_pairs


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


def region_pair_distances(
    model, images, labels, batch_size: int = 16, max_pairs: int = 2000, seed: int = 0
):
    """Per-region distances of matching and non-matching pairs, for every tapped layer.

    Args:
        model: a REMAP model (`remap_tf.model.REMAP` with ``pooling="remap"``).
        images: ``(num_images, height, width, 3)`` RGB 0-255.
        labels: ``(num_images,)`` class labels.
        batch_size: images per forward pass.
        max_pairs: cap on each kind of pair.
        seed: seeds the pair sampling.

    Returns:
        list, one entry per layer, of ``(matching (P, regions), non_matching (Q, regions))``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(f"`images` must be (num_images, h, w, 3), received {images.shape}.")
    if len(images) != len(labels):
        raise InvalidInputError(f"{len(images)} images but {len(labels)} labels.")
    matching, non_matching = sample_pairs(labels, max_pairs=max_pairs, seed=seed)
    outputs = region_model(model).predict(images, batch_size=batch_size, verbose=0)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    result = []
    for regions in outputs:
        regions = np.asarray(regions, dtype=np.float32)  # (num_images, regions, channels)

        def distances(pairs, regions=regions):
            return np.linalg.norm(regions[pairs[:, 0]] - regions[pairs[:, 1]], axis=-1)

        result.append((distances(matching), distances(non_matching)))
    return result


def init_region_weights(
    model,
    images,
    labels,
    batch_size: int = 16,
    max_pairs: int = 2000,
    seed: int = 0,
    bins: int = 64,
    smoothing: float = 0.5,
) -> np.ndarray:
    """Sets a REMAP model's region weights from KL divergences on a labelled image set.

    Each layer's KL values are divided by their mean, so the weights average 1 as R-MAC's do
    (the scale of a layer's weights does not change its L2-normalised vector, but it sets how
    far an optimiser step moves them). A layer whose regions all score 0 keeps weight 1.

    Args:
        model: a REMAP model (``pooling="remap"``).
        images: ``(num_images, height, width, 3)`` RGB 0-255, several images per class.
        labels: ``(num_images,)`` class labels.
        batch_size, max_pairs, seed: see `region_pair_distances`.
        bins, smoothing: see `kl_divergence_per_region`.

    Returns:
        the weights set, ``(num_layers, num_regions)``.
    """
    if not region_weighting_layers(model):
        raise InvalidInputError(f"Model {model.name!r} has no learnable region weights.")
    weights = []
    for matching, non_matching in region_pair_distances(
        model, images, labels, batch_size=batch_size, max_pairs=max_pairs, seed=seed
    ):
        kl = kl_divergence_per_region(matching, non_matching, bins=bins, smoothing=smoothing)
        mean = kl.mean()
        weights.append(kl / mean if mean > 0 else np.ones_like(kl))
    weights = np.stack(weights).astype(np.float32)
    set_region_weights(model, weights)
    return weights
