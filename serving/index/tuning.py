"""Recall-targeted tuning of an approximate searcher's search-time knobs.

An approximate index trades recall for speed through a few search-time knobs (ScaNN: the
tree leaves searched per query and the number of candidates re-scored exactly). Fixed
defaults are right for one data set and wrong for the next (docs/search.md: a tenth of the
leaves was twice too slow on clustered 1M x 512 vectors and barely enough on noisier ones), so
`tune_search` measures instead of guessing:

1. it holds out a sample of the database's own vectors as queries (leave-one-out: each query's
   own row is removed from both the truth and the answer, so the trivial self-match never
   counts);
2. it computes their exact top-k by brute force (NumPy matmul over the whole database);
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

    def retime(self, point: dict, passes: int = 2) -> dict:
        for _ in range(passes):
            start = time.perf_counter()
            self.search(self.queries, self.k + 1, point["leaves"], point["reorder"])
            point["seconds"] = min(point["seconds"], time.perf_counter() - start)
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

    Returns:
        ``{"leaves", "reorder", "target_recall", "reached", "measured_recall",
        "recall_lower_bound", "qps", "queries", "evaluated", "seconds"}``: the chosen
        setting (``reached`` False: none reached the target, the most accurate one is
        returned), its recall on the held-out queries and the queries/s measured.
    """
    if not 0.0 < target_recall <= 1.0:
        raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall}")
    started = time.perf_counter()
    n = database.shape[0]
    if n < 2:
        raise InvalidInputError("tuning needs at least 2 vectors")
    k = min(k, n - 1)
    if query_rows is None:
        query_rows = np.random.default_rng(seed).choice(n, min(n, num_queries), replace=False)
    own = np.sort(np.asarray(query_rows, dtype=np.int64))
    queries = np.ascontiguousarray(database[own])
    truth = _drop_self(exact_neighbours(database, queries, k + 1), own, k)
    evaluate = _Evaluator(search, queries, own, truth, k)
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
