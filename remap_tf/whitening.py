"""Whitening of concatenated descriptors: plain PCA whitening and learned whitening.

Both return an affine map as a Dense kernel ``(input_dim, dim)`` and bias ``(dim,)`` for
`remap_tf.layers.Whitening`: ``y = x @ kernel + bias = P (x - m)`` with ``kernel = Pᵀ`` and
``bias = -P m``. Descriptors are rows, ``(num_images, input_dim)``.

`pca_whitening` and `learned_whitening` work on a descriptor array in memory;
`pca_whitening_from_stream` and `learned_whitening_from_stream` on a stream of batches in
memory bounded by the dimension ``D`` and a sample size, not by the number of images (see
their docstrings); `init_whitening` streams a model's descriptors into them.
"""

from __future__ import annotations

import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.model import batch_predictor, whitening_layer
from remap_tf.pairs import ImageSample, matching_pairs
from remap_tf.streams import labelled_batches

# Default cap on the descriptors kept for matching pairs (learned whitening).
DEFAULT_MAX_IMAGES = 4096


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
    batches = labelled_batches(images, labels, batch_size, need_labels=method == "learned")
    descriptors = ((predict(x), y) for x, y in batches)
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
