"""ScaNN (Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector
Quantization", ICML 2020), configured from the collection size and tuned to a recall target.

``ScannIndex`` chooses its configuration from the collection size, following ScaNN's own
guidance: brute force under ~20k vectors, asymmetric hashing (AH, 2 dimensions per block) with
exact re-ordering under ~100k, and a k-means tree (leaves ~ sqrt(n)) + AH + re-ordering above.
Every knob can be overridden through ``ScannConfig``; the search-time knobs are tuned to a
recall target after the build (`remap_tf.serving.index.tuning`).

Saved files beside the common ones (`remap_tf.serving.index.rows`)::

    scann/          ScaNN's own serialized searcher (protobuf + .npy files)

Nothing is ever unpickled: ScaNN's Python wrapper stores its doc ids with pickle, so this
module never hands ids to ScaNN (the base class keeps the ids and maps ScaNN's integer results
back) and loads the searcher through ``scann_pybind.ScannNumpy`` directly rather than
``load_searcher`` (which would unpickle a ``scann_docids.pkl`` found in the directory).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from remap_tf.contract import MANIFEST_FILE
from remap_tf.errors import InvalidInputError
from remap_tf.serving.index.registry import register
from remap_tf.serving.index.rows import RowIndex
from remap_tf.serving.index.tuning import REORDER_CANDIDATES, leaves_candidates, tune_search
from remap_tf.serving.manifest import IndexFormatError


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
            this (`remap_tf.serving.index.tuning`); a knob given explicitly is kept fixed. None:
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


@register("scann")
class ScannIndex(RowIndex):
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
        start = len(self)
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

        if not len(self):
            raise InvalidInputError("cannot build a ScaNN index with no vectors; add some first")
        data = np.concatenate(self._pending) if self._pending else None
        if data is None or data.shape[0] != len(self):
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
        self._reorder_rows(order)
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
        if not len(self):
            return np.empty((q.shape[0], 0), dtype=object), np.empty((q.shape[0], 0), np.float32)
        if self._searcher is None:
            self.build()
        k = min(int(k), len(self))
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
        if not len(self):  # an empty index (e.g. a shard no id hashed to): nothing to build
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
            raise IndexFormatError(f"{directory}/{MANIFEST_FILE} does not list {assets}")
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
