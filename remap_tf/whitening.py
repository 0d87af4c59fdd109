"""Whitening of concatenated descriptors: plain PCA whitening and learned whitening.

Both return an affine map as a Dense kernel ``(input_dim, dim)`` and bias ``(dim,)`` for
`remap_tf.layers.Whitening`: ``y = x @ kernel + bias = P (x - m)`` with ``kernel = Pᵀ`` and
``bias = -P m``. Descriptors are rows, ``(num_images, input_dim)``.
"""

from __future__ import annotations

import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.model import pre_whitening_model, whitening_layer
from remap_tf.pairs import matching_pairs


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
    """Adds ``shrinkage`` × (mean eigenvalue) to the diagonal, so rank-deficient estimates
    (fewer samples than dimensions) stay invertible without blowing up the noise."""
    if shrinkage < 0:
        raise InvalidInputError(f"`shrinkage` must be >= 0, received {shrinkage!r}.")
    scale = np.trace(matrix) / matrix.shape[0]
    return matrix + (shrinkage * scale + 1e-12) * np.eye(matrix.shape[0])


def _as_dense(projection: np.ndarray, mean: np.ndarray, dim: int):
    projection = projection[:dim]
    kernel = projection.T.astype(np.float32)
    bias = (-projection @ mean).astype(np.float32)
    return kernel, bias


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
    centred = x - mean
    covariance = _regularise(centred.T @ centred / x.shape[0], shrinkage)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    projection = eigenvectors[:, order].T / np.sqrt(eigenvalues[order])[:, None]
    return _as_dense(projection, mean, dim)


def learned_whitening(
    descriptors, labels=None, dim: int | None = None, pairs=None, shrinkage: float = 0.1
):
    """Whitening learned from matching pairs (Radenović, Tolias & Chum, TPAMI 2018).

    The intra-class covariance ``C_S = mean (x_i - x_j)(x_i - x_j)ᵀ`` over matching pairs is
    whitened with ``C_S^(-1/2)`` (by Cholesky), then the whitened data are rotated onto their
    principal axes, which orders dimensions for truncation to ``dim``. Matching pairs end up
    with identity covariance of differences; the directions that vary most across images
    (and least within a class) come first.

    Args:
        descriptors: ``(num_images, input_dim)``.
        labels: ``(num_images,)`` class labels, from which all matching pairs are taken.
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
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise InvalidInputError(
            f"Need at least one matching pair as (P, 2) indices, received shape {pairs.shape}; "
            "give several images per class."
        )
    if pairs.min() < 0 or pairs.max() >= x.shape[0]:
        raise InvalidInputError(f"`pairs` indices must be in [0, {x.shape[0]}).")

    mean = x.mean(axis=0)
    differences = x[pairs[:, 0]] - x[pairs[:, 1]]
    intra = _regularise(differences.T @ differences / len(differences), shrinkage)
    inverse_root = np.linalg.inv(np.linalg.cholesky(intra))  # L⁻¹ with C_S = L Lᵀ
    whitened = (x - mean) @ inverse_root.T
    eigenvalues, eigenvectors = np.linalg.eigh(whitened.T @ whitened)
    order = np.argsort(eigenvalues)[::-1]
    projection = eigenvectors[:, order].T @ inverse_root
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
):
    """Computes the model's pre-whitening descriptors on ``images`` and sets the whitening.

    Args:
        model: a `remap_tf.model.REMAP` model.
        images: ``(num_images, height, width, 3)`` RGB 0-255.
        labels: ``(num_images,)`` class labels (needed for ``"learned"``).
        method: ``"learned"`` (from matching pairs) or ``"pca"``.
        batch_size: images per forward pass.
        shrinkage: see `learned_whitening` / `pca_whitening`.

    Returns:
        ``(kernel, bias)`` that were set.
    """
    if method not in ("learned", "pca"):
        raise InvalidInputError(
            f"Unknown whitening method {method!r}; expected 'learned' or 'pca'."
        )
    layer = whitening_layer(model)
    descriptors = pre_whitening_model(model).predict(
        np.asarray(images), batch_size=batch_size, verbose=0
    )
    dim = int(layer.kernel.shape[1])
    if method == "learned":
        kernel, bias = learned_whitening(descriptors, labels, dim=dim, shrinkage=shrinkage)
    else:
        kernel, bias = pca_whitening(descriptors, dim=dim, shrinkage=shrinkage)
    layer.set_whitening(kernel, bias)
    return kernel, bias
