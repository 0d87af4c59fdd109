"""Whitening of concatenated descriptors: plain PCA whitening and learned whitening.

Both return an affine map as a Dense kernel ``(input_dim, dim)`` and bias ``(dim,)`` for
`remap_tf.layers.Whitening`: ``y = x @ kernel + bias = P (x - m)`` with ``kernel = Pᵀ`` and
``bias = -P m``. Descriptors are rows, ``(num_images, input_dim)``.

`pca_whitening` and `learned_whitening` work on a descriptor array in memory;
`pca_whitening_from_stream` and `learned_whitening_from_stream` on a stream of batches in
memory bounded by the dimension ``D`` and a sample size, not by the number of images (see
their docstrings); `init_whitening` streams a model's descriptors into them.

`select_whitening` (``init_whitening(..., select=True)``) is whitening that cannot lose: it
holds out part of the classes, fits candidate whitenings (output dimensions, shrinkages, and
no whitening at all) on the rest, and keeps the candidate with the best held-out mAP, "no
whitening" winning ties, so small training sets no longer make descriptors worse (issue 18
measured learned whitening from 460 images lowering ResNet50's mAP by 1.3-8).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from remap_tf import evaluation
from remap_tf.errors import InvalidInputError
from remap_tf.model import batch_predictor, whitening_layer
from remap_tf.pairs import ImageSample, matching_pairs
from remap_tf.streams import labelled_batches

# Default cap on the descriptors kept for matching pairs (learned whitening).
DEFAULT_MAX_IMAGES = 4096
# Candidates of `select_whitening`: shrinkages (fractions of the mean eigenvalue) and output
# dimensions as fractions of the layer's (1.0: all of it).
DEFAULT_SHRINKAGES = (0.1, 0.5, 1.0)
DEFAULT_DIM_FRACTIONS = (1.0, 0.5, 0.25)
# The name of the "no whitening" candidate (the identity, truncated to the layer's size).
IDENTITY = "identity"


def _check_descriptors(descriptors) -> np.ndarray:
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InvalidInputError(
            f"`descriptors` must be (num_images, dim) with at least 2 rows, received "
            f"shape {x.shape}."
        )
    if not np.all(np.isfinite(x)):
        raise InvalidInputError("`descriptors` contains NaN or infinite values.")
    return x


def _check_dim(dim, input_dim: int) -> int:
    if dim is None:
        return input_dim
    if int(dim) != dim or not 1 <= dim <= input_dim:
        raise InvalidInputError(f"`dim` must be in [1, {input_dim}] or None, received {dim!r}.")
    return int(dim)


def _regularise(matrix: np.ndarray, shrinkage: float) -> np.ndarray:
    """Adds ``shrinkage`` × (mean eigenvalue) to the diagonal, in place, so rank-deficient
    estimates (fewer samples than dimensions) stay invertible without blowing up the noise."""
    if shrinkage < 0:
        raise InvalidInputError(f"`shrinkage` must be >= 0, received {shrinkage!r}.")
    scale = np.trace(matrix) / matrix.shape[0]
    matrix[np.diag_indices_from(matrix)] += shrinkage * scale + 1e-12
    return matrix


def _as_dense(projection: np.ndarray, mean: np.ndarray, dim: int):
    """Kernel and bias of the first ``dim`` rows of ``projection``. Each row's sign is fixed
    so that its largest-magnitude weight is positive (eigenvectors have no sign of their
    own), which makes the result reproducible across equivalent computations. Allocates
    only the float32 kernel."""
    projection = projection[:dim]
    rows = np.arange(dim)
    largest = projection[rows, projection.argmax(axis=1)]
    smallest = projection[rows, projection.argmin(axis=1)]
    signs = np.where(-smallest > largest, -1.0, 1.0)
    kernel = projection.T.astype(np.float32)
    kernel *= signs.astype(np.float32)
    bias = (-(projection @ mean) * signs).astype(np.float32)
    return kernel, bias


def _pca_projection(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """Rows: principal axes by decreasing variance, scaled to unit variance. Overwrites
    ``covariance``."""
    eigenvalues, eigenvectors = np.linalg.eigh(_regularise(covariance, shrinkage))
    del covariance
    # eigh sorts eigenvalues in ascending order: reversed views put the largest first.
    return eigenvectors.T[::-1] / np.sqrt(eigenvalues[::-1])[:, None]


def _learned_projection(scatter: np.ndarray, intra: np.ndarray, shrinkage: float):
    """Whitens the intra-class covariance ``intra`` with ``L⁻¹`` (``intra = L Lᵀ``), then
    rotates onto the principal axes of the whitened data, whose scatter about the mean is
    ``L⁻¹ scatter L⁻ᵀ``. Consumes both ``(D, D)`` inputs (pass the only references): at
    most three ``(D, D)`` float64 arrays are alive at once."""
    root = np.linalg.cholesky(_regularise(intra, shrinkage))
    del intra
    inverse_root = np.linalg.inv(root)
    del root
    whitened = inverse_root @ scatter
    np.matmul(whitened, inverse_root.T, out=scatter)
    del whitened
    eigenvectors = np.linalg.eigh(scatter)[1]
    del scatter
    # eigh sorts eigenvalues in ascending order: reversed rows put the largest first.
    return (eigenvectors.T @ inverse_root)[::-1]


def _scatter(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``Σ (x - mean)(x - mean)ᵀ`` of in-memory rows, float64 ``(D, D)``."""
    centred = x - mean
    return centred.T @ centred


def _pair_covariance(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``mean (x_i - x_j)(x_i - x_j)ᵀ`` over ``pairs`` (float64 ``(D, D)``), a chunk of pairs
    at a time (differences of at most ~2^17 floats, one ``(D, D)`` product buffer)."""
    dim = x.shape[1]
    covariance = np.zeros((dim, dim))
    product = np.empty_like(covariance)
    step = max(1, (1 << 17) // dim)
    for start in range(0, len(pairs), step):
        rows = pairs[start : start + step]
        differences = x[rows[:, 0]].astype(np.float64)
        differences -= x[rows[:, 1]]
        covariance += np.dot(differences.T, differences, out=product)
    covariance /= len(pairs)
    return covariance


def _check_pairs(pairs, count: int) -> np.ndarray:
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise InvalidInputError(
            f"Need at least one matching pair as (P, 2) indices, received shape {pairs.shape}; "
            "give several images per class."
        )
    if pairs.min() < 0 or pairs.max() >= count:
        raise InvalidInputError(f"`pairs` indices must be in [0, {count}).")
    return pairs


def pca_whitening(descriptors, dim: int | None = None, shrinkage: float = 0.1):
    """PCA whitening of descriptors: centre, rotate onto principal axes, scale to unit var.

    Args:
        descriptors: ``(num_images, input_dim)``.
        dim: number of leading principal components kept (None: all).
        shrinkage: added to every eigenvalue, as a fraction of the mean eigenvalue, so the
            weak directions of a small sample are not amplified into noise.

    Returns:
        ``(kernel (input_dim, dim), bias (dim,))`` float32.

    Reference: Jégou & Chum, "Negative evidences and co-occurrences in image retrieval",
    ECCV 2012.
    """
    x = _check_descriptors(descriptors)
    dim = _check_dim(dim, x.shape[1])
    mean = x.mean(axis=0)
    return _as_dense(_pca_projection(_scatter(x, mean) / x.shape[0], shrinkage), mean, dim)


def learned_whitening(
    descriptors, labels=None, dim: int | None = None, pairs=None, shrinkage: float = 0.1
):
    """Whitening learned from matching pairs (Radenović, Tolias & Chum, TPAMI 2018).

    The intra-class covariance ``C_S = mean (x_i - x_j)(x_i - x_j)ᵀ`` over matching pairs is
    whitened with ``C_S^(-1/2)`` (by Cholesky), then the whitened data are rotated onto their
    principal axes, which orders dimensions for truncation to ``dim``. Matching pairs end up
    with identity covariance of differences; the directions that vary most across images
    (and least within a class) come first. For descriptors that do not fit in memory, see
    `learned_whitening_from_stream`.

    Args:
        descriptors: ``(num_images, input_dim)``.
        labels: ``(num_images,)`` class labels, from which the matching pairs are taken
            (`remap_tf.pairs.matching_pairs`: at most 20000, seed 0).
        dim: dimensions kept (None: all).
        pairs: ``(P, 2)`` index pairs of matching images, instead of ``labels``.
        shrinkage: regularisation of ``C_S``, as a fraction of its mean eigenvalue.

    Returns:
        ``(kernel (input_dim, dim), bias (dim,))`` float32.
    """
    x = _check_descriptors(descriptors)
    dim = _check_dim(dim, x.shape[1])
    if pairs is None:
        if labels is None:
            raise InvalidInputError("learned_whitening needs `labels` or `pairs`.")
        labels = np.asarray(labels).reshape(-1)
        if labels.size != x.shape[0]:
            raise InvalidInputError(f"{x.shape[0]} descriptors but {labels.size} labels.")
        pairs = matching_pairs(labels)
    pairs = _check_pairs(pairs, x.shape[0])
    mean = x.mean(axis=0)
    projection = _learned_projection(_scatter(x, mean), _pair_covariance(x, pairs), shrinkage)
    return _as_dense(projection, mean, dim)


class _Moments:
    """Count, mean and scatter about the mean (``Σ (x - m)(x - m)ᵀ``) of streamed rows, in
    float64: two ``(D, D)`` arrays. Sums are taken about the first batch's mean, so the
    final correction ``- n (m - K)(m - K)ᵀ`` is small and cancels nothing."""

    def __init__(self):
        self.count = 0
        self.shift = None

    def add(self, x: np.ndarray) -> None:
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.total = np.zeros(x.shape[1])
            self.cross = np.zeros((x.shape[1], x.shape[1]))
            self.product = np.empty_like(self.cross)
        centred = x - self.shift
        self.total += centred.sum(axis=0)
        np.dot(centred.T, centred, out=self.product)
        self.cross += self.product
        self.count += len(x)

    def mean(self) -> np.ndarray:
        return self.shift + self.total / self.count

    def take_scatter(self) -> np.ndarray:
        """The scatter about the mean; hands over the arrays (call once, last)."""
        offset = self.total / self.count
        scatter, product = self.cross, self.product
        self.cross = self.product = None
        np.multiply.outer(offset, offset * self.count, out=product)
        scatter -= product
        return scatter


def _descriptor_batches(batches, need_labels: bool):
    """Checked ``(descriptors (b, D) float64, labels (b,) or None)`` from a stream whose
    elements are ``(descriptors, labels)`` pairs (or descriptor arrays alone when
    ``need_labels`` is False)."""
    dim = None
    for number, element in enumerate(batches):
        where = f"batch {number} of `batches`"
        if isinstance(element, (tuple, list)) and len(element) >= 2:
            x, labels = element[0], element[1]
        elif need_labels:
            raise InvalidInputError(f"{where} must be a (descriptors, labels) pair.")
        else:
            x, labels = element, None
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
            raise InvalidInputError(
                f"{where}: descriptors must be (batch, {dim or 'dim'}), received {x.shape}."
            )
        if not np.all(np.isfinite(x)):
            raise InvalidInputError(f"{where}: descriptors contain NaN or infinite values.")
        dim = x.shape[1]
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if labels.size != len(x):
                raise InvalidInputError(f"{where}: {len(x)} descriptors but {labels.size} labels.")
        yield x, labels


def _check_count(moments: _Moments) -> None:
    if moments.count < 2:
        raise InvalidInputError(
            f"Whitening needs at least 2 descriptors, the stream gave {moments.count}."
        )


def pca_whitening_from_stream(batches, dim: int | None = None, shrinkage: float = 0.1):
    """`pca_whitening` of a stream of descriptor batches, in bounded memory.

    Streams the mean and covariance (float64). Memory: ``2 × D² × 8`` bytes while streaming
    (plus one batch), at most ``3 × D² × 8`` of NumPy arrays and LAPACK's workspace (about
    ``3.5 × D² × 8``) in the final eigen-decomposition; nothing grows with the number of
    descriptors.

    Args:
        batches: iterable of ``(batch, D)`` descriptor arrays, or of ``(descriptors,
            labels)`` pairs (labels are ignored).
        dim, shrinkage: see `pca_whitening`.

    Returns:
        ``(kernel (D, dim), bias (dim,))`` float32.
    """
    moments = _Moments()
    for x, _ in _descriptor_batches(batches, need_labels=False):
        moments.add(x)
    _check_count(moments)
    dim = _check_dim(dim, len(moments.total))
    mean = moments.mean()
    covariance = moments.take_scatter()
    covariance /= moments.count
    return _as_dense(_pca_projection(covariance, shrinkage), mean, dim)


def learned_whitening_from_stream(
    batches,
    dim: int | None = None,
    shrinkage: float = 0.1,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_pairs: int = 20000,
    seed: int = 0,
    per_class: int = 4,
):
    """`learned_whitening` of a stream of labelled descriptor batches, in bounded memory.

    The mean and the scatter of *all* descriptors are streamed (float64). The intra-class
    covariance comes from matching pairs among a bounded, class-aware sample of at most
    ``max_images`` descriptors, chosen online (`remap_tf.pairs.ImageSample`); pairs by
    `remap_tf.pairs.matching_pairs` on the sample's labels in arrival order. When the
    stream holds at most ``max_images`` descriptors, all are kept and the result equals
    ``learned_whitening(descriptors, labels)`` (same pairs) up to float rounding.

    Memory, whatever the number of descriptors: ``2 × D² × 8 + max_images × D × 4`` bytes
    while streaming (plus one batch); at the end at most ``3 × D² × 8 + max_images × D × 4``
    bytes of NumPy arrays, and LAPACK's own copies and workspace during the
    eigen-decomposition (about ``3.5 × D² × 8`` more, unseen by tracemalloc). Measured peak
    RSS growth with the defaults (``max_images=4096``): 80 MiB for D = 1152 (MobileNet v1
    α=0.75: 384 + 768) on 100k descriptors (`bench.init_memory`), 465 MiB for D = 3072
    (ResNet50: 1024 + 2048).

    Args:
        batches: iterable of ``(descriptors (batch, D), labels (batch,))``.
        dim, shrinkage: see `learned_whitening`.
        max_images, per_class, seed: the sample (`remap_tf.pairs.ImageSample`); ``seed``
            also seeds the pairs.
        max_pairs: cap on the matching pairs.

    Returns:
        ``(kernel (D, dim), bias (dim,))`` float32.
    """
    moments = _Moments()
    sample = ImageSample(max_images, seed=seed, per_class=per_class)
    kept = None
    for x, labels in _descriptor_batches(batches, need_labels=True):
        if labels is None:
            raise InvalidInputError("Learned whitening needs the labels of every batch.")
        moments.add(x)
        rows, slots = sample.offer(labels)
        if kept is None:
            kept = np.empty((max_images, x.shape[1]), np.float32)
        kept[slots] = x[rows]
    _check_count(moments)
    dim = _check_dim(dim, len(moments.total))
    slots, labels = sample.kept()
    pairs = _check_pairs(matching_pairs(labels, max_pairs=max_pairs, seed=seed), len(slots))
    mean, scatter = moments.mean(), [moments.take_scatter()]
    intra = [_pair_covariance(kept, slots[pairs])]
    del kept
    # pop() hands over the only references, so the projection can free them as it goes.
    projection = _learned_projection(scatter.pop(), intra.pop(), shrinkage)
    return _as_dense(projection, mean, dim)


@dataclasses.dataclass
class WhiteningSelection:
    """The whitening `select_whitening` kept, and why.

    Attributes:
        kernel: ``(input_dim, units)`` float32, zero-padded past ``choice["dim"]``.
        bias: ``(units,)`` float32.
        choice: ``{"method", "dim", "shrinkage", "heldout_map"}`` of the kept candidate
            (``method`` is ``"identity"`` when no whitening won).
        candidates: the same dict for every candidate, in the order they were tried.
        heldout: ``{"classes", "images"}`` held out.
    """

    kernel: np.ndarray
    bias: np.ndarray
    choice: dict
    candidates: list
    heldout: dict

    def record(self) -> dict:
        """A JSON-ready summary for the model config and the training log."""
        return {"choice": self.choice, "candidates": self.candidates, "heldout": self.heldout}


def select_whitening(
    descriptors,
    labels,
    units: int | None = None,
    method: str = "learned",
    *,
    holdout: float = 0.3,
    shrinkages=DEFAULT_SHRINKAGES,
    dims=None,
    seed: int = 0,
    max_pairs: int = 20000,
):
    """Whitening chosen by held-out mAP, "no whitening" included: it cannot lose on held-out.

    The classes are split (seeded) into a fitting part and a held-out part of about
    ``holdout`` of the classes with at least two images. Every candidate (the identity, then
    ``method`` for every output dimension in ``dims`` and shrinkage in ``shrinkages``) is
    fitted on the fitting part and scored on the held-out part: each held-out image queries
    the other held-out images (itself junk, its class the positives), descriptors
    ``L2(x @ kernel + bias)``. The best mAP wins, earlier candidates winning ties, so the
    identity is kept unless a whitening does strictly better. A chosen whitening is then
    refitted on all the images with its dimension and shrinkage.

    Args:
        descriptors: ``(num_images, input_dim)`` pre-whitening descriptors.
        labels: ``(num_images,)`` class labels.
        units: the whitening layer's output size (None: ``input_dim``); a candidate of fewer
            dimensions is zero-padded to it (zero columns change no dot product).
        method: ``"learned"`` or ``"pca"``.
        holdout: fraction of the classes held out, in (0, 1).
        shrinkages: candidate regularisations (see `learned_whitening`).
        dims: candidate output dimensions (default: 1, 1/2 and 1/4 of ``units``).
        seed: seeds the class split and the pairs.
        max_pairs: cap on the matching pairs of learned whitening.

    Returns:
        a `WhiteningSelection`.
    """
    x = _check_descriptors(descriptors)
    labels = np.asarray(labels).reshape(-1)
    if labels.size != x.shape[0]:
        raise InvalidInputError(f"{x.shape[0]} descriptors but {labels.size} labels.")
    if method not in ("learned", "pca"):
        raise InvalidInputError(
            f"Unknown whitening method {method!r}; expected 'learned' or 'pca'."
        )
    units = _check_dim(units, x.shape[1])
    fit, held = _split_classes(labels, holdout, seed)
    dims = (
        sorted({_check_dim(d, units) for d in dims}, reverse=True)
        if dims
        else [max(1, int(round(units * f))) for f in DEFAULT_DIM_FRACTIONS]
    )
    candidates = [(IDENTITY, units, None)] + [
        (method, d, float(k)) for d in dict.fromkeys(dims) for k in shrinkages
    ]
    scored = []
    for name, dim, shrinkage in candidates:
        kernel, bias = _candidate(x[fit], labels[fit], units, name, dim, shrinkage, seed, max_pairs)
        score = _heldout_map(x[held], labels[held], kernel, bias)
        scored.append({"method": name, "dim": dim, "shrinkage": shrinkage, "heldout_map": score})
    best = max(range(len(scored)), key=lambda i: (scored[i]["heldout_map"], -i))
    choice = scored[best]
    kernel, bias = _candidate(
        x, labels, units, choice["method"], choice["dim"], choice["shrinkage"], seed, max_pairs
    )
    heldout = {"classes": int(len(np.unique(labels[held]))), "images": int(held.sum())}
    return WhiteningSelection(kernel, bias, dict(choice), scored, heldout)


def _split_classes(labels: np.ndarray, holdout: float, seed: int):
    """Boolean masks ``(fit, held)``: about ``holdout`` of the classes with >= 2 images held
    out, at least two classes on each side."""
    if not 0 < holdout < 1:
        raise InvalidInputError(f"`holdout` must be in (0, 1), received {holdout!r}.")
    classes, counts = np.unique(labels, return_counts=True)
    usable = classes[counts >= 2]
    if len(usable) < 4:
        raise InvalidInputError(
            f"Whitening selection needs at least 4 classes with 2 or more images (2 to fit, 2 "
            f"to hold out), received {len(usable)}."
        )
    count = min(max(2, int(round(holdout * len(usable)))), len(usable) - 2)
    chosen = np.random.default_rng(seed).choice(usable, size=count, replace=False)
    held = np.isin(labels, chosen)
    return ~held, held


def _candidate(x, labels, units, name, dim, shrinkage, seed, max_pairs):
    """Kernel ``(input_dim, units)`` and bias of one candidate, zero-padded past ``dim``."""
    kernel = np.zeros((x.shape[1], units), np.float32)
    bias = np.zeros(units, np.float32)
    if name == IDENTITY:
        kernel[np.arange(units), np.arange(units)] = 1.0
        return kernel, bias
    if name == "pca":
        part_kernel, part_bias = pca_whitening(x, dim=dim, shrinkage=shrinkage)
    else:
        pairs = matching_pairs(labels, max_pairs=max_pairs, seed=seed)
        part_kernel, part_bias = learned_whitening(x, dim=dim, pairs=pairs, shrinkage=shrinkage)
    kernel[:, :dim], bias[:dim] = part_kernel, part_bias
    return kernel, bias


def _heldout_map(x, labels, kernel, bias) -> float:
    """mAP of the held-out images querying each other (each its own junk), in %."""
    y = x @ kernel.astype(np.float64) + bias
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    rankings = evaluation.rank_database(y, y)
    positives = [
        np.flatnonzero((labels == label) & (np.arange(len(labels)) != i))
        for i, label in enumerate(labels)
    ]
    junk = [[i] for i in range(len(labels))]
    return float(100 * evaluation.mean_average_precision(rankings, positives, junk, (1,))["mAP"])


def set_whitening(model, kernel, bias) -> None:
    """Sets the whitening layer of a `remap_tf.model.REMAP` model."""
    whitening_layer(model).set_whitening(kernel, bias)


def init_whitening(
    model,
    images,
    labels=None,
    method: str = "learned",
    batch_size: int = 16,
    shrinkage: float = 0.1,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_pairs: int = 20000,
    seed: int = 0,
    per_class: int = 4,
    select: bool = False,
    holdout: float = 0.3,
):
    """Computes the model's pre-whitening descriptors on ``images`` and sets the whitening.

    Descriptors are computed a batch at a time and streamed into
    `learned_whitening_from_stream` or `pca_whitening_from_stream`, so memory does not grow
    with the number of images (see those functions for the bounds).

    Args:
        model: a `remap_tf.model.REMAP` model.
        images: ``(num_images, height, width, 3)`` RGB 0-255, or a stream
            (``tf.data.Dataset``, generator) of ``(images (b, h, w, 3), labels (b,))``
            batches, read once; sizes may differ between batches (for ``"pca"`` the batches
            may be images alone).
        labels: ``(num_images,)`` class labels for an array (needed for ``"learned"``);
            None for a stream.
        method: ``"learned"`` (from matching pairs) or ``"pca"``.
        batch_size: images per forward pass (arrays).
        shrinkage: see `learned_whitening` / `pca_whitening`.
        max_images, max_pairs, seed, per_class: see `learned_whitening_from_stream`.
        select: choose by held-out mAP among no whitening and ``method`` at several output
            dimensions and shrinkages (`select_whitening`; ``shrinkage`` is then one of the
            candidates). Keeps every descriptor in memory (``num_images × D`` floats) and
            needs labels. The choice and the held-out figures are recorded in the whitening
            layer's config (``selection``, saved with the model).
        holdout: fraction of the classes held out when ``select``.

    Returns:
        ``(kernel, bias)`` that were set.
    """
    if method not in ("learned", "pca"):
        raise InvalidInputError(
            f"Unknown whitening method {method!r}; expected 'learned' or 'pca'."
        )
    layer = whitening_layer(model)
    dim = int(layer.kernel.shape[1])
    predict = batch_predictor(model, "pre_whitening")
    batches = labelled_batches(
        images, labels, batch_size, need_labels=method == "learned" or select
    )
    descriptors = ((predict(x), y) for x, y in batches)
    if select:
        shrinkages = tuple(dict.fromkeys((*DEFAULT_SHRINKAGES, float(shrinkage))))
        options = {"method": method, "holdout": holdout, "seed": seed, "max_pairs": max_pairs}
        return _select_into(layer, descriptors, shrinkages=shrinkages, **options)
    if method == "learned":
        kernel, bias = learned_whitening_from_stream(
            descriptors,
            dim=dim,
            shrinkage=shrinkage,
            max_images=max_images,
            max_pairs=max_pairs,
            seed=seed,
            per_class=per_class,
        )
    else:
        kernel, bias = pca_whitening_from_stream(descriptors, dim=dim, shrinkage=shrinkage)
    layer.set_whitening(kernel, bias)
    return kernel, bias


def _select_into(layer, descriptors, **options):
    """`select_whitening` on every streamed ``(descriptors, labels)`` batch, set on ``layer``
    with the choice recorded in its config."""
    parts = list(descriptors)
    chosen = select_whitening(
        np.concatenate([x for x, _ in parts]),
        np.concatenate([np.asarray(y).reshape(-1) for _, y in parts]),
        units=int(layer.kernel.shape[1]),
        **options,
    )
    layer.set_whitening(chosen.kernel, chosen.bias)
    layer.selection = chosen.record()
    return chosen.kernel, chosen.bias
