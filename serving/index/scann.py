"""ScaNN (Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector
Quantization", ICML 2020), configured from the collection size and tuned to a recall target.

``ScannIndex`` chooses its configuration from the collection size, following ScaNN's own
guidance: brute force under ~20k vectors, asymmetric hashing (AH, 2 dimensions per block) with
exact re-ordering under ~100k, and a k-means tree (leaves ~ sqrt(n)) + AH + re-ordering above.
Every knob can be overridden through ``ScannConfig``; the search-time knobs are tuned to a
recall target after the build, and with a tree whose leaf count is not given the partitioning
too (a PCA projection for wide vectors, leaf count and AH settings, within a build-time
budget; `remap_tf.serving.index.tuning`). Trees are spherical (unit-norm centres; the rows are
unit vectors searched by dot product).
A shard of a larger collection takes the mode of the collection's size
(``ScannConfig.collection_size``).

Saved files beside the common ones (`remap_tf.serving.index.rows`)::

    scann/          ScaNN's own serialized searcher (protobuf + .npy files)

Nothing is ever unpickled: ScaNN's Python wrapper stores its doc ids with pickle, so this
module never hands ids to ScaNN (the base class keeps the ids and maps ScaNN's integer results
back) and loads the searcher through ``scann_pybind.ScannNumpy`` directly rather than
``load_searcher`` (which would unpickle a ``scann_docids.pkl`` found in the directory).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from remap_tf.contract import MANIFEST_FILE
from remap_tf.errors import InvalidInputError
from remap_tf.serving.index.pending import PendingRows
from remap_tf.serving.index.registry import register
from remap_tf.serving.index.rows import LazyRows, RowIndex
from remap_tf.serving.index.tuning import (
    DIMENSIONS_PER_BLOCK,
    LEAF_FACTORS,
    OFF,
    PCA_AUTO,
    REORDER_CANDIDATES,
    THRESHOLDS,
    HeldOut,
    check_budget,
    concentrated_variance,
    leaves_candidates,
    tune_builds,
    tune_search,
)
from remap_tf.serving.manifest import IndexFormatError

logger = logging.getLogger(__name__)

# A shard smaller than this keeps the mode of its own size: too few rows to train a tree and
# AH codebooks on.
MIN_TREE_ROWS = 2_000
# Rows of the training sample whose spectrum decides whether PCA is a tuning candidate.
SPECTRUM_ROWS = 10_000
# Rows upserted into ScaNN per call after its training (and rows of a brute-force searcher
# built before the rest is upserted): the build's working memory beyond ScaNN's own arrays.
UPSERT_BATCH = 8_192


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
            (default min(n, max(100000, n / 4)): ScaNN's own 100,000, and a quarter of larger
            collections, where 100,000 rows trained centres too coarse. Measured on 1M x 512
            clustered unit vectors (10,000 clusters, noise 1.0), spherical tree of 1,000
            leaves, recall@10 >= 0.95, 1 thread: leaves searched / queries/s 96 / 1.8k with
            a 100k sample, 48 / 3.1k with 200k, 8 / 10.2k with 250k, 1 / 21.3k with 400k.
            A quarter keeps ScaNN's training (~5x its sample) near the rows' own 1.25x;
            `build_memory_bound`).
        dimensions_per_block: AH dimensions per 16-centre block (default 2, ScaNN's advice,
            or what the partitioning tuning measured fastest).
        anisotropic_quantization_threshold: AH noise-shaping threshold, or "off" for none
            (ScaNN's NaN: plain reconstruction loss); default 0.2 for unit vectors, or what
            the partitioning tuning measured fastest.
        spherical: spherical k-means for the tree (unit-norm centres, rows assigned by dot
            product, the way queries are routed to leaves); default True. Measured by
            bench/scann_partitioning.py (200k x 512 clustered unit vectors, noise 1.0,
            recall@10 >= 0.95, 1 thread): 1 leaf of 447 searched and 44.9k queries/s, against
            24 leaves and 12.6k with ScaNN's generic (squared-L2) tree; on 1536-d data shaped
            like REMAP descriptors 8-12% slower than the generic tree (docs/benchmarks.md).
            ann-benchmarks' ScaNN settings for angular data use it too.
        pca_dims: a PCA projection before the tree and AH (re-ordering still scores the full
            rows; with a tree only, "off" in the other modes): "off", "auto" (ScaNN's choice
            of dimensions: those above its significance threshold) or a number of
            dimensions. None: "off", and with the partitioning tuned, "auto" is a candidate
            for rows whose variance is concentrated
            (`tuning.concentrated_variance`). Measured by bench/scann_partitioning.py (100k x
            1536 shaped like REMAP descriptors, recall@10 >= 0.95, 1 thread): 8.8k queries/s
            with "auto" against 2.6k without.
        reorder: candidates re-scored exactly after AH (default 250 for "ah", 100 behind a
            tree; at least k at search).
        num_threads: search and training threads (0 = all CPUs).
        batch_size: queries per parallel search batch.
        target_recall: after building (except brute force), hold out ``tuning_queries`` of
            the collection's own vectors as queries and choose ``num_leaves_to_search`` and
            ``reorder`` as the fastest setting whose recall@10 against brute force reaches
            this (`remap_tf.serving.index.tuning`); a knob given explicitly is kept fixed. None:
            no tuning, the fixed size-chosen defaults above. With a tree whose ``num_leaves``
            is not given, the tuning also chooses the partitioning: it builds the tree with
            ~sqrt(n) leaves x `tuning.LEAF_FACTORS` and, at the best leaf count, the AH
            settings of `tuning.DIMENSIONS_PER_BLOCK` x `tuning.THRESHOLDS` (those not
            given), within ``tune_budget``, and keeps the fastest that reaches the target
            (`tuning.tune_builds`).
        tuning_queries: held-out queries the tuning measures recall on.
        tune_budget: the partitioning tuning's builds beyond the first may take this many
            times the first build's seconds (default 1: a tuned build costs at most about
            twice an untuned one); candidates that would not fit are recorded as skipped.
        collection_size: set when this index is one shard of a collection this large
            (`ShardedIndex.build`, `remap_tf.serving.beam_index`): "auto" chooses the mode
            against it, so a shard gets the tree the whole collection would have had (its
            leaves still ~ sqrt of its own size); with tuning, a shard too small for a tree
            of its own also measures brute force and keeps the faster.
        tuning: set by the build: what the tuning chose and measured (recall, queries/s;
            with the partitioning tuned, every candidate tried, and a one-line summary).
    """

    mode: str = "auto"
    brute_force_below: int = 20_000
    tree_above: int = 100_000
    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    training_sample_size: int | None = None
    dimensions_per_block: int | None = None
    anisotropic_quantization_threshold: float | str | None = None
    spherical: bool | None = None
    pca_dims: int | str | None = None
    reorder: int | None = None
    num_threads: int = 0
    batch_size: int = 256
    target_recall: float | None = 0.95
    tuning_queries: int = 1000
    tune_budget: float = 1.0
    collection_size: int | None = None
    tuning: dict | None = None

    MODES = ("auto", "brute_force", "ah", "tree_ah")

    def __post_init__(self):
        if self.mode not in self.MODES:
            raise InvalidInputError(
                f"ScannConfig.mode must be one of {self.MODES}, got {self.mode!r}"
            )
        positive = ("num_leaves", "num_leaves_to_search", "training_sample_size", "reorder")
        for name in (*positive, "dimensions_per_block", "collection_size"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise InvalidInputError(f"ScannConfig.{name} must be positive, got {value}")
        self._check_threshold()
        self._check_pca()
        if self.spherical is not None and not isinstance(self.spherical, bool):
            raise InvalidInputError(
                f"ScannConfig.spherical must be true or false, got {self.spherical!r}"
            )
        check_budget(self.tune_budget, "ScannConfig.tune_budget")
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

    def _check_threshold(self) -> None:
        value = self.anisotropic_quantization_threshold
        if isinstance(value, float) and math.isnan(value):
            self.anisotropic_quantization_threshold = value = OFF  # ScaNN's own "none"
        if value is None or value == OFF:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidInputError(
                "ScannConfig.anisotropic_quantization_threshold must be a number > 0 or "
                f"{OFF!r}, got {value!r}"
            )

    def _check_pca(self) -> None:
        value = self.pca_dims
        if value is None or value in (OFF, PCA_AUTO):
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInputError(
                f"ScannConfig.pca_dims must be {OFF!r}, {PCA_AUTO!r} or a number of dimensions "
                f"> 0, got {value!r}"
            )

    def auto_mode(self, count: int) -> str:
        """The mode "auto" gives ``count`` vectors."""
        if count < self.brute_force_below:
            return "brute_force"
        return "ah" if count < self.tree_above else "tree_ah"

    def resolved(self, count: int) -> ScannConfig:
        """A copy with mode and every size-dependent knob fixed for ``count`` vectors (the
        mode for ``collection_size`` when that is larger and ``count`` can hold a tree)."""
        mode = self.mode
        if mode == "auto":
            size = max(count, self.collection_size or 0) if count >= MIN_TREE_ROWS else count
            mode = self.auto_mode(size)
        out = dataclasses.replace(self, mode=mode)
        out.dimensions_per_block = self.dimensions_per_block or 2
        threshold = self.anisotropic_quantization_threshold
        out.anisotropic_quantization_threshold = 0.2 if threshold is None else threshold
        out.spherical = True if self.spherical is None else self.spherical
        # ScaNN projects only in front of a tree: without one it refuses the searcher.
        out.pca_dims = (self.pca_dims or OFF) if mode == "tree_ah" else OFF
        if mode in ("ah", "tree_ah"):
            # Re-ordering 250 AH candidates keeps recall@10 >= 0.95 without a tree (50k x 256
            # clustered vectors: 100 gave 0.93); behind a tree 100 lost nothing measurable and
            # searched ~1.5x faster (100k x 512, bench/ann.py data and a noisier variant).
            out.reorder = self.reorder or (100 if mode == "tree_ah" else 250)
            out.training_sample_size = self.training_sample_size or min(
                count, max(100_000, count // 4)
            )
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


def build_memory_bound(count: int, dim: int, sample: int) -> int:
    """Bytes a ScaNN build of ``count`` ``dim``-d rows trained on ``sample`` of them may add
    to its process at the peak, beyond the rows the caller holds (measured with
    ``python -m bench.build_memory``, docs/scale.md; tests/test_build_memory.py holds a build
    to it): the larger of ScaNN's float32 copy of the rows plus its codes (1.17x the raw
    rows measured, stated 1.25x) and ScaNN's training on the sample (~5x its raw rows:
    its copy, the tree's and the codebooks' training copies, the residuals), plus what the
    index keeps per id (its list of the caller's ids, 8 bytes, and an id string it read
    itself, ~64 bytes for a short id from ``remap embed`` shards; the id -> row map is only
    built by a lookup after the build; stated 100) and a fixed 64 MiB (the tuning's search
    buffers, what the freed candidates leave in the C heap, a batch of rows; 20-50 MiB
    measured).

    Raw float32 rows are ``4 * dim`` bytes each: at 1M x 512 this states 1.25 + 0.05 (ids)
    + 0.03 = ~1.33x, where 1.28x (rows in memory) and 1.33x (from shards) were measured,
    against 4.5x when the build joined the rows into one matrix and ScaNN took it whole
    (docs/scale.md).
    """
    raw = 4 * int(dim)
    return int(max(1.25 * count * raw, 5.25 * sample * raw) + 100 * count + (64 << 20))


def trim_heap() -> None:
    """Hands the memory freed in the C heap back to the system (glibc's ``malloc_trim``;
    nothing elsewhere): ScaNN frees a searcher's many per-leaf arrays into the heap, where
    glibc would keep them, so the next candidate of the tuning would add to them. Call it
    after dropping an index when the process goes on to other large work."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _spread(rows: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``rows``, evenly spaced (the sample is in collection order)."""
    return rows[:: max(1, -(-len(rows) // count))]


def _candidate_config(config: ScannConfig, candidate: dict, leaves_to_search) -> ScannConfig:
    """``config`` with a candidate's mode, leaves and AH settings (search knobs defaulted)."""
    out = dataclasses.replace(config, **candidate)
    if out.mode == "brute_force":
        out.num_leaves = out.num_leaves_to_search = out.reorder = None
    else:
        out.num_leaves_to_search = min(
            out.num_leaves, leaves_to_search or max(1, out.num_leaves // 10)
        )
    return out


def partition_stages(
    requested: ScannConfig, config: ScannConfig, count: int, sample: np.ndarray | None = None
) -> list:
    """The candidates `tuning.tune_builds` tries for a tree of ``count`` vectors, in three
    stages.

    First the size-chosen tree (``config``, the default); brute force too when the mode is
    "auto" and ``count`` alone would not have had a tree (a shard of a larger collection);
    and the default with ScaNN's PCA projection ("auto") when the user did not set
    ``pca_dims`` and the rows of ``sample`` are `tuning.PCA_MIN_DIMS` wide or wider with
    their variance concentrated in a few directions (`tuning.concentrated_variance`: on
    isotropic rows the projection keeps nearly every dimension and only adds to the build).
    Then, at the best of those,
    `tuning.LEAF_FACTORS` times the leaf count; then, at the best leaf count, the AH settings
    the user did not fix (`tuning.DIMENSIONS_PER_BLOCK` x `tuning.THRESHOLDS`).
    """
    default = {
        "mode": "tree_ah",
        "num_leaves": config.num_leaves,
        "pca_dims": config.pca_dims,
        "dimensions_per_block": config.dimensions_per_block,
        "anisotropic_quantization_threshold": config.anisotropic_quantization_threshold,
    }

    # Decided now, so that the sample is not held through the builds.
    offer_pca = requested.pca_dims is None and sample is not None and concentrated_variance(sample)

    def shape(best):
        out = [default]
        if requested.mode == "auto" and requested.auto_mode(count) != "tree_ah":
            out.append({"mode": "brute_force"})
        if offer_pca:
            out.append(default | {"pca_dims": PCA_AUTO})
        return out

    def leaves(best):
        if best["mode"] != "tree_ah":
            return []
        out, counts = [], {config.num_leaves}
        for factor in LEAF_FACTORS:
            number = min(max(1, round(config.num_leaves * factor)), max(1, count // 4))
            if number not in counts:
                counts.add(number)
                out.append(best | {"num_leaves": number})
        return out

    def hashing(best):
        if best["mode"] != "tree_ah":
            return []
        blocks = [requested.dimensions_per_block] if requested.dimensions_per_block else None
        threshold = requested.anisotropic_quantization_threshold
        return [
            best | {"dimensions_per_block": d, "anisotropic_quantization_threshold": t}
            for d in blocks or DIMENSIONS_PER_BLOCK
            for t in ([threshold] if threshold is not None else THRESHOLDS)
            if (d, t) != (best["dimensions_per_block"], best["anisotropic_quantization_threshold"])
        ]

    return [shape, leaves, hashing]


def tuning_summary(config: dict) -> str | None:
    """One line on what the tuning of a ScaNN config (``ScannIndex.config``) chose and tried;
    None when it was not tuned."""
    tuning = config.get("tuning")
    if not tuning:
        return None
    if config["mode"] == "brute_force":
        shape = "brute force"
    elif config["mode"] == "ah":
        shape = f"AH {config['dimensions_per_block']} dims/block, reorder {config['reorder']}"
    else:
        pca = config.get("pca_dims") or OFF
        shape = (
            f"tree of {config['num_leaves']} leaves searching {config['num_leaves_to_search']}, "
            + ("" if pca == OFF else f"PCA {pca}, ")
            + f"AH {config['dimensions_per_block']} dims/block threshold "
            f"{config['anisotropic_quantization_threshold']}, reorder {config['reorder']}"
        )
    line = (
        f"ScaNN tuned to recall@10 >= {tuning['target_recall']:g}: {shape}; recall "
        f"{tuning['measured_recall']:.3f}, {tuning['qps']:,.0f} queries/s"
    )
    if not tuning["reached"]:
        line += " (target not reached: the most accurate setting)"
    candidates = tuning.get("candidates")
    if candidates:
        skipped = sum("skipped" in c for c in candidates)
        line += (
            f"; {len(candidates) - skipped} candidate(s) built, {skipped} skipped over the "
            f"build budget ({tuning['budget']:g} x the first build)"
        )
    return line


@register("scann")
class ScannIndex(RowIndex):
    """ScaNN index configured from the collection size, with updates and safe persistence.

    Vectors added before the first search are kept as given (arrays not copied, `LazyRows`
    not read) and streamed into the searcher at once (``build()`` forces it; its docstring
    says in how much memory); vectors added or deleted later go through
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
        pca = self._requested.pca_dims
        if isinstance(pca, int) and pca >= self.dim:
            raise InvalidInputError(
                f"ScannConfig.pca_dims must be below the rows' {self.dim} dimensions, got {pca}"
            )
        self._resolved: ScannConfig | None = None
        self._searcher = None
        self._pool_threads = 0
        self._pending: list[np.ndarray | LazyRows] = []  # the rows added before the build

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

    def _add_lazy(self, parts) -> None:
        if self._searcher is None:  # read when the build streams them
            self._pending.extend(parts)
        else:
            super()._add_lazy(parts)

    def _delete_ids(self, ids) -> None:
        if self._searcher is None:
            pending = PendingRows(self._pending, self._dim).all() if self._pending else None
            keep = self._delete_keeping_order(ids)
            self._pending = [pending[keep]] if pending is not None else []
            return
        # ScaNN deletes a row by moving the last row into its slot, one deletion after the
        # other (as its own Python wrapper assumes); the id list mirrors that.
        self._searcher.searcher.delete(self._delete_swapping_last(ids))

    def build(self, collection_size: int | None = None) -> None:
        """Trains and builds the ScaNN searcher from every vector added so far, then (with a
        ``target_recall``) tunes it on vectors held out of the training: its search-time
        knobs, and with a tree whose leaves are not given, the partitioning too
        (``ScannConfig.target_recall``).

        The build streams: ScaNN is trained on a random sample of the rows
        (``training_sample_size``), the rest is upserted `UPSERT_BATCH` rows at a time into
        room reserved for all of them, and the rows given to ``add`` (or the `LazyRows` of
        ``add_lazily``, read part by part, e.g. the shards of ``remap embed``) are never
        joined into one matrix; the tuning's exact neighbours are streamed too, and its
        candidate partitionings are built one at a time. Measured (``python -m
        bench.build_memory``, docs/scale.md), the build's peak memory beyond the rows the
        caller holds is ScaNN's float32 copy of the rows plus its codes, ~1.17x the raw
        float32 rows (``num * dim * 4`` bytes), or ScaNN's training on the sample, ~5x the
        sample's raw rows, whichever is larger; beside it the ids (8 bytes each, ~80 when
        read from shards: the id -> row map waits for the first lookup) and 20-50 MiB.
        Stated: `build_memory_bound`. 1M x 512 (250,000 sample): 1.28x the raw rows from
        rows in memory, 1.33x from ``remap embed`` shards, ids included (4.9x at 200,000 x
        256 before it streamed). Saving it afterwards adds ~0.7x for a moment (ScaNN's
        ``serialize``).

        Args:
            collection_size: the size of the collection this index is a shard of
                (``ScannConfig.collection_size``); None: as configured.
        """
        if not len(self):
            raise InvalidInputError("cannot build a ScaNN index with no vectors; add some first")
        source = PendingRows(self._pending, self._dim)
        if self._searcher is not None or len(source) != len(self):
            raise RuntimeError("the ScaNN index is already built")
        n = len(source)
        requested = self._requested
        if collection_size is not None:
            requested = dataclasses.replace(requested, collection_size=int(collection_size))
        config = requested.resolved(n)
        held = 0
        if config.mode != "brute_force" and config.target_recall is not None:
            held = min(config.tuning_queries, n // 4)
        plan = self._plan(n, held if held >= 2 else 0, config)
        if config.training_sample_size:
            config.training_sample_size = len(plan[0])
        queries = None
        if len(plan[2]):  # trained on by nothing, upserted last: the tuning's queries
            queries = HeldOut.streamed(
                self._stream(source, plan), n, source.take(plan[2]), np.arange(n - held, n)
            )
        if queries is not None and config.mode == "tree_ah" and requested.num_leaves is None:
            searcher, config = self._tune_partitioning(source, plan, queries, requested, config)
        else:
            searcher = self._build_searcher(source, plan, config)
        self._reorder_rows(np.concatenate(plan))  # ScaNN's rows: sample, rest, held out
        self._searcher = searcher
        self._pool_threads = self._threads()
        self._resolved = config
        self._pending = []
        if queries is not None and config.tuning is None:
            self._tune(queries)

    @staticmethod
    def _plan(n: int, held: int, config: ScannConfig) -> tuple:
        """``(sample, rest, held)``: ascending rows of ``0..n-1`` that ScaNN is trained on,
        that are upserted after, and that are held out as the tuning's queries (upserted
        last, so that the tree and codebooks were fitted without them, as they were without
        any future query)."""
        rng = np.random.default_rng(0)
        held_rows = np.sort(rng.choice(n, held, replace=False)) if held else np.empty(0, int)
        others = np.ones(n, dtype=bool)
        others[held_rows] = False
        others = np.flatnonzero(others)
        size = config.training_sample_size or min(len(others), UPSERT_BATCH)
        if size < len(others):
            sample = np.sort(rng.choice(others, size, replace=False))
            rest = np.setdiff1d(others, sample, assume_unique=True)
        else:
            sample, rest = others, np.empty(0, int)
        return sample, rest, held_rows

    @staticmethod
    def _stream(source: PendingRows, plan: tuple):
        """ScaNN's rows in its order (``plan``), `UPSERT_BATCH` at a time."""
        for rows in plan:
            yield from source.batches(rows, UPSERT_BATCH)

    def _build_searcher(self, source: PendingRows, plan: tuple, config: ScannConfig):
        """A ScaNN searcher of ``config`` trained on the rows ``plan[0]`` of ``source``, the
        rest (``plan[1]``, then ``plan[2]``) upserted in batches into reserved room."""
        from scann.scann_ops.py import scann_ops_pybind

        trim_heap()  # what a freed searcher (a tuning candidate) left in the heap
        builder = scann_ops_pybind.builder(source.take(plan[0]), 10, "dot_product")
        builder.set_n_training_threads(self._threads())
        pca = config.pca_dims or OFF
        if config.mode == "tree_ah" and pca != OFF:
            builder = builder.pca() if pca == PCA_AUTO else builder.pca(pca, None)
        if config.mode == "tree_ah":
            builder = builder.tree(
                num_leaves=config.num_leaves,
                num_leaves_to_search=config.num_leaves_to_search,
                training_sample_size=config.training_sample_size,
                spherical=config.spherical is not False,
            )
        if config.mode == "brute_force":
            builder = builder.score_brute_force()
        else:
            threshold = config.anisotropic_quantization_threshold
            builder = builder.score_ah(
                config.dimensions_per_block,
                anisotropic_quantization_threshold=float("nan") if threshold == OFF else threshold,
                training_sample_size=config.training_sample_size,
            ).reorder(config.reorder)
        searcher = builder.build()
        del builder  # it holds the sample
        searcher.set_num_threads(self._threads())
        count = sum(len(rows) for rows in plan)
        if count > len(plan[0]):
            # Room for every row at once: growing ScaNN's arrays by upserts alone doubles them
            # (1.7x the rows at the peak, measured, against 1.15x reserved).
            searcher.reserve(count)
        start = len(plan[0])
        for batch in self._stream(source, plan[1:]):
            rows = searcher.searcher.upsert([None] * len(batch), batch, 1)
            if list(rows) != list(range(start, start + len(batch))):
                raise RuntimeError(f"ScaNN upsert returned rows {list(rows)[:5]}...")
            start += len(batch)
        return searcher

    def _search_rows(self, searcher, config: ScannConfig):
        """``search(queries, k, leaves, reorder) -> rows`` on ``searcher``, for the tuning."""
        threads = self._threads()

        def search(queries, k, leaves, reorder):
            pre = max(reorder, k) if reorder else None
            if threads > 1:
                rows, _ = searcher.search_batched_parallel(
                    queries, k, pre, leaves, batch_size=config.batch_size
                )
            else:
                rows, _ = searcher.search_batched(queries, k, pre, leaves)
            return rows

        return search

    def _knobs(self, config: ScannConfig) -> tuple[list, list]:
        """The leaves-to-search and reorder values the tuning tries (the given ones fixed)."""
        requested = self._requested
        leaves, reorders = [None], [None]
        if config.mode == "tree_ah":
            fixed = requested.num_leaves_to_search
            leaves = (
                [config.num_leaves_to_search] if fixed else leaves_candidates(config.num_leaves)
            )
        if config.mode != "brute_force":
            reorders = [config.reorder] if requested.reorder else list(REORDER_CANDIDATES)
        return leaves, reorders

    def _tune_partitioning(self, source, plan, held, requested: ScannConfig, config):
        """Builds the candidate partitionings of `partition_stages` within the budget, one
        at a time; returns the fastest searcher reaching the target and its config
        (``tuning`` records all)."""
        started = time.perf_counter()

        def build(candidate):
            chosen = _candidate_config(config, candidate, requested.num_leaves_to_search)
            searcher = self._build_searcher(source, plan, chosen)
            return (searcher, self._search_rows(searcher, chosen), *self._knobs(chosen))

        def estimate(candidate):  # tree builds grew ~ sqrt(leaves) (20k-60k x 32-64)
            if candidate["mode"] == "brute_force":
                return 0.0
            # A projected build took 0.4-0.6x the unprojected one (100k x 1536 shaped).
            projected = 0.6 if (candidate.get("pca_dims") or OFF) != OFF else 1.0
            return projected * math.sqrt(candidate["num_leaves"] / config.num_leaves)

        count = sum(len(rows) for rows in plan)
        sample = source.take(_spread(plan[0], SPECTRUM_ROWS))
        stages = partition_stages(requested, config, count, sample)
        del sample
        result = tune_builds(
            build, stages, held, config.target_recall,
            budget=config.tune_budget, estimate=estimate, one_at_a_time=True,
        )  # fmt: skip
        chosen = result["chosen"]
        out = _candidate_config(config, result["candidate"], requested.num_leaves_to_search)
        out.num_leaves_to_search = chosen["num_leaves_to_search"]
        out.reorder = chosen["reorder"]
        out.tuning = {
            "target_recall": config.target_recall,
            "reached": chosen["reached"],
            "measured_recall": chosen["recall"],
            "recall_lower_bound": chosen["recall_lower_bound"],
            "qps": chosen["qps"],
            "queries": int(len(held.own)),
            "evaluated": sum(c.get("evaluated", 0) for c in result["candidates"]),
            "seconds": round(time.perf_counter() - started, 2),
            "budget": config.tune_budget,
            "budget_seconds": result["budget_seconds"],
            "spent_seconds": result["spent_seconds"],
            "rebuild_seconds": result["rebuild_seconds"],
            "candidates": result["candidates"],
        }
        out.tuning["summary"] = tuning_summary(out.to_dict())
        logger.info(out.tuning["summary"])
        return result["searcher"], out

    def _tune(self, held: HeldOut) -> None:
        """Chooses leaves_to_search and reorder for the target recall (see ``ScannConfig``)."""
        config = self._resolved
        leaves, reorders = self._knobs(config)
        result = tune_search(
            self._search_rows(self._searcher, config), None, config.target_recall,
            held=held, leaves=leaves, reorders=reorders,
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
