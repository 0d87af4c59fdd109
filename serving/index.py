"""Nearest-neighbour indexes over descriptors: one interface, ScaNN and exact implementations.

``Index`` is the interface (``add``, ``search``, ``delete``, ``save``, ``load``, ``config``),
as in TensorFlow Similarity's search index. ``ExactIndex`` scores every database row with a
NumPy dot product and is the yardstick; ``ScannIndex`` wraps ScaNN (Guo et al., "Accelerating
Large-Scale Inference with Anisotropic Vector Quantization", ICML 2020) and chooses its
configuration from the collection size, following ScaNN's own guidance: brute force under
~20k vectors, asymmetric hashing (AH, 2 dimensions per block) with exact re-ordering under
~100k, and a k-means tree (leaves ~ sqrt(n)) + AH + re-ordering above. Every knob can be
overridden through ``ScannConfig``.

Descriptors are rows ``(num_vectors, dim)`` of float32, compared by dot product (cosine for
the L2-normalised REMAP descriptors). Ids are the user's strings.

On-disk format (a directory, written atomically: built aside, then renamed into place)::

    manifest.json   {"format": "remap-index", "format_version": 1, "kind": "scann"|"exact",
                     "dim": D, "count": N, "files": {relative path: {"sha256", "bytes"}}}
    config.json     the resolved index configuration
    metadata.json   free-form JSON from ``Index.metadata`` (e.g. the image root, the model)
    ids.json        the N ids, in the order of the vectors
    descriptors.npy (exact) the (N, D) float32 rows, loaded with allow_pickle=False
    scann/          (scann) ScaNN's own serialized searcher (protobuf + .npy files)

Nothing is ever unpickled: ScaNN's Python wrapper stores its doc ids with pickle, so this
module never hands ids to ScaNN (it keeps its own id array and maps ScaNN's integer results
back) and loads the searcher through ``scann_pybind.ScannNumpy`` directly rather than
``load_searcher`` (which would unpickle a ``scann_docids.pkl`` found in the directory).
``load`` checks the manifest and the size and SHA-256 of every file before reading anything
else, and refuses a truncated, altered or incomplete index with an ``IndexFormatError``.

Example:
    >>> index = ScannIndex(dim=256)
    >>> index.add(["a.jpg", "b.jpg"], descriptors)        # (2, 256)
    >>> ids, scores = index.search(query_descriptors, k=1)  # (num_queries, 1) each
    >>> index.save("my_index"); same = load_index("my_index")
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from remap_tf.errors import (
    BadPathError,
    InvalidInputError,
    UnknownIdError,
)
from remap_tf.io import atomic_write_json
from remap_tf.serving.manifest import (
    MANIFEST,
    IndexFormatError,
    check_files,
    sha256_file,
    staged_index_dir,
)
from remap_tf.serving.tuning import REORDER_CANDIDATES, leaves_candidates, tune_search

FORMAT = "remap-index"
FORMAT_VERSION = 1
SHARDED_KIND = "sharded"  # a ShardedIndex's top-level manifest (remap_tf.serving.sharded)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _as_ids(ids: Iterable[str] | str) -> list[str]:
    if isinstance(ids, str):
        ids = [ids]
    ids = list(ids)
    for i in ids:
        if not isinstance(i, str):
            raise InvalidInputError(f"ids must be strings, got {type(i).__name__} {i!r}")
    if len(set(ids)) != len(ids):
        seen, dupes = set(), []
        for i in ids:
            if i in seen:
                dupes.append(i)
            seen.add(i)
        raise InvalidInputError(f"duplicate ids: {dupes[:5]}")
    return ids


def _as_matrix(descriptors, dim: int | None, name: str) -> np.ndarray:
    x = np.asarray(descriptors)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise InvalidInputError(
            f"{name} must be a (num, dim) matrix of row descriptors, got {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise InvalidInputError(f"{name} must be numeric, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise InvalidInputError(
            f"{name} have dimension {x.shape[1]} but the index has dimension {dim}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidInputError(f"{name} contain NaN or infinite values")
    return x


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{path}: {what} is not valid JSON ({error})") from None


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


# ---------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------


class Index(abc.ABC):
    """A searchable set of (id, descriptor) pairs, compared by dot product.

    Args:
        dim: descriptor dimension.
    """

    kind: str = ""

    def __init__(self, dim: int):
        if int(dim) <= 0:
            raise InvalidInputError(f"dim must be a positive integer, got {dim}")
        self._dim = int(dim)
        self._ids: list[str] = []
        self._positions: dict[str, int] = {}
        self._id_array: np.ndarray | None = None  # ids + [None], cached for searches
        # Free-form JSON saved with the index (e.g. the image root and the model it came from).
        self.metadata: dict = {}

    # -- shared ----------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item: str) -> bool:
        return item in self._positions

    @property
    def ids(self) -> list[str]:
        """The ids in the order of the stored vectors (a copy)."""
        return list(self._ids)

    def _check_new_ids(self, ids: list[str], count: int) -> None:
        if len(ids) != count:
            raise InvalidInputError(f"{len(ids)} ids for {count} descriptors")
        present = [i for i in ids if i in self._positions]
        if present:
            raise InvalidInputError(f"ids already in the index (delete them first): {present[:5]}")

    def _check_known_ids(self, ids: list[str]) -> None:
        missing = [i for i in ids if i not in self._positions]
        if missing:
            raise UnknownIdError(f"ids not in the index: {missing[:5]}")

    def _check_queries(self, queries, k: int) -> np.ndarray:
        if int(k) <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k}")
        return _as_matrix(queries, self._dim, "queries")

    def _results(self, rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maps integer rows (-1 = no result) to ids (None) and pads scores with -inf."""
        if self._id_array is None or len(self._id_array) != len(self._ids) + 1:
            self._id_array = np.asarray(self._ids + [None], dtype=object)
        id_array = self._id_array
        rows = np.where(rows < 0, len(self._ids), rows)
        scores = np.where(rows == len(self._ids), -np.inf, scores).astype(np.float32)
        return id_array[rows], scores

    def add(self, ids: Sequence[str], descriptors: np.ndarray) -> None:
        """Adds ``descriptors`` (num, dim) under the new string ``ids`` (num,).

        Raises:
            InvalidInputError: ids that are not strings, repeat, or are already present;
                descriptors of the wrong shape or not finite.
        """
        ids = _as_ids(ids)
        x = _as_matrix(descriptors, self._dim, "descriptors")
        self._check_new_ids(ids, x.shape[0])
        if not ids:
            return
        self._add_rows(x)  # rows len(self)..len(self)+n-1, in order
        start = len(self._ids)
        self._ids.extend(ids)
        self._positions.update({i: start + n for n, i in enumerate(ids)})
        self._id_array = None

    def delete(self, ids: Sequence[str]) -> None:
        """Removes the given ids (UnknownIdError naming any that are absent)."""
        ids = _as_ids(ids)
        self._check_known_ids(ids)
        if ids:
            self._delete_ids(ids)
            self._id_array = None

    def _delete_keeping_order(self, ids: list[str]) -> np.ndarray:
        """Drops ``ids`` from the id list, keeping the others in order; returns the row mask
        of the vectors to keep."""
        keep = np.ones(len(self._ids), dtype=bool)
        keep[[self._positions[i] for i in ids]] = False
        self._ids = [i for i, kept in zip(self._ids, keep, strict=True) if kept]
        self._positions = {i: n for n, i in enumerate(self._ids)}
        return keep

    def _delete_swapping_last(self, ids: list[str]) -> list[int]:
        """Drops ``ids`` one by one, moving the last id into each freed row (as ScaNN moves
        its vectors); returns the rows deleted, in order."""
        rows = []
        for i in ids:
            row = self._positions.pop(i)
            rows.append(row)
            last = self._ids.pop()
            if last != i:
                self._ids[row] = last
                self._positions[last] = row
        return rows

    # -- to implement ----------------------------------------------------------------

    @abc.abstractmethod
    def _add_rows(self, descriptors: np.ndarray) -> None:
        """Appends checked float32 rows ``(n, dim)`` after the existing ones."""

    @abc.abstractmethod
    def _delete_ids(self, ids: list[str]) -> None:
        """Removes known ``ids``: updates the id list (with a ``_delete_*`` helper above) and
        the vectors alike."""

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
    def _write_payload(self, directory: Path) -> None:
        """Writes everything but ids.json, config.json and manifest.json."""

    @classmethod
    @abc.abstractmethod
    def _from_payload(cls, directory: Path, manifest: dict, ids: list[str], config: dict):
        """Rebuilds the index from a verified directory."""

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
            files = {}
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                rel = path.relative_to(staging).as_posix()
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "dim": self._dim,
                "count": len(self._ids),
                "files": files,
            }
            atomic_write_json(staging / MANIFEST, manifest, indent=1)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Index:
        """Loads an index saved by ``save`` after verifying its manifest and checksums.

        Called on ``Index`` it returns whichever kind was saved; called on a subclass it
        refuses an index of another kind.

        Raises:
            FileNotFoundError: no such directory or no manifest.
            IndexFormatError: a file is missing, truncated or altered, or the manifest is
                not one this version can read.
        """
        directory = Path(directory)
        if saved_kind(directory) == SHARDED_KIND:
            raise IndexFormatError(
                f"{directory} holds a sharded index; use serving.index.load_index to load it"
            )
        manifest = verify_index(directory)
        kind = manifest["kind"]
        implementations = {sub.kind: sub for sub in (ExactIndex, ScannIndex)}
        if kind not in implementations:
            raise IndexFormatError(f"{directory}: unknown index kind {kind!r}")
        target = implementations[kind]
        if cls is not Index and cls is not target:
            raise IndexFormatError(
                f"{directory} holds a {kind!r} index, not a {cls.kind!r} index; "
                "use serving.index.load_index to load any kind"
            )
        ids = _read_json(directory / "ids.json", "ids.json")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise IndexFormatError(f"{directory}/ids.json is not a list of strings")
        if len(ids) != manifest["count"] or len(set(ids)) != len(ids):
            raise IndexFormatError(
                f"{directory}/ids.json holds {len(ids)} ids ({len(set(ids))} distinct) but "
                f"the manifest says {manifest['count']}"
            )
        config = _read_json(directory / "config.json", "config.json")
        index = target._from_payload(directory, manifest, ids, config)
        if "metadata.json" in manifest["files"]:
            index.metadata = _read_json(directory / "metadata.json", "metadata.json")
        index._ids = ids
        index._positions = {i: n for n, i in enumerate(ids)}
        return index


def verify_index(directory: str | os.PathLike) -> dict:
    """Checks a saved index's manifest, and every listed file's size and SHA-256.

    Returns:
        The manifest dict.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BadPathError(f"no index directory at {directory}")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BadPathError(f"{directory} is not an index: {MANIFEST} is missing")
    manifest = _read_json(manifest_path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{manifest_path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{manifest_path}: format_version {version!r} is not supported "
            f"(this version reads up to {FORMAT_VERSION})"
        )
    for key, kind in (("kind", str), ("dim", int), ("count", int), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise IndexFormatError(f"{manifest_path}: field {key!r} is missing or invalid")
    for required in ("ids.json", "config.json"):
        if required not in manifest["files"]:
            raise IndexFormatError(f"{manifest_path} does not list {required}")
    check_files(directory, manifest["files"], str(manifest_path))
    return manifest


def saved_kind(directory: str | os.PathLike) -> str | None:
    """The ``kind`` a saved index's manifest declares (None when there is no readable one)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = _read_json(path, MANIFEST)
    return manifest.get("kind") if isinstance(manifest, dict) else None


def load_index(directory: str | os.PathLike, shards=None):
    """Loads a saved index of any kind: the one entry point for every index on disk.

    Args:
        directory: a directory written by ``Index.save`` or ``ShardedIndex.save``.
        shards: for a sharded index, the shard numbers to load (default all); a plain index
            refuses it.

    Returns:
        An ``Index`` (``ScannIndex`` / ``ExactIndex``), or a
        `remap_tf.serving.sharded.ShardedIndex` (same interface) for a sharded manifest.
    """
    if saved_kind(directory) == SHARDED_KIND:
        from remap_tf.serving.sharded import ShardedIndex

        return ShardedIndex.load(directory, load_shard=Index.load, shards=shards)
    if shards is not None:
        raise InvalidInputError(f"{directory} is not a sharded index; it has no shards to pick")
    return Index.load(directory)


# ---------------------------------------------------------------------------------------
# Exact search
# ---------------------------------------------------------------------------------------


class ExactIndex(Index):
    """Exhaustive dot-product search in NumPy: exact, the yardstick for approximate indexes.

    Args:
        dim: descriptor dimension.
        chunk: queries scored at a time (memory is chunk * len(index) floats).
    """

    kind = "exact"

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
        k = min(int(k), len(self._ids))
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
            raise IndexFormatError(f"{directory}/{MANIFEST} does not list descriptors.npy")
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


# ---------------------------------------------------------------------------------------
# ScaNN
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScannConfig:
    """ScaNN settings; None fields are chosen from the collection size at build time.

    Attributes:
        mode: "auto", "brute_force", "ah" (asymmetric hashing + re-ordering) or "tree_ah"
            (k-means tree + AH + re-ordering).
        brute_force_below: "auto" uses brute force under this many vectors.
        tree_above: "auto" adds the tree from this many vectors on.
        num_leaves: tree leaves (default ~ sqrt(n)).
        num_leaves_to_search: leaves searched per query (default ~ num_leaves / 10, >= 1).
        training_sample_size: vectors sampled to train the tree and AH codebooks
            (default min(n, 100000), ScaNN's own default).
        dimensions_per_block: AH dimensions per 16-centre block (2, ScaNN's advice).
        anisotropic_quantization_threshold: AH noise-shaping threshold (0.2 for unit vectors).
        reorder: candidates re-scored exactly after AH (default 250 for "ah", 100 behind a
            tree; at least k at search).
        num_threads: search and training threads (0 = all CPUs).
        batch_size: queries per parallel search batch.
        target_recall: after building (except brute force), hold out ``tuning_queries`` of
            the collection's own vectors as queries and choose ``num_leaves_to_search`` and
            ``reorder`` as the fastest setting whose recall@10 against brute force reaches
            this (`remap_tf.serving.tuning`); a knob given explicitly is kept fixed. None:
            no tuning, the fixed size-chosen defaults above.
        tuning_queries: held-out queries the tuning measures recall on.
        tuning: set by the build: what the tuning chose and measured (recall, queries/s).
    """

    mode: str = "auto"
    brute_force_below: int = 20_000
    tree_above: int = 100_000
    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    training_sample_size: int | None = None
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int | None = None
    num_threads: int = 0
    batch_size: int = 256
    target_recall: float | None = 0.95
    tuning_queries: int = 1000
    tuning: dict | None = None

    MODES = ("auto", "brute_force", "ah", "tree_ah")

    def __post_init__(self):
        if self.mode not in self.MODES:
            raise InvalidInputError(
                f"ScannConfig.mode must be one of {self.MODES}, got {self.mode!r}"
            )
        for name in ("num_leaves", "num_leaves_to_search", "training_sample_size", "reorder"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise InvalidInputError(f"ScannConfig.{name} must be positive, got {value}")
        if self.dimensions_per_block <= 0:
            raise InvalidInputError(
                "ScannConfig.dimensions_per_block must be positive, "
                f"got {self.dimensions_per_block}"
            )
        if self.num_threads < 0:
            raise InvalidInputError(f"ScannConfig.num_threads must be >= 0, got {self.num_threads}")
        if self.target_recall is not None and not 0.0 < self.target_recall <= 1.0:
            raise InvalidInputError(
                f"ScannConfig.target_recall must be in (0, 1] (or None), got {self.target_recall}"
            )
        if self.tuning_queries < 2:
            raise InvalidInputError(
                f"ScannConfig.tuning_queries must be >= 2, got {self.tuning_queries}"
            )

    def resolved(self, count: int) -> ScannConfig:
        """A copy with mode and every size-dependent knob fixed for ``count`` vectors."""
        mode = self.mode
        if mode == "auto":
            if count < self.brute_force_below:
                mode = "brute_force"
            elif count < self.tree_above:
                mode = "ah"
            else:
                mode = "tree_ah"
        out = dataclasses.replace(self, mode=mode)
        if mode in ("ah", "tree_ah"):
            # Re-ordering 250 AH candidates keeps recall@10 >= 0.95 without a tree (50k x 256
            # clustered vectors: 100 gave 0.93); behind a tree 100 lost nothing measurable and
            # searched ~1.5x faster (100k x 512, bench/ann.py data and a noisier variant).
            out.reorder = self.reorder or (100 if mode == "tree_ah" else 250)
            out.training_sample_size = self.training_sample_size or min(count, 100_000)
        if mode == "tree_ah":
            leaves = self.num_leaves or max(1, int(round(math.sqrt(count))))
            # ScaNN trains one partition per leaf; more leaves than vectors cannot work.
            out.num_leaves = min(leaves, max(1, count))
            out.num_leaves_to_search = min(
                out.num_leaves, self.num_leaves_to_search or max(1, out.num_leaves // 10)
            )
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ScannConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names - {"kind", "dim", "built"}
        if unknown:
            raise InvalidInputError(f"unknown ScaNN config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in names})


class ScannIndex(Index):
    """ScaNN index configured from the collection size, with updates and safe persistence.

    Vectors added before the first search are buffered and the searcher is built from all
    of them at once (``build()`` forces it); vectors added or deleted later go through
    ScaNN's ``upsert`` and ``delete`` (ScaNN >= 1.3) against the trained codebooks, so a
    collection that grows far beyond its first build should be rebuilt.

    Args:
        dim: descriptor dimension.
        config: a ``ScannConfig`` or a dict of its fields (defaults: ``ScannConfig()``).
        **overrides: ScannConfig fields, e.g. ``mode="tree_ah", num_leaves=2000``.
    """

    kind = "scann"

    def __init__(self, dim: int, config: ScannConfig | dict | None = None, **overrides):
        super().__init__(dim)
        if isinstance(config, dict):
            config = ScannConfig.from_dict(config)
        config = config or ScannConfig()
        self._requested = dataclasses.replace(config, **overrides) if overrides else config
        self._resolved: ScannConfig | None = None
        self._searcher = None
        self._pool_threads = 0
        self._pending: list[np.ndarray] = []

    @property
    def config(self) -> dict:
        config = (self._resolved or self._requested).to_dict()
        config.update(kind=self.kind, dim=self._dim, built=self._searcher is not None)
        return config

    @property
    def built(self) -> bool:
        return self._searcher is not None

    def _threads(self) -> int:
        return self._requested.num_threads or os.cpu_count() or 1

    def _add_rows(self, descriptors) -> None:
        if self._searcher is None:
            self._pending.append(descriptors)
            return
        start = len(self._ids)
        rows = self._searcher.searcher.upsert([None] * len(descriptors), descriptors, 1)
        expected = list(range(start, start + len(descriptors)))
        if list(rows) != expected:  # ScaNN appends; anything else breaks the id mapping
            raise RuntimeError(f"ScaNN upsert returned rows {list(rows)[:5]}...")

    def _delete_ids(self, ids) -> None:
        if self._searcher is None:
            pending = np.concatenate(self._pending) if self._pending else None
            keep = self._delete_keeping_order(ids)
            self._pending = [pending[keep]] if pending is not None else []
            return
        # ScaNN deletes a row by moving the last row into its slot, one deletion after the
        # other (as its own Python wrapper assumes); the id list mirrors that.
        self._searcher.searcher.delete(self._delete_swapping_last(ids))

    def build(self) -> None:
        """Trains and builds the ScaNN searcher from every vector added so far, then (with a
        ``target_recall``) tunes its search-time knobs on vectors held out of the training."""
        from scann.scann_ops.py import scann_ops_pybind

        if not self._ids:
            raise InvalidInputError("cannot build a ScaNN index with no vectors; add some first")
        data = np.concatenate(self._pending) if self._pending else None
        if data is None or data.shape[0] != len(self._ids):
            raise RuntimeError("the ScaNN index is already built")
        n = data.shape[0]
        config = self._requested.resolved(n)
        held = 0
        if config.mode != "brute_force" and config.target_recall is not None:
            held = min(config.tuning_queries, n // 4)
        if held >= 2:  # the held-out rows go last, trained on by nothing, upserted after
            data = self._move_to_end(data, held)
        else:
            held = 0
        if config.training_sample_size:
            config.training_sample_size = min(config.training_sample_size, n - held)
        builder = scann_ops_pybind.builder(data[: n - held], 10, "dot_product")
        builder.set_n_training_threads(self._threads())
        if config.mode == "tree_ah":
            builder = builder.tree(
                num_leaves=config.num_leaves,
                num_leaves_to_search=config.num_leaves_to_search,
                training_sample_size=config.training_sample_size,
            )
        if config.mode == "brute_force":
            builder = builder.score_brute_force()
        else:
            builder = builder.score_ah(
                config.dimensions_per_block,
                anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
                training_sample_size=config.training_sample_size,
            ).reorder(config.reorder)
        self._searcher = builder.build()
        self._searcher.set_num_threads(self._threads())
        self._pool_threads = self._threads()
        self._resolved = config
        self._pending = []
        if held:
            rows = self._searcher.searcher.upsert([None] * held, data[n - held :], 1)
            if list(rows) != list(range(n - held, n)):
                raise RuntimeError(f"ScaNN upsert returned rows {list(rows)[:5]}...")
            self._tune(data, np.arange(n - held, n))

    def _move_to_end(self, data: np.ndarray, count: int) -> np.ndarray:
        """Moves ``count`` random rows (and their ids) to the end; returns the reordered data.

        They become the tuning queries: built into the index after training, so the tree
        and codebooks were fitted without them, as they were without any future query.
        """
        n = data.shape[0]
        held = np.random.default_rng(0).choice(n, count, replace=False)
        rest = np.ones(n, dtype=bool)
        rest[held] = False
        order = np.concatenate([np.flatnonzero(rest), np.sort(held)])
        self._ids = [self._ids[i] for i in order]
        self._positions = {i: row for row, i in enumerate(self._ids)}
        self._id_array = None
        return np.ascontiguousarray(data[order])

    def _tune(self, data: np.ndarray, query_rows: np.ndarray) -> None:
        """Chooses leaves_to_search and reorder for the target recall (see ``ScannConfig``)."""
        config, requested = self._resolved, self._requested
        leaves = [None]
        if config.mode == "tree_ah":
            fixed = requested.num_leaves_to_search
            leaves = (
                [config.num_leaves_to_search] if fixed else leaves_candidates(config.num_leaves)
            )
        reorders = [config.reorder] if requested.reorder else REORDER_CANDIDATES
        threads = self._threads()

        def search(queries, k, leaves, reorder):
            if threads > 1:
                rows, _ = self._searcher.search_batched_parallel(
                    queries, k, max(reorder, k), leaves, batch_size=config.batch_size
                )
            else:
                rows, _ = self._searcher.search_batched(queries, k, max(reorder, k), leaves)
            return rows

        result = tune_search(
            search, data, config.target_recall, k=10, query_rows=query_rows,
            leaves=leaves, reorders=reorders,
        )  # fmt: skip
        if config.mode == "tree_ah":
            config.num_leaves_to_search = int(result["leaves"])
        config.reorder = int(result["reorder"])
        config.tuning = {key: v for key, v in result.items() if key not in ("leaves", "reorder")}

    def search(
        self,
        queries,
        k: int = 10,
        num_threads: int | None = None,
        leaves_to_search: int | None = None,
        reorder: int | None = None,
    ):
        """See ``Index.search``; the keyword arguments override the config for this call.

        Args:
            num_threads: search threads (1 = no thread pool).
            leaves_to_search: tree leaves searched per query (tree_ah only).
            reorder: candidates re-scored exactly (AH modes only; at least k).
        """
        q = self._check_queries(queries, k)
        if not self._ids:
            return np.empty((q.shape[0], 0), dtype=object), np.empty((q.shape[0], 0), np.float32)
        if self._searcher is None:
            self.build()
        k = min(int(k), len(self._ids))
        config = self._resolved
        reorder = reorder or config.reorder
        pre = max(reorder, k) if reorder and config.mode != "brute_force" else None
        # Always pass the configured leaves: a loaded searcher's own default is the value it
        # was built with, before tuning.
        leaves = (
            (leaves_to_search or config.num_leaves_to_search) if config.mode == "tree_ah" else None
        )
        threads = self._threads() if num_threads is None else int(num_threads)
        if threads > 1 and q.shape[0] > 1:
            if threads != self._pool_threads:  # rebuilding ScaNN's pool costs ~25% at 100k
                self._searcher.set_num_threads(threads)
                self._pool_threads = threads
            rows, scores = self._searcher.search_batched_parallel(
                q, k, pre, leaves, batch_size=config.batch_size
            )
        else:
            rows, scores = self._searcher.search_batched(q, k, pre, leaves)
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        if rows.shape[1] < k:  # fewer candidates than k (e.g. few leaves searched)
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return self._results(rows, scores)

    def _write_payload(self, directory: Path) -> None:
        if not self._ids:  # an empty index (e.g. a shard no id hashed to): nothing to build
            return
        if self._searcher is None:
            self.build()
        target = directory / "scann"
        target.mkdir()
        # No docids were given to ScaNN, so it writes no scann_docids.pkl; relative asset
        # paths keep the directory movable.
        self._searcher.serialize(str(target), relative_path=True)
        if (target / "scann_docids.pkl").exists():
            raise RuntimeError("ScaNN wrote a pickle file; refusing to save it")

    @classmethod
    def _from_payload(cls, directory, manifest, ids, config):
        from scann.scann_ops.py import scann_ops_pybind

        assets = "scann/scann_assets.pbtxt"
        if manifest["count"] == 0:  # saved empty: vectors added later build it
            try:
                return cls(manifest["dim"], ScannConfig.from_dict(config))
            except (TypeError, ValueError) as error:
                raise IndexFormatError(f"{directory}/config.json: {error}") from None
        if assets not in manifest["files"]:
            raise IndexFormatError(f"{directory}/{MANIFEST} does not list {assets}")
        try:
            requested = ScannConfig.from_dict(config)
        except (TypeError, ValueError) as error:
            raise IndexFormatError(f"{directory}/config.json: {error}") from None
        index = cls(manifest["dim"], requested)
        index._resolved = requested
        text = (directory / assets).read_text(encoding="utf-8")
        try:
            raw = scann_ops_pybind.scann_pybind.ScannNumpy(str(directory / "scann"), text)
        except Exception as error:  # ScaNN raises RuntimeError/ValueError from C++
            raise IndexFormatError(
                f"{directory}: ScaNN could not load the searcher: {error}"
            ) from None
        index._searcher = scann_ops_pybind.ScannSearcher(raw)
        if index._searcher.size() != manifest["count"]:
            raise IndexFormatError(
                f"{directory}: ScaNN holds {index._searcher.size()} vectors but the manifest "
                f"says {manifest['count']}"
            )
        index._searcher.set_num_threads(index._threads())
        index._pool_threads = index._threads()
        return index


def make_index(kind: str, dim: int, **config) -> Index:
    """An empty index of ``kind`` ("scann" or "exact")."""
    if kind == "scann":
        return ScannIndex(dim, **config)
    if kind == "exact":
        return ExactIndex(dim, **config)
    raise InvalidInputError(f"index kind must be 'scann' or 'exact', got {kind!r}")
