"""Recall-targeted tuning of an approximate searcher's search-time knobs.

An approximate index trades recall for speed through a few search-time knobs (ScaNN: the
tree leaves searched per query and the number of candidates re-scored exactly). Fixed
defaults are right for one data set and wrong for the next (docs/search.md: a tenth of the
leaves was twice too slow on clustered 1M x 512 vectors and barely enough on noisier ones), so
`tune_search` measures instead of guessing:

1. it holds out a sample of the database's own vectors as queries (leave-one-out: each query's
   own row is removed from both the truth and the answer, so the trivial self-match never
   counts);
2. it computes their exact top-k by brute force (NumPy matmul over the database; a build that
   streams its rows gives them in blocks, `HeldOut.streamed`, and only the running top-k is
   kept);
3. it walks the frontier of (leaves, reorder) settings: for each re-ordering depth, from the
   deepest down, the fewest leaves whose recall@k reaches the target. Recall grows with both
   knobs, so the walk needs at most ``len(leaves) + len(reorders)`` searches;
4. it times the frontier settings (fastest of three passes) and keeps the fastest.

"Reaches" means the lower end of a 2-standard-error interval of the per-query recall, not
the sample mean, so that a setting chosen on these queries keeps the target on fresh queries
from the same distribution (tests/test_tuning.py checks that on queries it never saw).

Pure NumPy on a ``search(queries, k, leaves, reorder) -> (num_queries, k) rows`` callable, so
any searcher can be tuned; `remap_tf.serving.index.scann.ScannIndex` calls it after every
non-brute-force build.

`tune_builds` goes one level up: it builds several candidate searchers (ScaNN: leaf counts
around sqrt(n), then AH settings), tunes each with `tune_search` on the same held-out queries
(`HeldOut`), skips those whose estimated build time no longer fits a budget of a multiple of
the first build's time, records every candidate and keeps the fastest that reaches the target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.serving.index.exact import top_k

# Re-ordering depths tried (candidates re-scored exactly after AH), deepest first.
REORDER_CANDIDATES = (1000, 600, 400, 250, 160, 100, 60, 40, 25)
# Standard errors below the sample mean that must still reach the target.
CONFIDENCE_Z = 2.0


def leaves_candidates(num_leaves: int, count: int = 28) -> list[int]:
    """Leaves-to-search values tried for a tree of ``num_leaves``: geometric from 1 to all."""
    values = np.unique(np.round(np.geomspace(1, max(1, num_leaves), count)).astype(int))
    return [int(v) for v in values if 1 <= v <= num_leaves]


def exact_neighbours(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 128):
    """Rows of the ``k`` largest dot products per query, best first: ``(num_queries, k)``."""
    k = min(k, database.shape[0])
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        out[start : start + chunk] = top_k(queries[start : start + chunk] @ database.T, k)[0]
    return out


def streamed_neighbours(batches, queries: np.ndarray, k: int, chunk: int = 64):
    """`exact_neighbours` over a database given as row blocks in order (``batches``: arrays
    ``(rows, dim)``), keeping only the running top-k: memory is one block and ``chunk``
    queries' scores of it, never the database.

    Returns:
        ``(num_queries, min(k, database rows))`` rows, best first.
    """
    best_rows = np.empty((queries.shape[0], 0), np.int64)
    best_scores = np.empty((queries.shape[0], 0), np.float32)
    start = 0
    for block in batches:
        rows, scores = [], []
        for first in range(0, queries.shape[0], chunk):
            found, values = top_k(queries[first : first + chunk] @ block.T, min(k, len(block)))
            rows.append(found + start)
            scores.append(values)
        merged = np.concatenate([best_scores, np.concatenate(scores)], axis=1)
        order = top_k(merged, min(k, merged.shape[1]))[0]
        found = np.concatenate([best_rows, np.concatenate(rows)], axis=1)
        best_rows = np.take_along_axis(found, order, axis=1)
        best_scores = np.take_along_axis(merged, order, axis=1)
        start += len(block)
    return best_rows


def _drop_self(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own database row, cut to ``k`` (padded with -1)."""
    out = np.full((rows.shape[0], k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(rows, own, strict=True)):
        kept = row[(row != me) & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Fraction of each query's true neighbours among the found ones: ``(num_queries,)``."""
    k = truth.shape[1]
    return np.array(
        [len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]
    )


def check_target(target_recall, name: str = "target_recall") -> None:
    """InvalidInputError unless ``target_recall`` is a number in (0, 1]."""
    if (
        isinstance(target_recall, bool)
        or not isinstance(target_recall, int | float)
        or not 0.0 < target_recall <= 1.0
    ):
        raise InvalidInputError(f"{name} must be in (0, 1], got {target_recall!r}")


class HeldOut:
    """Held-out queries (database rows) and their exact top-k without themselves.

    Args:
        database: ``(num_vectors, dim)`` float32, the rows the searchers hold, in their order.
        k: neighbours per query that recall counts (at most ``num_vectors - 1``).
        num_queries: rows drawn at random when ``query_rows`` is None.
        query_rows: the rows to use as queries.
        seed: which rows are drawn.
    """

    def __init__(self, database, k=10, num_queries=1000, query_rows=None, seed=0):
        n = database.shape[0]
        if n < 2:
            raise InvalidInputError("tuning needs at least 2 vectors")
        self.k = min(k, n - 1)
        if query_rows is None:
            query_rows = np.random.default_rng(seed).choice(n, min(n, num_queries), replace=False)
        self.own = np.sort(np.asarray(query_rows, dtype=np.int64))
        self.queries = np.ascontiguousarray(database[self.own])
        found = exact_neighbours(database, self.queries, self.k + 1)
        self.truth = _drop_self(found, self.own, self.k)

    @classmethod
    def streamed(cls, batches, count: int, queries: np.ndarray, own, k: int = 10) -> HeldOut:
        """Held-out queries of a database read in row blocks (`streamed_neighbours`), for a
        build that never holds the database as one matrix.

        Args:
            batches: the database's rows in order, as ``(rows, dim)`` arrays.
            count: the database's rows in all (at least 2).
            queries: ``(len(own), dim)`` the query rows themselves.
            own: their rows in the database, ascending.
            k: as for the constructor.
        """
        if count < 2:
            raise InvalidInputError("tuning needs at least 2 vectors")
        held = cls.__new__(cls)
        held.k = min(k, count - 1)
        held.own = np.asarray(own, dtype=np.int64)
        held.queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = streamed_neighbours(batches, held.queries, held.k + 1)
        held.truth = _drop_self(found, held.own, held.k)
        return held


# Timing of the settings that reach the target: the best pass of at least 2, and of as many
# as fill this many seconds (capped): 5 or more passes of a 4 ms search. (0.1 s and 30 made
# the test suite 3 minutes slower, for a tuning that only searches in milliseconds where
# collections are small and one setting's speed matters least.)
RETIME_SECONDS = 0.02
MAX_PASSES = 10


class _Evaluator:
    """Searches the held-out queries with one setting; caches recall and best time."""

    def __init__(self, search, queries, own, truth, k):
        self.search, self.queries, self.own, self.truth, self.k = search, queries, own, truth, k
        self.results: dict[tuple, dict] = {}

    def __call__(self, leaves, reorder) -> dict:
        key = (leaves, reorder)
        if key not in self.results:
            start = time.perf_counter()
            rows = np.asarray(self.search(self.queries, self.k + 1, leaves, reorder))
            seconds = time.perf_counter() - start
            recall = per_query_recall(_drop_self(rows, self.own, self.k), self.truth)
            error = recall.std(ddof=1) / math.sqrt(len(recall)) if len(recall) > 1 else 0.0
            self.results[key] = {
                "leaves": leaves,
                "reorder": reorder,
                "recall": float(recall.mean()),
                "lower": float(recall.mean() - CONFIDENCE_Z * error),
                "seconds": seconds,
            }
        return self.results[key]

    def retime(self, point: dict, passes: int = 2, at_least: float = RETIME_SECONDS) -> dict:
        """Keeps the fastest of ``passes`` more searches, and of more while they add up to
        less than ``at_least`` seconds (at most `MAX_PASSES`): a pass of a few milliseconds
        is at the mercy of one scheduler tick on a busy machine."""
        spent, done = 0.0, 0
        while done < passes or (spent < at_least and done < MAX_PASSES):
            start = time.perf_counter()
            self.search(self.queries, self.k + 1, point["leaves"], point["reorder"])
            seconds = time.perf_counter() - start
            point["seconds"] = min(point["seconds"], seconds)
            spent, done = spent + seconds, done + 1
        return point


def tune_search(
    search: Callable[[np.ndarray, int, int | None, int | None], np.ndarray],
    database: np.ndarray,
    target_recall: float = 0.95,
    k: int = 10,
    num_queries: int = 1000,
    query_rows: np.ndarray | None = None,
    leaves: Sequence[int | None] = (None,),
    reorders: Sequence[int | None] = REORDER_CANDIDATES,
    seed: int = 0,
    held: HeldOut | None = None,
) -> dict:
    """The fastest (leaves, reorder) setting whose recall@k reaches ``target_recall``.

    Args:
        search: ``search(queries (q, dim), k, leaves, reorder) -> (q, k)`` database rows, best
            first (-1 for no result). ``leaves`` / ``reorder`` None: the searcher's own value.
        database: ``(num_vectors, dim)`` float32, the rows the searcher holds, in its order.
        target_recall: recall@k to reach (lower confidence bound on the held-out queries).
        k: neighbours per query that recall counts.
        num_queries: database vectors held out as queries (at most all of them), drawn at
            random when ``query_rows`` is None.
        query_rows: the rows to use as queries (e.g. rows the searcher was not trained on).
        leaves: leaves-to-search values to try, ascending (``(None,)`` without a tree).
        reorders: re-ordering depths to try (``(None,)`` when fixed or absent).
        seed: which vectors are held out.
        held: the held-out queries and their exact neighbours, when the caller tunes several
            searchers of the same rows (`tune_builds`); replaces the four arguments above.

    Returns:
        ``{"leaves", "reorder", "target_recall", "reached", "measured_recall",
        "recall_lower_bound", "qps", "queries", "evaluated", "seconds"}``: the chosen
        setting (``reached`` False: none reached the target, the most accurate one is
        returned), its recall on the held-out queries and the queries/s measured.
    """
    check_target(target_recall)
    started = time.perf_counter()
    held = held or HeldOut(database, k, num_queries, query_rows, seed)
    own = held.own
    evaluate = _Evaluator(search, held.queries, own, held.truth, held.k)
    leaves = list(leaves)
    reorders = sorted(reorders, key=lambda r: -(r or 0))
    frontier, i = [], 0
    for reorder in reorders:  # deepest first: shallower depths need at least as many leaves
        while i < len(leaves) and evaluate(leaves[i], reorder)["lower"] < target_recall:
            i += 1
        if i == len(leaves):
            break
        frontier.append(evaluate(leaves[i], reorder))
    reached = bool(frontier)
    if reached:
        chosen = min((evaluate.retime(p) for p in frontier), key=lambda p: p["seconds"])
    else:  # nothing reached the target: the most accurate setting measured
        chosen = max(evaluate.results.values(), key=lambda p: (p["recall"], -p["seconds"]))
    return {
        "leaves": chosen["leaves"],
        "reorder": chosen["reorder"],
        "target_recall": target_recall,
        "reached": reached,
        "measured_recall": round(chosen["recall"], 4),
        "recall_lower_bound": round(chosen["lower"], 4),
        "qps": round(len(own) / max(chosen["seconds"], 1e-9), 1),
        "queries": int(len(own)),
        "evaluated": len(evaluate.results),
        "seconds": round(time.perf_counter() - started, 2),
    }


# Leaf counts tried beside the size-chosen one (~sqrt(n)), as factors of it, cheapest first.
LEAF_FACTORS = (0.5, 2.0, 4.0)
# Asymmetric-hashing settings tried at the best leaf count: dimensions per 16-centre block
# (fewer: finer codes, slower scoring) and the anisotropic threshold ("off": plain
# reconstruction loss, ScaNN's NaN).
DIMENSIONS_PER_BLOCK = (2, 4)
OFF = "off"
THRESHOLDS = (0.2, OFF)
# ScaNN's PCA projection with its own choice of dimensions (its significance threshold), tried
# as a partitioning candidate for rows this wide or wider: scoring AH codes costs time in
# proportion to the dimensions, and real descriptors hold most of their variance in a few
# hundred of them (bench.shaped).
PCA_AUTO = "auto"
PCA_MIN_DIMS = 256
# ... and whose variance is concentrated: this share of it in at most this share of the
# dimensions. 1536-d data shaped like REMAP descriptors hold 80% in 128 of them (8%) and
# searched 3.8x faster projected; on 512-d isotropic clusters the projected build was 1.2x
# slower and searched no faster (docs/benchmarks.md, 'ann').
PCA_VARIANCE_SHARE = 0.8
PCA_MAX_DIMS_SHARE = 0.5


def concentrated_variance(rows: np.ndarray) -> bool:
    """Whether ``rows`` (a sample of the collection) are `PCA_MIN_DIMS` wide or wider and hold
    `PCA_VARIANCE_SHARE` of their variance in at most `PCA_MAX_DIMS_SHARE` of their
    dimensions: the data a PCA projection pays on."""
    rows = np.asarray(rows, np.float32)
    if rows.ndim != 2 or rows.shape[1] < PCA_MIN_DIMS or len(rows) < 2:
        return False
    centred = rows - rows.mean(axis=0)
    variances = np.linalg.eigvalsh(centred.T @ centred)[::-1]
    share = np.cumsum(variances) / max(float(variances.sum()), 1e-30)
    needed = int(np.searchsorted(share, PCA_VARIANCE_SHARE)) + 1
    return needed <= PCA_MAX_DIMS_SHARE * rows.shape[1]


# A candidate replaces the first (default) one only when this much faster: timings on a busy
# machine move by a few per cent, and the default is the better-known configuration.
CLEAR_GAIN = 1.05


class _Builds:
    """Builds and tunes candidates within ``budget`` x the first build's seconds."""

    def __init__(self, build, held, target_recall, budget, estimate, one_at_a_time=False):
        self.build, self.held, self.target, self.budget = build, held, target_recall, budget
        self.estimate, self.one_at_a_time = estimate, one_at_a_time
        self.records: list[dict] = []
        self.first_seconds: float | None = None
        self.spent = 0.0
        self.best: tuple[object, dict] | None = None  # (searcher, its record)

    def left(self) -> float:
        return self.budget * self.first_seconds - self.spent

    def __call__(self, candidate: dict) -> None:
        if self.first_seconds is not None:
            guess = self.estimate(candidate) * self.first_seconds
            if guess > self.left():
                reason = (
                    f"estimated build {guess:.2f} s > {max(self.left(), 0.0):.2f} s left of "
                    f"the budget ({self.budget:g} x the first build)"
                )
                self.records.append(candidate | {"skipped": reason})
                return
        if self.one_at_a_time and self.best is not None:
            self.best = (None, self.best[1])  # freed before the next build; rebuilt if it wins
        start = time.perf_counter()
        searcher, search, leaves, reorders = self.build(candidate)
        seconds = time.perf_counter() - start
        if self.first_seconds is None:
            self.first_seconds = seconds
        else:
            self.spent += seconds
        result = tune_search(
            search, None, self.target, held=self.held, leaves=leaves, reorders=reorders
        )
        record = candidate | {
            "num_leaves_to_search": result["leaves"],
            "reorder": result["reorder"],
            "reached": result["reached"],
            "recall": result["measured_recall"],
            "recall_lower_bound": result["recall_lower_bound"],
            "qps": result["qps"],
            "build_seconds": round(seconds, 3),
            "tune_seconds": result["seconds"],
            "evaluated": result["evaluated"],
        }
        self.records.append(record)
        if self.best is None or _better(record, self.best[1], self.records[0]):
            self.best = (searcher, record)


def _better(new: dict, old: dict, first: dict) -> bool:
    """Whether ``new`` beats ``old``: reaching the target, then speed (against the first
    candidate only by `CLEAR_GAIN`); among misses, recall."""
    if new["reached"] != old["reached"]:
        return new["reached"]
    if not new["reached"]:
        return new["recall"] > old["recall"]
    gain = CLEAR_GAIN if old is first else 1.0
    return new["qps"] > old["qps"] * gain


def tune_builds(
    build: Callable[[dict], tuple],
    stages: Sequence[Callable[[dict | None], list[dict]]],
    held: HeldOut,
    target_recall: float,
    budget: float = 1.0,
    estimate: Callable[[dict], float] = lambda candidate: 1.0,
    one_at_a_time: bool = False,
) -> dict:
    """The fastest of several builds (e.g. partitionings) whose recall reaches the target.

    Each candidate is built, then its search-time knobs are tuned by `tune_search` on the same
    held-out queries. The first candidate (the default) is always built; the others only while
    their estimated build time fits in what is left of ``budget`` x the first build's time
    (the rest are recorded as skipped, with the reason). Stages run in order, each given the
    best candidate so far, so a later stage can refine the winner of an earlier one.

    Args:
        build: ``build(candidate) -> (searcher, search, leaves, reorders)``: builds one
            candidate; ``search``, ``leaves`` and ``reorders`` as `tune_search` takes them.
        stages: ``stage(best candidate or None) -> [candidate dicts]``; the first stage's first
            candidate is the default.
        held: the held-out queries (`HeldOut`) every candidate is measured on.
        target_recall: recall@k to reach, as in `tune_search`.
        budget: the other builds may take this many times the first build's seconds.
        estimate: a candidate's build time as a multiple of the first build's.
        one_at_a_time: hold one searcher at a time (memory of one build, not two): the best
            so far is freed before the next candidate is built, and built again at the end
            unless it was the last one built (``rebuild_seconds``, outside the budget).

    Returns:
        ``{"searcher", "chosen", "candidate", "candidates", "budget_seconds",
        "spent_seconds", "rebuild_seconds"}``: the best candidate's searcher, record and
        fields; every
        candidate's record (the candidate's fields, then ``num_leaves_to_search``,
        ``reorder``, ``reached``, ``recall``, ``recall_lower_bound``, ``qps``,
        ``build_seconds``, ``tune_seconds``, ``evaluated``; or ``skipped``).
    """
    check_target(target_recall)
    check_budget(budget)
    builds = _Builds(build, held, target_recall, budget, estimate, one_at_a_time)
    for stage in stages:
        for candidate in stage(None if builds.best is None else _fields(builds.best[1])):
            builds(candidate)
    searcher, rebuild = builds.best[0], 0.0
    if searcher is None:  # freed (one_at_a_time) while later candidates were built
        start = time.perf_counter()
        searcher = build(_fields(builds.best[1]))[0]
        rebuild = time.perf_counter() - start
    return {
        "searcher": searcher,
        "chosen": builds.best[1],
        "candidate": _fields(builds.best[1]),
        "candidates": builds.records,
        "budget_seconds": round(budget * builds.first_seconds, 3),
        "spent_seconds": round(builds.spent, 3),
        "rebuild_seconds": round(rebuild, 3),
    }


_RESULT_FIELDS = frozenset(
    ("num_leaves_to_search", "reorder", "reached", "recall", "recall_lower_bound", "qps")
    + ("build_seconds", "tune_seconds", "evaluated", "skipped")
)


def _fields(record: dict) -> dict:
    """The candidate fields of a record."""
    return {key: value for key, value in record.items() if key not in _RESULT_FIELDS}


def check_budget(budget, name: str = "tune_budget") -> None:
    """InvalidInputError unless ``budget`` (a factor of the first build's time) is > 0."""
    if (
        isinstance(budget, bool)
        or not isinstance(budget, int | float)
        or not math.isfinite(budget)
        or budget <= 0
    ):
        raise InvalidInputError(
            f"{name} must be a number > 0 (a factor of the first build's time), got {budget!r}"
        )
