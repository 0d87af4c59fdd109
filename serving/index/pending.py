"""The rows an index was given before its build, read a batch at a time.

A build that streams (``ScannIndex.build``) never joins what it was given into one matrix:
the caller's arrays stay where they are and `remap_tf.serving.index.rows.LazyRows` (e.g. the
shards of a descriptor folder) are read when a pass needs them, one part at a time.
`PendingRows` addresses all of them by global row number: `take` gathers chosen rows (the
training sample, the held-out queries), `batches` yields chosen rows in order, at most
``size`` at a time, so a pass over n rows costs one part plus one batch of memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from remap_tf.serving.index.rows import LazyRows


class PendingRows:
    """Rows ``0..n-1``: arrays held by the caller and `LazyRows`, in the order added.

    Args:
        parts: ``(count, dim)`` float32 arrays (checked already) and `LazyRows`.
        dim: the descriptor dimension (checked when a `LazyRows` is read).
    """

    def __init__(self, parts: Sequence[np.ndarray | LazyRows], dim: int):
        self.parts, self.dim = list(parts), int(dim)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, number: int) -> np.ndarray:
        part = self.parts[number]
        return part.rows(self.dim) if isinstance(part, LazyRows) else part

    def _split(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(part, its local rows)`` for each part holding some of the sorted ``rows``."""
        edges = np.searchsorted(rows, self.starts)
        for number in range(len(self.parts)):
            if edges[number + 1] > edges[number]:
                yield number, rows[edges[number] : edges[number + 1]] - self.starts[number]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (ascending) as one new ``(len(rows), dim)`` array."""
        out = np.empty((len(rows), self.dim), np.float32)
        filled = 0
        for number, local in self._split(np.asarray(rows, np.int64)):
            out[filled : filled + len(local)] = self._read(number)[local]
            filled += len(local)
        return out

    def batches(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        """The given rows (ascending) in order, as arrays of at most ``size`` rows."""
        for number, local in self._split(np.asarray(rows, np.int64)):
            part = self._read(number)
            for start in range(0, len(local), size):
                yield part[local[start : start + size]]
            del part  # not held while the next part is read

    def all(self) -> np.ndarray:
        """Every row as one array (a copy unless there is a single in-memory part)."""
        if len(self.parts) == 1 and not isinstance(self.parts[0], LazyRows):
            return self.parts[0]
        return self.take(np.arange(len(self)))
