"""Retrieval evaluation: average precision, mAP, the revisited Oxford/Paris protocol, mP@k.

Pure NumPy, no TensorFlow. Descriptors are rows everywhere: ``(num_images, dim)``.

AP is computed as in the revisited protocol's ``compute_ap`` (Radenović, Iscen, Tolias,
Avrithis & Chum, "Revisiting Oxford and Paris", CVPR 2018; the same trapezoid rule as the
original Oxford ``compute_ap.cpp`` of Philbin et al., CVPR 2007): for the i-th positive
(0-based) found at 0-based rank ``r`` of the junk-free ranking,

    AP = sum_i ((i / r if r > 0 else 1) + (i + 1) / (r + 1)) / 2 * (1 / num_positives)

Junk (ignored) images are removed from the ranking before AP is computed, so every positive
ranked after ``j`` junk images moves up ``j`` places (the "rank shift"). ``num_positives`` is
the size of the ground-truth positive set, so positives missing from a truncated ranking
count as never found. Queries with no positives are skipped (their AP is NaN and they are left
out of every mean).

Example:
    >>> average_precision([3, 0, 1], positives=[0, 1])  # positives at ranks 1 and 2
    0.41666666666666663
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from remap_tf.errors import InvalidInputError

DEFAULT_KAPPAS = (1, 5, 10)
REVISITED_PROTOCOLS = ("easy", "medium", "hard")


# ---------------------------------------------------------------------------------------
# AP on one ranking
# ---------------------------------------------------------------------------------------


def ap_from_ranks(positive_ranks: Sequence[int] | np.ndarray, num_positives: int) -> float:
    """AP from the 0-based ranks of the retrieved positives (junk already removed).

    This is ``compute_ap(ranks, nres)`` of the revisited protocol (Radenović et al., CVPR
    2018), the trapezoid rule over recall steps of ``1 / num_positives``.

    Args:
        positive_ranks: (num_found,) increasing 0-based ranks of the positives in the
            junk-free ranking.
        num_positives: size of the ground-truth positive set (>= num_found).

    Returns:
        AP in [0, 1], or NaN when ``num_positives`` is 0 (a query to skip).
    """
    if num_positives <= 0:
        return float("nan")
    ranks = np.asarray(positive_ranks, dtype=np.float64)
    if ranks.size == 0:
        return 0.0
    found = np.arange(ranks.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_before = np.where(ranks > 0, found / np.maximum(ranks, 1), 1.0)
    precision_after = (found + 1.0) / (ranks + 1.0)
    return float(np.sum((precision_before + precision_after) / 2.0) / num_positives)


def positive_ranks(
    ranking: Sequence[int] | np.ndarray,
    positives: Iterable[int],
    junk: Iterable[int] = (),
) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` once the junk images are removed.

    Args:
        ranking: (num_ranked,) database indices, best first.
        positives: database indices of the relevant images.
        junk: database indices to ignore (removed from the ranking).

    Returns:
        (num_found,) int64 increasing ranks in the junk-free ranking.
    """
    ranking = np.asarray(ranking, dtype=np.int64).reshape(-1)
    positives = np.fromiter((int(p) for p in positives), dtype=np.int64)
    junk = np.fromiter((int(j) for j in junk), dtype=np.int64)
    # A positive listed as junk too is ignored, as in the revisited protocol's hard setting.
    keep = ~np.isin(ranking, junk)
    kept = ranking[keep]
    return np.flatnonzero(np.isin(kept, positives)).astype(np.int64)


def average_precision(
    ranking: Sequence[int] | np.ndarray,
    positives: Iterable[int],
    junk: Iterable[int] = (),
) -> float:
    """Average precision of one ranked list, with junk images removed from the ranking.

    Args:
        ranking: (num_ranked,) database indices, best first (may be truncated to the top-k).
        positives: database indices of the relevant images.
        junk: database indices ignored by the evaluation (neither relevant nor not).

    Returns:
        AP in [0, 1]; NaN when there are no positives (outside junk), i.e. a skipped query.

    Example:
        >>> average_precision([5, 2, 7], positives=[2], junk=[5])  # 2 moves to rank 0
        1.0
    """
    positives = set(int(p) for p in positives)
    junk = set(int(j) for j in junk)
    num_positives = len(positives - junk)
    ranks = positive_ranks(ranking, positives - junk, junk)
    return ap_from_ranks(ranks, num_positives)


def precision_at_k(
    positive_ranks: Sequence[int] | np.ndarray,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> np.ndarray:
    """Precision at k as defined by the revisited protocol's ``compute_map``.

    With 1-based positive ranks ``p``, ``k' = min(max(p), k)`` and ``P@k = |p <= k'| / k'``:
    when every positive is found before rank k, the precision is taken at the last one
    (so a query with 2 positives at ranks 1-2 has mP@10 = 1, not 0.2).

    Args:
        positive_ranks: (num_found,) 0-based ranks in the junk-free ranking.
        kappas: the k values.

    Returns:
        (len(kappas),) float64; zeros when no positive was found.
    """
    ranks = np.asarray(positive_ranks, dtype=np.int64) + 1
    out = np.zeros(len(kappas), dtype=np.float64)
    if ranks.size == 0:
        return out
    for i, k in enumerate(kappas):
        k_eff = min(int(ranks.max()), int(k))
        out[i] = np.count_nonzero(ranks <= k_eff) / k_eff
    return out


# ---------------------------------------------------------------------------------------
# Rankings and mAP over many queries
# ---------------------------------------------------------------------------------------


def _as_rows(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise InvalidInputError(
            f"{name} must be a (num, dim) matrix of row descriptors, got {array.shape}"
        )
    return array


def rank_database(
    query_descriptors: np.ndarray,
    database_descriptors: np.ndarray,
    top_k: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Ranks the database for each query by dot product (cosine for L2-normalised rows).

    Args:
        query_descriptors: (num_queries, dim).
        database_descriptors: (num_database, dim).
        top_k: keep only the best ``top_k`` (all when None).
        chunk: queries scored at a time, to bound memory.

    Returns:
        (num_queries, num_ranked) int64 database indices, best first.
    """
    queries = _as_rows(query_descriptors, "query_descriptors")
    database = _as_rows(database_descriptors, "database_descriptors")
    if queries.shape[1] != database.shape[1]:
        raise InvalidInputError(
            f"query_descriptors have dim {queries.shape[1]} but database_descriptors have "
            f"dim {database.shape[1]}"
        )
    n = database.shape[0]
    k = n if top_k is None else min(int(top_k), n)
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ database.T
        if k < n:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
            out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
        else:
            out[start : start + chunk] = np.argsort(-scores, axis=1, kind="stable")
    return out


def mean_average_precision(
    rankings: np.ndarray | Sequence[Sequence[int]],
    positives: Sequence[Iterable[int]],
    junk: Sequence[Iterable[int]] | None = None,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict:
    """mAP and mP@k over queries, skipping queries with no positives.

    Args:
        rankings: (num_queries, num_ranked) database indices, best first.
        positives: per query, the relevant database indices.
        junk: per query, the ignored database indices (none when None).
        kappas: k values of mP@k.

    Returns:
        ``{"mAP": float, "mP@1": float, ..., "ap": (num_queries,) array (NaN = skipped),
        "num_queries": evaluated queries, "num_skipped": queries without positives}``.
        Means are NaN when every query was skipped.
    """
    num_queries = len(positives)
    if len(rankings) != num_queries:
        raise InvalidInputError(f"{len(rankings)} rankings for {num_queries} queries' ground truth")
    if junk is None:
        junk = [()] * num_queries
    aps = np.full(num_queries, np.nan)
    precisions = np.full((num_queries, len(kappas)), np.nan)
    for i in range(num_queries):
        junk_set = set(int(j) for j in junk[i])
        pos_set = set(int(p) for p in positives[i]) - junk_set
        if not pos_set:
            continue
        ranks = positive_ranks(rankings[i], pos_set, junk_set)
        aps[i] = ap_from_ranks(ranks, len(pos_set))
        precisions[i] = precision_at_k(ranks, kappas)
    evaluated = ~np.isnan(aps)
    result = {
        "mAP": float(aps[evaluated].mean()) if evaluated.any() else float("nan"),
    }
    for j, k in enumerate(kappas):
        result[f"mP@{k}"] = (
            float(precisions[evaluated, j].mean()) if evaluated.any() else float("nan")
        )
    result["ap"] = aps
    result["num_queries"] = int(evaluated.sum())
    result["num_skipped"] = int(num_queries - evaluated.sum())
    return result


def revisited_groundtruth(
    easy: Iterable[int], hard: Iterable[int], junk: Iterable[int], protocol: str
) -> tuple[list[int], list[int]]:
    """Positives and ignored images of one revisited Oxford/Paris query under a protocol.

    Radenović et al., CVPR 2018: easy: positives = easy, ignore junk + hard; medium:
    positives = easy + hard, ignore junk; hard: positives = hard, ignore junk + easy.

    Returns:
        (positives, junk) lists of database indices.
    """
    easy, hard, junk = list(easy), list(hard), list(junk)
    if protocol == "easy":
        return easy, junk + hard
    if protocol == "medium":
        return easy + hard, junk
    if protocol == "hard":
        return hard, junk + easy
    raise InvalidInputError(f"protocol must be one of {REVISITED_PROTOCOLS}, got {protocol!r}")


def revisited_map(
    rankings: np.ndarray,
    groundtruth: Sequence[Mapping[str, Iterable[int]]],
    protocols: Sequence[str] = REVISITED_PROTOCOLS,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict[str, dict]:
    """The revisited Oxford/Paris evaluation: mAP and mP@k per protocol.

    Args:
        rankings: (num_queries, num_ranked) database indices, best first.
        groundtruth: per query a mapping with "easy", "hard" and "junk" index lists (the
            ``gnd`` entries of ``gnd_roxford5k.pkl``).
        protocols: any of "easy", "medium", "hard".
        kappas: k values of mP@k.

    Returns:
        ``{protocol: mean_average_precision(...) result}``.
    """
    out = {}
    for protocol in protocols:
        pairs = [
            revisited_groundtruth(g.get("easy", ()), g.get("hard", ()), g.get("junk", ()), protocol)
            for g in groundtruth
        ]
        out[protocol] = mean_average_precision(
            rankings, [p for p, _ in pairs], [j for _, j in pairs], kappas
        )
    return out


def label_map(
    descriptors: np.ndarray,
    labels: Sequence | np.ndarray,
    chunk: int = 512,
) -> float:
    """mAP where every image is a query against all the others; positives share its label.

    The query itself is removed from its ranking; queries whose label occurs only once have
    no positive and are skipped. Similarity is the dot product (cosine for L2-normalised
    rows), ties broken by index.

    Args:
        descriptors: (num_images, dim) float.
        labels: (num_images,) hashable labels (ints or strings).
        chunk: queries scored at a time, to bound memory to chunk * num_images.

    Returns:
        mAP in [0, 1]; NaN when no query has a positive.

    Example:
        >>> label_map(np.eye(3, dtype="float32")[[0, 0, 1]], [7, 7, 8])
        1.0
    """
    x = _as_rows(descriptors, "descriptors")
    labels = np.asarray(labels)
    n = x.shape[0]
    if labels.shape != (n,):
        raise InvalidInputError(
            f"labels must have shape ({n},) to match descriptors, got {labels.shape}"
        )
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes)
    aps = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = x[start:stop] @ x.T
        rows = np.arange(stop - start)
        scores[rows, start + rows] = -np.inf  # the query itself goes last, then is dropped
        order = np.argsort(-scores, axis=1, kind="stable")[:, : n - 1]
        relevant = codes[order] == codes[start:stop, None]
        num_pos = counts[codes[start:stop]] - 1
        aps.append(_ap_from_relevance(relevant, num_pos))
    aps = np.concatenate(aps) if aps else np.zeros(0)
    aps = aps[~np.isnan(aps)]
    return float(aps.mean()) if aps.size else float("nan")


def _ap_from_relevance(relevant: np.ndarray, num_positives: np.ndarray) -> np.ndarray:
    """Vectorised ``ap_from_ranks`` on (num_queries, num_ranked) boolean relevance rows."""
    relevant = relevant.astype(bool)
    found_after = np.cumsum(relevant, axis=1, dtype=np.float64)  # positives in [0, r]
    found_before = found_after - relevant  # positives in [0, r)
    ranks = np.arange(relevant.shape[1], dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(ranks > 0, found_before / np.maximum(ranks, 1), 1.0)
    p1 = found_after / (ranks + 1.0)
    total = np.sum(np.where(relevant, (p0 + p1) / 2.0, 0.0), axis=1)
    num_positives = np.asarray(num_positives, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(num_positives > 0, total / np.maximum(num_positives, 1), np.nan)


# ---------------------------------------------------------------------------------------
# Re-ranking options
# ---------------------------------------------------------------------------------------


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def alpha_query_expansion(
    query_descriptors: np.ndarray,
    database_descriptors: np.ndarray,
    k: int = 2,
    alpha: float = 3.0,
    rankings: np.ndarray | None = None,
) -> np.ndarray:
    """α-weighted average query expansion (αQE; Radenović, Tolias & Chum, TPAMI 2018).

    The new query is ``normalize(q + sum_{i<k} s_i^alpha * d_i)`` over the top-k database
    descriptors ``d_i`` with similarity ``s_i = max(q . d_i, 0)``. ``alpha = 0`` gives plain
    average query expansion (Chum et al., ICCV 2007).

    Args:
        query_descriptors: (num_queries, dim), L2-normalised rows.
        database_descriptors: (num_database, dim), L2-normalised rows.
        k: number of top results averaged in (0 returns the queries unchanged).
        alpha: similarity exponent.
        rankings: (num_queries, >= k) precomputed rankings (computed when None).

    Returns:
        (num_queries, dim) float32 expanded, L2-normalised queries.
    """
    q = _as_rows(query_descriptors, "query_descriptors")
    db = _as_rows(database_descriptors, "database_descriptors")
    if k < 0:
        raise InvalidInputError(f"k must be >= 0, got {k}")
    k = min(int(k), db.shape[0])
    if k == 0:
        return q.copy()
    if rankings is None:
        rankings = rank_database(q, db, top_k=k)
    top = db[np.asarray(rankings)[:, :k]]  # (Q, k, D)
    sims = np.maximum(np.einsum("qd,qkd->qk", q, top), 0.0) ** alpha
    expanded = q + np.einsum("qk,qkd->qd", sims, top)
    return _normalize_rows(expanded).astype(np.float32)


def database_augmentation(
    database_descriptors: np.ndarray,
    k: int = 2,
    alpha: float = 3.0,
    chunk: int = 1024,
) -> np.ndarray:
    """Database-side augmentation (DBA): αQE applied to every database descriptor.

    Each database row is replaced by the α-weighted average of itself and its ``k`` nearest
    other database rows (Arandjelović & Zisserman, CVPR 2012; the α weighting of Radenović et
    al., TPAMI 2018). The row itself is excluded from its own neighbours.

    Args:
        database_descriptors: (num_database, dim), L2-normalised rows.
        k: neighbours averaged in.
        alpha: similarity exponent.
        chunk: rows processed at a time.

    Returns:
        (num_database, dim) float32 augmented, L2-normalised descriptors.
    """
    db = _as_rows(database_descriptors, "database_descriptors")
    n = db.shape[0]
    k = min(int(k), max(n - 1, 0))
    if k <= 0:
        return db.copy()
    out = np.empty_like(db)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = db[start:stop] @ db.T
        rows = np.arange(stop - start)
        scores[rows, start + rows] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out[start:stop] = alpha_query_expansion(db[start:stop], db, k=k, alpha=alpha, rankings=part)
    return out
