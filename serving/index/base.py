"""The interface every index kind implements, and `load_index`, the one entry point on disk.

``Index`` is the interface (``add``, ``search``, ``delete``, ``save``, ``load``, ``config``,
``ids``, ``len``, ``in``, ``dim``, ``metadata``), as in TensorFlow Similarity's search index.
Descriptors are rows ``(num_vectors, dim)`` of float32, compared by dot product (cosine for
the L2-normalised REMAP descriptors); ids are the user's strings.

``Index.load`` reads the saved manifest's ``kind`` and hands the folder to the class registered
under it (`remap_tf.serving.index.registry`), so this module names no implementation: single
indexes derive from `remap_tf.serving.index.rows.RowIndex`, `ExactIndex` and `ScannIndex` among
them; `ShardedIndex` holds shards of those.

Example:
    >>> index = ScannIndex(dim=256)
    >>> index.add(["a.jpg", "b.jpg"], descriptors)        # (2, 256)
    >>> ids, scores = index.search(query_descriptors, k=1)  # (num_queries, 1) each
    >>> index.save("my_index"); same = load_index("my_index")
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.serving.index.files import check_matrix, read_manifest
from remap_tf.serving.index.registry import index_class
from remap_tf.serving.manifest import IndexFormatError


class Index(abc.ABC):
    """A searchable set of (id, descriptor) pairs, compared by dot product.

    A kind implements the abstract members and registers itself with
    ``@registry.register("<kind>")``, which sets ``kind``.

    Args:
        dim: descriptor dimension.
    """

    kind: str = ""

    def __init__(self, dim: int):
        if int(dim) <= 0:
            raise InvalidInputError(f"dim must be a positive integer, got {dim}")
        self._dim = int(dim)
        # Free-form JSON saved with the index (e.g. the image root and the model it came from).
        self.metadata: dict = {}

    @property
    def dim(self) -> int:
        return self._dim

    def _check_queries(self, queries, k: int) -> np.ndarray:
        """The checked ``(num_queries, dim)`` float32 queries of a ``search``."""
        if int(k) <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k}")
        return check_matrix(queries, self._dim, "queries")

    # -- to implement ----------------------------------------------------------------

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of vectors."""

    @abc.abstractmethod
    def __contains__(self, item: str) -> bool:
        """Whether the id is in the index."""

    @property
    @abc.abstractmethod
    def ids(self) -> list[str]:
        """The ids (a copy)."""

    @abc.abstractmethod
    def add(self, ids: Sequence[str], descriptors: np.ndarray) -> None:
        """Adds ``descriptors`` (num, dim) under the new string ``ids`` (num,).

        Raises:
            InvalidInputError: ids that are not strings, repeat, or are already present;
                descriptors of the wrong shape or not finite. Nothing is added then.
        """

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Removes the given ids (UnknownIdError naming any that are absent)."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k best database ids for each query.

        Args:
            queries: (num_queries, dim) float descriptors (or one (dim,) vector).
            k: neighbours per query.

        Returns:
            ``(ids, scores)``: ids an object array (num_queries, min(k, len)) of id strings,
            scores float32 of the same shape (dot products), best first. Where fewer results
            exist, ids are None and scores -inf.
        """

    @property
    @abc.abstractmethod
    def config(self) -> dict:
        """The index configuration as a JSON-serialisable dict."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to ``directory``, replacing an index there only once complete.

        Returns:
            The directory.
        """

    @classmethod
    @abc.abstractmethod
    def _from_saved(cls, directory: Path, manifest: dict, shards: Iterable[int] | None):
        """Loads a folder whose manifest (format, version, kind) `load` has read; checks the
        rest, every file's checksum included, before reading anything else."""

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | os.PathLike, shards: Iterable[int] | None = None) -> Index:
        """Loads an index saved by ``save`` after verifying its manifest and checksums.

        Called on ``Index`` it returns whichever kind was saved; called on a subclass it
        refuses an index of another kind.

        Args:
            directory: the saved folder.
            shards: for a sharded index, the shard numbers to load (default all); other
                kinds refuse it.

        Raises:
            FileNotFoundError: no such directory or no manifest.
            IndexFormatError: a file is missing, truncated or altered, or the manifest is
                not one this version can read.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        kind = manifest["kind"]
        target = index_class(kind)
        if target is None:
            raise IndexFormatError(f"{directory}: unknown index kind {kind!r}")
        if not issubclass(target, cls):
            raise IndexFormatError(
                f"{directory} holds a {kind!r} index, not a {cls.kind or cls.__name__!r} "
                "index; use serving.index.load_index to load any kind"
            )
        return target._from_saved(directory, manifest, shards)


def load_index(directory: str | os.PathLike, shards: Iterable[int] | None = None) -> Index:
    """Loads a saved index of any kind: the one entry point for every index on disk.

    Args:
        directory: a directory written by an index's ``save``.
        shards: for a sharded index, the shard numbers to load (default all); a single
            index refuses it.

    Returns:
        The index, of the kind its manifest names (``ScannIndex``, ``ExactIndex``,
        ``ShardedIndex``, ...).
    """
    return Index.load(directory, shards=shards)
