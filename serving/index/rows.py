"""A single index: its vectors are rows, and this base class keeps their ids, row by row.

``RowIndex`` implements the id side of `remap_tf.serving.index.base.Index` once (add, delete,
membership, mapping result rows back to ids, the saved folder); a kind such as ``ExactIndex``
or ``ScannIndex`` stores the vectors and implements the hooks (``_add_rows``, ``_delete_ids``,
``search``, ``config``, ``_write_payload``, ``_from_payload``). A kind that reorders its rows
tells the base class with ``_reorder_rows`` instead of touching the id list.

On-disk format (a directory, written atomically: built aside, then renamed into place)::

    manifest.json   {"format": "remap-index", "format_version": 1, "kind": "scann"|"exact",
                     "dim": D, "count": N, "files": {relative path: {"sha256", "bytes"}}}
    config.json     the resolved index configuration
    metadata.json   free-form JSON from ``Index.metadata`` (e.g. the image root, the model)
    ids.json        the N ids, in the order of the vectors
    ...             the kind's own files (``_write_payload``)

Loading checks the manifest and the size and SHA-256 of every file before reading anything
else, and refuses a truncated, altered or incomplete index with an ``IndexFormatError``.
"""

from __future__ import annotations

import abc
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from remap_tf.errors import InvalidInputError, UnknownIdError
from remap_tf.io import atomic_write_json
from remap_tf.serving.index.base import Index
from remap_tf.serving.index.files import (
    check_ids,
    check_matrix,
    staged_index_dir,
    verify_index,
    write_manifest,
)
from remap_tf.serving.manifest import IndexFormatError, file_entries, read_json


class LazyRows:
    """``count`` descriptor rows read only when needed (e.g. one descriptor shard on disk).

    A kind that streams its build (ScaNN) reads them a part at a time, as often as it needs,
    instead of holding every row; any other kind reads them all at once.

    Args:
        count: the number of rows ``load`` returns.
        load: ``load() -> (count, dim)`` rows, read afresh at each call.
        name: what the rows are, for error messages (e.g. the shard's file).
    """

    def __init__(self, count: int, load: Callable[[], np.ndarray], name: str):
        self.count, self.name, self._load = int(count), str(name), load

    def __len__(self) -> int:
        return self.count

    def rows(self, dim: int) -> np.ndarray:
        """The rows, checked (`check_matrix`): ``(count, dim)`` contiguous float32."""
        x = check_matrix(self._load(), dim, self.name)
        if x.shape[0] != self.count:
            raise InvalidInputError(f"{self.name} holds {x.shape[0]} rows, not {self.count}")
        return x


class RowIndex(Index):
    """An `Index` whose vectors are rows ``0..len-1``; the ids are kept here, in row order.

    Args:
        dim: descriptor dimension.
    """

    def __init__(self, dim: int):
        super().__init__(dim)
        self._ids: list[str] = []
        # id -> row, built on the first lookup after the ids were replaced or reordered
        # (`_positions`): ~80 bytes per id, which a fresh build, a save or a load that only
        # searches never needs, so they do not pay it (0.04x of 512-d float32 rows).
        self._position_map: dict[str, int] | None = None
        # Held to build the map and to change the ids: an unlocked ``in`` (the service's)
        # must not install a map of ids a concurrent change has since replaced.
        self._ids_lock = threading.RLock()
        self._id_array: np.ndarray | None = None  # ids + [None], cached for searches

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item: str) -> bool:
        return item in self._positions

    @property
    def _positions(self) -> dict[str, int]:
        """The row of each id, built now if it is not (see ``__init__``). A built map is
        returned without the lock: only installing one needs it, not every lookup."""
        positions = self._position_map
        if positions is not None:
            return positions
        with self._ids_lock:
            if self._position_map is None:
                self._position_map = {i: n for n, i in enumerate(self._ids)}
            return self._position_map

    @property
    def ids(self) -> list[str]:
        """The ids in the order of the stored vectors (a copy)."""
        return list(self._ids)

    # -- the protected API for kinds ---------------------------------------------------

    def _set_ids(self, ids: list[str]) -> None:
        """Makes ``ids`` the ids of rows ``0..len(ids)-1``."""
        with self._ids_lock:
            self._ids = list(ids)
            self._position_map = None
            self._id_array = None

    def _reorder_rows(self, order: np.ndarray) -> None:
        """Row ``n`` becomes the old row ``order[n]`` (a permutation), for a kind that
        reorders its vectors the same way. The id map is dropped, to be rebuilt on the next
        lookup: ScaNN's build reorders at its peak, where the map would cost ~80 bytes per id."""
        with self._ids_lock:
            self._ids = [self._ids[i] for i in order]
            self._position_map = None
            self._id_array = None

    def _results(self, rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps integer rows (-1 = no result) to ids (None) and pads scores with -inf."""
        if self._id_array is None or len(self._id_array) != len(self._ids) + 1:
            self._id_array = np.asarray(self._ids + [None], dtype=object)
        id_array = self._id_array
        rows = np.where(rows < 0, len(self._ids), rows)
        scores = np.where(rows == len(self._ids), -np.inf, scores).astype(np.float32)
        return id_array[rows], scores

    def _delete_keeping_order(self, ids: list[str]) -> np.ndarray:
        """Drops ``ids`` from the id list, keeping the others in order; returns the row mask
        of the vectors to keep."""
        keep = np.ones(len(self._ids), dtype=bool)
        keep[[self._positions[i] for i in ids]] = False
        self._set_ids([i for i, kept in zip(self._ids, keep, strict=True) if kept])
        return keep

    def _delete_swapping_last(self, ids: list[str]) -> list[int]:
        """Drops ``ids`` one by one, moving the last id into each freed row (as ScaNN moves
        its vectors); returns the rows deleted, in order."""
        rows = []
        with self._ids_lock:
            positions = self._positions
            for i in ids:
                row = positions.pop(i)
                rows.append(row)
                last = self._ids.pop()
                if last != i:
                    self._ids[row] = last
                    positions[last] = row
            self._id_array = None
        return rows

    # -- the Index interface -----------------------------------------------------------

    def add(self, ids: Sequence[str], descriptors: np.ndarray) -> None:
        """See ``Index.add``."""
        ids = check_ids(ids)
        x = check_matrix(descriptors, self._dim, "descriptors")
        if len(ids) != x.shape[0]:
            raise InvalidInputError(f"{len(ids)} ids for {x.shape[0]} descriptors")
        self._check_new(ids)
        if not ids:
            return
        self._add_rows(x)  # rows len(self)..len(self)+n-1, in order
        self._append_ids(ids)

    def add_lazily(self, ids: Sequence[str], parts: Sequence[LazyRows]) -> None:
        """Adds the rows of ``parts`` (in order) under ``ids``, reading them only when the
        kind needs them: a ScaNN index not yet built streams them through its build, a part
        at a time; any other kind reads them all now (`_add_lazy`).

        Args:
            ids: one id per row of all the parts together.
            parts: `LazyRows`, e.g. the shards of a descriptor folder.
        """
        ids = check_ids(ids)
        parts = list(parts)
        total = sum(len(p) for p in parts)
        if len(ids) != total:
            raise InvalidInputError(f"{len(ids)} ids for {total} descriptors")
        self._check_new(ids)
        if not ids:
            return
        self._add_lazy(parts)
        self._append_ids(ids)

    def _check_new(self, ids: list[str]) -> None:
        if not self._ids:  # nothing to collide with: no id map to build
            return
        present = [i for i in ids if i in self._positions]
        if present:
            raise InvalidInputError(f"ids already in the index (delete them first): {present[:5]}")

    def _append_ids(self, ids: list[str]) -> None:
        with self._ids_lock:
            start = len(self._ids)
            self._ids.extend(ids)
            if self._position_map is not None:
                self._position_map.update({i: start + n for n, i in enumerate(ids)})
            self._id_array = None

    def delete(self, ids: Sequence[str]) -> None:
        """See ``Index.delete``."""
        ids = check_ids(ids)
        missing = [i for i in ids if i not in self._positions]
        if missing:
            raise UnknownIdError(f"ids not in the index: {missing[:5]}")
        if ids:
            self._delete_ids(ids)
            self._id_array = None

    # -- to implement ----------------------------------------------------------------

    @abc.abstractmethod
    def _add_rows(self, descriptors: np.ndarray) -> None:
        """Appends checked float32 rows ``(n, dim)`` after the existing ones."""

    def _add_lazy(self, parts: list[LazyRows]) -> None:
        """Appends the rows of ``parts``; by default reads them all now (`_add_rows`)."""
        rows = [p.rows(self._dim) for p in parts]
        self._add_rows(rows[0] if len(rows) == 1 else np.concatenate(rows))

    @abc.abstractmethod
    def _delete_ids(self, ids: list[str]) -> None:
        """Removes known ``ids``: updates the id list (with a ``_delete_*`` helper above) and
        the vectors alike."""

    @abc.abstractmethod
    def _write_payload(self, directory: Path) -> None:
        """Writes everything but ids.json, config.json, metadata.json and manifest.json."""

    @classmethod
    @abc.abstractmethod
    def _from_payload(cls, directory: Path, manifest: dict, ids: list[str], config: dict):
        """Rebuilds the index (its vectors; the base class sets the ids) from a verified
        directory."""

    # -- persistence -----------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to ``directory`` atomically (built aside, then renamed).

        An existing index at ``directory`` is replaced only once the new one is complete.

        Returns:
            The directory.
        """
        directory = Path(directory)
        with staged_index_dir(directory) as staging:
            self._write_payload(staging)
            atomic_write_json(staging / "ids.json", self._ids, indent=1)
            atomic_write_json(staging / "config.json", self.config, indent=1)
            atomic_write_json(staging / "metadata.json", self.metadata, indent=1)
            write_manifest(staging, self.kind, self._dim, len(self._ids), file_entries(staging))
        return directory

    @classmethod
    def _from_saved(cls, directory: Path, manifest: dict, shards=None) -> RowIndex:
        if shards is not None:
            raise InvalidInputError(f"{directory} is not a sharded index; it has no shards to pick")
        manifest = verify_index(directory)
        ids = read_json(directory / "ids.json", "ids.json")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise IndexFormatError(f"{directory}/ids.json is not a list of strings")
        if len(ids) != manifest["count"] or len(set(ids)) != len(ids):
            raise IndexFormatError(
                f"{directory}/ids.json holds {len(ids)} ids ({len(set(ids))} distinct) but "
                f"the manifest says {manifest['count']}"
            )
        config = read_json(directory / "config.json", "config.json")
        index = cls._from_payload(directory, manifest, ids, config)
        if "metadata.json" in manifest["files"]:
            index.metadata = read_json(directory / "metadata.json", "metadata.json")
        index._set_ids(ids)
        return index
