"""An index split into shards by a stable hash of the id, searched together.

One ScaNN searcher holds its whole collection in one process's memory (ScaNN builds from one
in-memory array); past that, the collection is split. Every id goes to shard
``blake2b-64(id) % num_shards`` (`shard_of`): stable across processes, machines and Python
versions (unlike ``hash()``), so a shard can be built anywhere from the ids alone, and
``add`` / ``delete`` route later changes the same way. Each shard is an ordinary saved index
(``ScannIndex`` or ``ExactIndex``, built and tuned on its own); a `ShardedIndex` loads all of
them or any subset, searches them in parallel threads and merges the per-shard top-k into the
global top-k (exact for exact shards: the global top-k of a union is within the union of the
per-shard top-k's).

It is an ``remap_tf.serving.index.base.Index`` (``add``, ``delete``, ``search``, ``save``,
``ids``, ``metadata``, ``len``, ``in``, ``dim``, ``config``, ``kind``), registered as the kind
"sharded", so ``load_index``, the one entry point for indexes on disk, loads it. Empty shards
are made by a callable handed in (``make_shard``); saved shards load with ``Index.load``.

On-disk layout::

    photos.index/
      manifest.json   {"format": "remap-index", "format_version": 1, "kind": "sharded",
                       "dim", "count", "num_shards", "hash": "blake2b-64",
                       "shards": [{"shard": 0, "dir": "shard-00000-<token>", "count",
                                   "kind", "manifest_sha256"}, ...],
                       "files": {"config.json": {"sha256", "bytes"}, "metadata.json": ...}}
      config.json     {"kind": "sharded", "num_shards", "hash", "shards": {i: shard config}}
      metadata.json   free-form (image root, model), as for a single index
      shard-00000-<token>/   a complete single index (its own manifest and checksums)
      ...

The top manifest records each shard manifest's SHA-256, and each shard manifest the SHA-256 of
its files, so one check at load covers every byte. Saving an index loaded from a directory back
to it rewrites only the shards that changed, into new ``shard-NNNNN-<token>`` folders, then
replaces ``manifest.json`` atomically, then removes the folders it no longer lists: a crash at
any point leaves the previous or the new index, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from remap_tf.contract import MANIFEST_FILE
from remap_tf.errors import InvalidInputError, UnknownIdError
from remap_tf.io import atomic_write_json
from remap_tf.serving.index.base import Index
from remap_tf.serving.index.files import (
    check_fields,
    check_ids,
    check_listed,
    check_matrix,
    staged_index_dir,
    write_manifest,
)
from remap_tf.serving.index.registry import register
from remap_tf.serving.manifest import (
    IndexFormatError,
    file_entries,
    read_json,
    sha256_file,
)

KIND = "sharded"
HASH = "blake2b-64"


def shard_of(ids: Iterable[str], num_shards: int) -> np.ndarray:
    """The shard of each id: ``blake2b(id as UTF-8, 8 bytes) as big-endian int % num_shards``.

    Returns:
        ``(num_ids,)`` int64.
    """
    if int(num_shards) < 1:
        raise InvalidInputError(f"num_shards must be >= 1, got {num_shards}")
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "big")
            % num_shards
            for i in ids
        ),
        dtype=np.int64,
    )


def merge_top_k(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int):
    """Merges per-shard ``(ids, scores)`` (each ``(num_queries, k_s)``, best first, padded with
    None / -inf) into the overall best ``k``: ``(ids, scores)`` of ``(num_queries, k)``."""
    ids = np.concatenate([r[0] for r in results], axis=1)
    scores = np.concatenate([r[1] for r in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


@register(KIND, composite=True)
class ShardedIndex(Index):
    """Shards of ordinary indexes behind the ``Index`` interface, routed by `shard_of`.

    Args:
        dim: descriptor dimension.
        num_shards: number of shards (fixed for the life of the index).
        make_shard: ``make_shard() -> Index``, an empty shard (e.g.
            ``lambda: make_index("scann", dim)``); each shard is built and tuned on its own.

    Example:
        >>> from remap_tf.serving.index import load_index, make_index
        >>> index = ShardedIndex(256, 4, make_shard=lambda: make_index("scann", 256))
        >>> index.add(ids, descriptors); index.save("photos.index")
        >>> ids, scores = load_index("photos.index").search(queries, k=10)
    """

    def __init__(self, dim: int, num_shards: int, make_shard: Callable | None = None):
        if int(dim) <= 0 or int(num_shards) < 1:
            raise InvalidInputError(f"need dim > 0 and num_shards >= 1, got {dim}, {num_shards}")
        super().__init__(dim)
        self._num_shards = int(num_shards)
        self._shards = {i: make_shard() for i in range(self._num_shards)} if make_shard else {}
        self._counts = {}  # shards not loaded: their size from the manifest
        self._dirty = set(self._shards)  # shards to write at the next save
        self._source: Path | None = None  # the directory this index was loaded from
        self._shard_dirs: dict[int, str] = {}
        self._pool: ThreadPoolExecutor | None = None  # kept: a new pool per query costs ms
        self._pool_workers = 0

    # -- the Index interface ------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self._num_shards

    @property
    def shards_loaded(self) -> list[int]:
        return sorted(self._shards)

    def shard(self, number: int):
        """The index holding shard ``number`` (loaded shards only)."""
        return self._shards[number]

    def __len__(self) -> int:
        """Vectors in the loaded shards."""
        return sum(len(s) for s in self._shards.values())

    def __contains__(self, item: str) -> bool:
        shard = self._shards.get(int(shard_of([item], self._num_shards)[0]))
        return shard is not None and item in shard

    @property
    def ids(self) -> list[str]:
        """Ids of the loaded shards, shard by shard (a copy)."""
        return [i for n in sorted(self._shards) for i in self._shards[n].ids]

    @property
    def config(self) -> dict:
        return {
            "kind": self.kind,
            "dim": self._dim,
            "num_shards": self._num_shards,
            "hash": HASH,
            "shards_loaded": self.shards_loaded,
            "shards": {str(n): self._shards[n].config for n in sorted(self._shards)},
        }

    def _route(self, ids: list[str]) -> dict[int, np.ndarray]:
        """``{shard: positions in ids}``; InvalidInputError for a shard that is not loaded."""
        shards = shard_of(ids, self._num_shards)
        routes = {int(s): np.flatnonzero(shards == s) for s in np.unique(shards)}
        absent = sorted(set(routes) - set(self._shards))
        if absent:
            example = ids[routes[absent[0]][0]]
            raise InvalidInputError(
                f"id {example!r} belongs to shard {absent[0]}, which is not loaded "
                f"(loaded: {self.shards_loaded}); load it to change it"
            )
        return routes

    def add(self, ids: Sequence[str], descriptors) -> None:
        """Adds rows under new ids, each to its shard. Nothing is added if any id is present."""
        ids = check_ids(ids)
        x = check_matrix(descriptors, self._dim, "descriptors")
        if len(ids) != x.shape[0]:
            raise InvalidInputError(f"{len(ids)} ids for {x.shape[0]} descriptors")
        routes = self._route(ids)
        present = [ids[p] for s, rows in routes.items() for p in rows if ids[p] in self._shards[s]]
        if present:
            raise InvalidInputError(f"ids already in the index (delete them first): {present[:5]}")
        for shard, rows in routes.items():
            self._shards[shard].add([ids[p] for p in rows], x[rows])
            self._dirty.add(shard)

    def delete(self, ids: Sequence[str]) -> None:
        """Removes ids from their shards (UnknownIdError, and nothing removed, if any is absent)."""
        ids = check_ids(ids)
        routes = self._route(ids)
        missing = [
            ids[p] for s, rows in routes.items() for p in rows if ids[p] not in self._shards[s]
        ]
        if missing:
            raise UnknownIdError(f"ids not in the index: {missing[:5]}")
        for shard, rows in routes.items():
            self._shards[shard].delete([ids[p] for p in rows])
            self._dirty.add(shard)

    def search(self, queries, k: int = 10, num_threads: int | None = None, **overrides):
        """The k best ids over all loaded shards, searched in parallel, best first.

        Args:
            queries: ``(num_queries, dim)`` descriptors (or one ``(dim,)``).
            k: results per query.
            num_threads: threads in all (default: all CPUs); shards are searched
                concurrently, each with its share.
            **overrides: ScaNN search-time knobs (``leaves_to_search``, ``reorder``) for
                ScaNN shards.

        Returns:
            ``(ids, scores)``, each ``(num_queries, min(k, len))``, as ``Index.search``.
        """
        q = self._check_queries(queries, k)
        self.build()
        shards = [self._shards[n] for n in sorted(self._shards) if len(self._shards[n])]
        k = min(int(k), len(self))
        if not shards or k == 0:
            return np.empty((q.shape[0], 0), dtype=object), np.empty((q.shape[0], 0), np.float32)
        threads = int(num_threads or os.cpu_count() or 1)
        each = max(1, threads // len(shards))

        def one(shard):
            if shard.kind == "scann":
                return shard.search(q, k, num_threads=each, **overrides)
            return shard.search(q, k)

        if len(shards) == 1 or threads == 1:
            results = [one(s) for s in shards]
        else:
            workers = min(threads, len(shards))
            if self._pool is None or self._pool_workers != workers:
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="shard-search")
                self._pool_workers = workers
            results = list(self._pool.map(one, shards))
        return merge_top_k(results, k)

    def build(self, threads: int = 1) -> None:
        """Builds every loaded shard that is not built yet (``threads`` at a time).

        Each shard is told the size of the whole collection (``build(collection_size=...)``),
        so that it gets the mode the collection's size calls for rather than its own (a
        ScaNN shard keeps the tree one index of the whole would have had;
        ``ScannConfig.collection_size``). Searches and saves build what is not built first.
        """
        todo = [s for s in self._shards.values() if hasattr(s, "build") and len(s) and not s.built]
        total = sum(self._counts.values()) + len(self)
        if threads > 1 and len(todo) > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda s: s.build(collection_size=total), todo))
        else:
            for shard in todo:
                shard.build(collection_size=total)

    # -- persistence ------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Writes the index to ``directory``.

        Back into the directory it was loaded from: only changed shards are rewritten (new
        folders, then the manifest replaced atomically, then old folders removed). Anywhere
        else: every shard must be loaded; the whole index is built aside and renamed into
        place, replacing an index there only once complete.
        """
        directory = Path(directory)
        if self._source is not None and directory.resolve() == self._source.resolve():
            self._save_in_place(directory)
            return directory
        if set(self._shards) != set(range(self._num_shards)):
            raise InvalidInputError(
                f"only shards {self.shards_loaded} of {self._num_shards} are loaded; a partial "
                "index can only be saved back where it was loaded from"
            )
        with staged_index_dir(directory) as staging:
            self._shard_dirs = {}
            self._dirty = set(self._shards)
            self._save_in_place(staging)
        self._source = directory
        return directory

    def _save_in_place(self, directory: Path) -> None:
        self.build()
        token = uuid.uuid4().hex[:8]
        for number in sorted(self._dirty & set(self._shards)):
            name = f"shard-{number:05d}-{token}"
            self._shards[number].save(directory / name)
            self._shard_dirs[number] = name
        entries = write_top_level(
            directory, self._dim, self._num_shards, self._shard_dirs, self.metadata
        )
        listed = {e["dir"] for e in entries}
        for path in directory.glob("shard-*"):
            if path.is_dir() and path.name not in listed:
                shutil.rmtree(path, ignore_errors=True)
        self._dirty = set()
        self._source = directory

    @classmethod
    def _from_saved(cls, directory: Path, manifest: dict, shards: Iterable[int] | None = None):
        """Loads all shards, or the listed ones, after checking every checksum (through
        ``Index.load(directory, shards=...)`` or ``load_index``).

        Args:
            directory: a directory written by ``save``.
            manifest: its manifest, format and version checked.
            shards: shard numbers to load (default all).

        Raises:
            IndexFormatError: a missing, truncated or altered file, or a bad manifest.
        """
        _check_manifest(directory, manifest)
        number = manifest["num_shards"]
        wanted = sorted(set(range(number) if shards is None else (int(s) for s in shards)))
        if not wanted or wanted[0] < 0 or wanted[-1] >= number:
            raise InvalidInputError(f"shards must be numbers in 0..{number - 1}, got {shards}")
        index = cls(manifest["dim"], number)
        for entry in manifest["shards"]:
            index._shard_dirs[entry["shard"]] = entry["dir"]
            if entry["shard"] not in wanted:
                index._counts[entry["shard"]] = entry["count"]
                continue
            path = directory / entry["dir"]
            if not (path / MANIFEST_FILE).is_file():
                raise IndexFormatError(f"{directory}: shard folder {entry['dir']} is missing")
            if sha256_file(path / MANIFEST_FILE) != entry["manifest_sha256"]:
                raise IndexFormatError(
                    f"{directory}: {entry['dir']}/{MANIFEST_FILE} does not match its SHA-256 "
                    "checksum"
                )
            shard = Index.load(path)
            if isinstance(shard, ShardedIndex):
                raise IndexFormatError(f"{directory}: shard folder {entry['dir']} is sharded")
            if shard.dim != index.dim or len(shard) != entry["count"]:
                raise IndexFormatError(
                    f"{directory}: shard {entry['shard']} holds {len(shard)} {shard.dim}-d "
                    f"vectors, the manifest says {entry['count']} {index.dim}-d"
                )
            index._shards[entry["shard"]] = shard
        index.metadata = read_json(directory / "metadata.json", "metadata.json")
        index._source = directory
        return index


def write_top_level(directory, dim: int, num_shards: int, shard_dirs: dict, metadata: dict):
    """Writes ``config.json``, ``metadata.json`` and then ``manifest.json`` of a sharded index
    whose shards are saved in ``directory / shard_dirs[n]``; returns the shard entries.

    Used by ``ShardedIndex.save`` and by builds that save shards elsewhere (one per worker,
    `remap_tf.serving.beam_index`).
    """
    directory = Path(directory)
    entries, configs = [], {}
    for number in range(num_shards):
        name = shard_dirs[number]
        shard_manifest = read_json(directory / name / MANIFEST_FILE, MANIFEST_FILE)
        if shard_manifest.get("dim") != dim:
            raise IndexFormatError(f"{directory / name} holds {shard_manifest.get('dim')}-d rows")
        configs[str(number)] = read_json(directory / name / "config.json", "config.json")
        entries.append(
            {
                "shard": number,
                "dir": name,
                "count": shard_manifest["count"],
                "kind": shard_manifest["kind"],
                "manifest_sha256": sha256_file(directory / name / MANIFEST_FILE),
            }
        )
    config = {"kind": KIND, "dim": dim, "num_shards": num_shards, "hash": HASH}
    atomic_write_json(directory / "config.json", config | {"shards": configs}, indent=1)
    atomic_write_json(directory / "metadata.json", metadata, indent=1)
    write_manifest(
        directory,
        KIND,
        dim,
        sum(e["count"] for e in entries),
        file_entries(directory, ["config.json", "metadata.json"]),
        num_shards=num_shards,
        hash=HASH,
        shards=entries,
    )
    return entries


def _check_manifest(directory: Path, manifest: dict) -> None:
    """Checks the sharded fields of a manifest (`read_manifest` checked the format) and the
    checksums of the top-level files."""
    path = directory / MANIFEST_FILE
    if manifest.get("hash") != HASH:
        raise IndexFormatError(f"{path}: unknown id hash {manifest.get('hash')!r}")
    check_fields(
        directory, manifest, {"dim": int, "num_shards": int, "shards": list, "files": dict}
    )
    numbers = [e.get("shard") if isinstance(e, dict) else None for e in manifest["shards"]]
    if numbers != list(range(manifest["num_shards"])):
        raise IndexFormatError(f"{path}: the shard list does not cover 0..num_shards-1")
    for entry in manifest["shards"]:
        name = entry.get("dir")
        if not isinstance(name, str) or "/" in name or not name.startswith("shard-"):
            raise IndexFormatError(f"{path}: bad shard folder name {name!r}")
    check_listed(directory, manifest, ("config.json", "metadata.json"))
