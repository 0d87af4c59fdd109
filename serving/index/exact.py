"""Exact search: every database row scored with a NumPy dot product; the yardstick.

Saved files beside the common ones (`remap_tf.serving.index.rows`)::

    descriptors.npy   the (N, D) float32 rows, loaded with allow_pickle=False
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from remap_tf.contract import MANIFEST_FILE
from remap_tf.serving.index.registry import register
from remap_tf.serving.index.rows import RowIndex
from remap_tf.serving.manifest import IndexFormatError


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest scores per row, best first.

    Args:
        scores: ``(num_queries, num_database)``.
        k: how many to keep (at most ``num_database``).

    Returns:
        ``(indices, values)``, each ``(num_queries, min(k, num_database))``.
    """
    n = scores.shape[1]
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape).copy()
    values = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(values, order, axis=1)


@register("exact")
class ExactIndex(RowIndex):
    """Exhaustive dot-product search in NumPy: exact, the yardstick for approximate indexes.

    Args:
        dim: descriptor dimension.
        chunk: queries scored at a time (memory is chunk * len(index) floats).
    """

    def __init__(self, dim: int, chunk: int = 256):
        super().__init__(dim)
        self._chunk = int(chunk)
        self._vectors = np.zeros((0, self._dim), dtype=np.float32)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "dim": self._dim, "chunk": self._chunk}

    @property
    def descriptors(self) -> np.ndarray:
        """(len, dim) float32 rows in the order of ``ids`` (read-only view)."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def _add_rows(self, descriptors) -> None:
        self._vectors = np.concatenate([self._vectors, descriptors])

    def _delete_ids(self, ids) -> None:
        self._vectors = self._vectors[self._delete_keeping_order(ids)]

    def search(self, queries, k: int = 10):
        q = self._check_queries(queries, k)
        k = min(int(k), len(self))
        if k == 0:
            return np.empty((q.shape[0], 0), dtype=object), np.empty((q.shape[0], 0), np.float32)
        rows = np.empty((q.shape[0], k), dtype=np.int64)
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        for start in range(0, q.shape[0], self._chunk):
            stop = start + self._chunk
            rows[start:stop], scores[start:stop] = top_k(q[start:stop] @ self._vectors.T, k)
        return self._results(rows, scores)

    def _write_payload(self, directory: Path) -> None:
        with open(directory / "descriptors.npy", "wb") as handle:
            np.save(handle, self._vectors, allow_pickle=False)

    @classmethod
    def _from_payload(cls, directory, manifest, ids, config):
        if "descriptors.npy" not in manifest["files"]:
            raise IndexFormatError(f"{directory}/{MANIFEST_FILE} does not list descriptors.npy")
        try:
            vectors = np.load(directory / "descriptors.npy", allow_pickle=False)
        except ValueError as error:
            raise IndexFormatError(f"{directory}/descriptors.npy: {error}") from None
        if vectors.shape != (manifest["count"], manifest["dim"]) or vectors.dtype != np.float32:
            raise IndexFormatError(
                f"{directory}/descriptors.npy has shape {vectors.shape} {vectors.dtype}, "
                f"expected ({manifest['count']}, {manifest['dim']}) float32"
            )
        index = cls(manifest["dim"], chunk=int(config.get("chunk", 256)))
        index._vectors = vectors
        return index
