"""Approximate nearest-neighbour search: recall@10 against queries per second, in one run.

Methods: ScaNN through ``serving.index.ScannIndex`` (its default: tuned at build time to
recall@10 >= 0.95 on held-out vectors, ``remap_tf.serving.index.tuning``; and the fixed settings
that were the default before tuning), exact NumPy (``serving.index``'s matmul + top-k),
faiss ``IndexFlatIP``, faiss HNSW, faiss IVF-PQ (plain and with exact re-ranking) and
hnswlib, on clustered L2-normalised vectors (dot product) of two distributions (cluster noise
0.5 and a noisier 1.0 per dimension), with 1 and 2 search threads. Also: build time and the
serialized index size per million vectors. ``--distribution shaped --fit FILE`` runs the same
methods on vectors shaped like real REMAP descriptors instead (`bench.shaped`: their
dimension, spectrum and scene groups), into a section of its own ("ann-shaped").

faiss-cpu and hnswlib are benchmark-only (``pip install -e ".[bench]"``, which ``make bench``
runs); a missing or skipped one is reported as such in the table, and the goal is then "not
measured" rather than met.

Usage:
    python -m bench.ann                       # 100k and 1M, writes docs/benchmarks.md "ann"
    python -m bench.ann --sizes 20000 --no-write
    python -m bench.ann --distribution shaped --fit FIT.npz --sizes 100000   # "ann-shaped"

The goal measured: ScaNN at its tuned setting (the default) has a higher QPS than every other
method's best operating point with recall@10 >= 0.95, at each size, distribution and thread
count.
"""

from __future__ import annotations

import os

# NumPy's BLAS must run single-threaded so that "threads" means the same for every method
# (the exact NumPy search is parallelised over query chunks instead). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# OpenMP threads that spin while waiting make faiss crawl on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import dataclasses
import functools
import itertools
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DIM = 512
K = 10
TARGET_RECALL = 0.95
# HNSW's ef and IVF's nprobe: these first, then doubled up to the widest while under the target
HNSW_EFS = (16, 32, 64, 128)
WIDEST_EF = 1024
WIDEST_NPROBE = 512


def clustered_unit_vectors(num, dim, num_clusters, seed, spread=0.5, centres_seed=None):
    """Rows around random centres (Gaussian noise of ``spread`` per dimension), L2-normalised.

    ``centres_seed`` fixes the centres independently of ``seed`` so queries can be drawn
    from the same clusters as the database but as fresh points.
    """
    centres = np.random.default_rng(centres_seed if centres_seed is not None else seed)
    centres = centres.standard_normal((num_clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((num, dim), np.float32)
    for start in range(0, num, 100_000):
        stop = min(start + 100_000, num)
        x = centres[rng.integers(0, num_clusters, stop - start)]
        x += spread * rng.standard_normal((stop - start, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out


def exact_search(database, queries, k, threads):
    """Exact top-k by dot product: NumPy matmul + argpartition, query chunks over threads."""
    from remap_tf.serving.index import top_k

    chunks = np.array_split(np.arange(len(queries)), max(1, len(queries) // 32))

    def run(rows):
        return top_k(queries[rows] @ database.T, k)[0]

    if threads == 1:
        parts = [run(rows) for rows in chunks]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(run, chunks))
    return np.concatenate(parts)


def recall_at_k(found, truth):
    found = np.asarray(found)[:, : truth.shape[1]]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def directory_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed(fn, min_seconds=1.0, min_runs=2):
    """(result, seconds of the fastest run), repeating for ``min_seconds`` and ``min_runs``.

    The fastest run is the one least disturbed by other work on shared cores.
    """
    runs, total, best, result = 0, 0.0, float("inf"), None
    while runs < min_runs or total < min_seconds:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        best, total, runs = min(best, elapsed), total + elapsed, runs + 1
    return result, best


# ---------------------------------------------------------------------------------------
# Methods: each yields rows {method, config, threads, recall, qps, build_s, bytes}
# ---------------------------------------------------------------------------------------


def bench_exact(database, queries, truth, threads_list, nq_flat):
    q = queries[:nq_flat]
    for threads in threads_list:
        found, seconds = timed(lambda t=threads: exact_search(database, q, K, t))
        yield dict(
            method="exact NumPy",
            config="matmul + top-k",
            threads=threads,
            recall=recall_at_k(found, truth[:nq_flat]),
            qps=len(q) / seconds,
            build_s=0.0,
            bytes=database.nbytes,
        )


def bench_scann(database, queries, truth, threads_list, scratch, tune_budget=None):
    """ScaNN's default (tuned to recall 0.95 at build time) and the old fixed defaults, searched
    on the same index (the fixed ones as search-time overrides); ``tune_budget`` overrides the
    default partitioning-tuning budget (`ScannConfig.tune_budget`)."""
    from remap_tf.serving.index import ScannIndex
    from remap_tf.serving.index.scann import trim_heap

    n, dim = database.shape
    index = ScannIndex(dim, **({} if tune_budget is None else {"tune_budget": tune_budget}))
    start = time.perf_counter()
    index.add([str(i) for i in range(n)], database)
    index.build()
    build_s = time.perf_counter() - start
    path = index.save(Path(scratch) / "scann")
    size = directory_bytes(path)
    shutil.rmtree(path)
    config = index.config
    described = config["mode"]
    if config["mode"] == "tree_ah":
        described += f", {config['num_leaves']} leaves"
    if config.get("pca_dims") not in (None, "off"):
        described += f", PCA {config['pca_dims']}"
    tuning = config.get("tuning") or {}
    tuned_note = ""
    if tuning:
        tuned_note = (
            f" (tuned in {tuning['seconds']:.0f} s: held-out recall {tuning['measured_recall']:.3f}"
            f" on {tuning['queries']} vectors)"
        )
    variants = [("tuned", {}, tuned_note)]
    if config["mode"] == "tree_ah":
        variants.append(
            ("old fixed default", {"leaves_to_search": max(1, config["num_leaves"] // 10),
                                   "reorder": 100}, "")
        )  # fmt: skip
    elif config["mode"] == "ah":
        variants.append(("old fixed default", {"reorder": 250}, ""))
    for name, overrides, note in variants:
        leaves = overrides.get("leaves_to_search", config.get("num_leaves_to_search"))
        reorder = overrides.get("reorder", config.get("reorder"))
        text = f"{name}: {described}"
        text += f", search {leaves}" if config["mode"] == "tree_ah" else ""
        text += f", reorder {reorder}" if reorder else ""
        text += note
        for threads in threads_list:
            (found, _), seconds = timed(
                lambda t=threads, o=overrides, i=index: i.search(queries, K, num_threads=t, **o)
            )
            found = np.vectorize(int, otypes=[np.int64])(found)
            yield dict(
                method="ScaNN",
                config=text,
                threads=threads,
                recall=recall_at_k(found, truth),
                qps=len(queries) / seconds,
                build_s=build_s,
                bytes=size,
                default=name == "tuned",
                candidates=tuning.get("candidates") if name == "tuned" else None,
            )
    del index
    trim_heap()  # what ScaNN freed into the C heap, before the next method builds


def bench_faiss(database, queries, truth, threads_list, nq_flat, hnsw_note=None):
    try:
        import faiss
    except ImportError:
        yield dict(
            method="faiss", missing="not run: faiss-cpu is not installed (pip install faiss-cpu)"
        )
        return
    # Flat inner product: exact.
    faiss.omp_set_num_threads(max(threads_list))
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(database.shape[1])
    flat.add(database)
    build_s = time.perf_counter() - start
    for threads in threads_list:
        faiss.omp_set_num_threads(threads)
        (_, found), seconds = timed(lambda f=flat: f.search(queries[:nq_flat], K))
        yield dict(
            method="faiss IndexFlatIP",
            config="exact",
            threads=threads,
            recall=recall_at_k(found, truth[:nq_flat]),
            qps=nq_flat / seconds,
            build_s=build_s,
            bytes=database.nbytes,
        )
    del flat

    # HNSW (graph), inner product.
    if hnsw_note:
        yield dict(method="faiss HNSW", missing=hnsw_note)
        hnsw_iter = ()
    else:
        hnsw_iter = _faiss_hnsw(faiss, database, queries, truth, threads_list)
    yield from hnsw_iter
    yield from _faiss_ivfpq(faiss, database, queries, truth, threads_list)


class _Widths:
    """Search widths to measure (HNSW's ef, IVF's nprobe): ``first``, then doubled while the
    last one measured stays under the goal's recall, up to ``limit``, so that each other
    method is measured up to the recall the goal compares at (at 1M shaped rows HNSW with
    M=16 reached only 0.86 at ef=128). Call ``record`` with each width's recall."""

    def __init__(self, first, limit):
        self.widths, self.limit, self.recall = list(first), limit, None

    def record(self, recall: float) -> None:
        self.recall = recall

    def __iter__(self):
        done = 0
        while done < len(self.widths):
            yield self.widths[done]
            done += 1
            last = self.widths[-1]
            missed = self.recall is not None and self.recall < TARGET_RECALL
            if done == len(self.widths) and missed and 2 * last <= self.limit:
                self.widths.append(2 * last)


def _faiss_bytes(faiss, index) -> int:
    """The serialized size of a faiss index, written to a file: ``serialize_index`` would
    copy it whole into memory (at 1M x 1536 beside the collection and the graph, that copy
    got the run killed out of memory at ~24 GB resident)."""
    with tempfile.TemporaryDirectory(prefix="remap-ann-faiss-") as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def _faiss_hnsw(faiss, database, queries, truth, threads_list):
    faiss.omp_set_num_threads(max(threads_list))
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(database.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(database)
    build_s = time.perf_counter() - start
    size = _faiss_bytes(faiss, hnsw)
    widths = _Widths(HNSW_EFS, WIDEST_EF)
    for ef in widths:
        hnsw.hnsw.efSearch = ef
        for threads in threads_list:
            faiss.omp_set_num_threads(threads)
            (_, found), seconds = timed(lambda h=hnsw: h.search(queries, K))
            widths.record(recall_at_k(found, truth))
            yield dict(
                method="faiss HNSW",
                config=f"M=16, efConstruction=80, efSearch={ef}",
                threads=threads,
                recall=widths.recall,
                qps=len(queries) / seconds,
                build_s=build_s,
                bytes=size,
            )
    del hnsw


def _faiss_ivfpq(faiss, database, queries, truth, threads_list):
    """IVF-PQ (nlist ~ sqrt(n), 64 sub-quantisers of 8 bits), plain and exactly re-ranked.

    One build serves both: an IndexRefineFlat around the IVF-PQ index keeps the raw vectors
    to re-score 10x candidates; "plain" searches the inner IVF-PQ index alone.
    """
    n, dim = database.shape
    faiss.omp_set_num_threads(max(threads_list))
    nlist = int(n**0.5)
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    ivfpq = faiss.IndexIVFPQ(quantizer, dim, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT)
    sample = database[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
    ivfpq.train(sample)
    refine = faiss.IndexRefineFlat(ivfpq)
    refine.add(database)
    build_s = time.perf_counter() - start
    plain_size = _faiss_bytes(faiss, ivfpq)
    refine_size = _faiss_bytes(faiss, refine)
    widths = _Widths((8, 32), WIDEST_NPROBE)
    settings = itertools.chain(
        [("faiss IVF-PQ", 16, None)],  # PQ codes alone cap recall far below the target
        (("faiss IVF-PQ + refine", nprobe, 10) for nprobe in widths),  # lazily: widened
    )
    for method, nprobe, k_factor in settings:
        ivfpq.nprobe = nprobe
        if k_factor:
            params = faiss.IndexRefineSearchParameters(
                k_factor=k_factor, base_index_params=faiss.SearchParametersIVF(nprobe=nprobe)
            )
            search = lambda p=params, r=refine: r.search(queries, K, params=p)  # noqa: E731
            config = f"nlist={nlist}, PQ64x8, nprobe={nprobe}, {k_factor}x re-ranked"
        else:
            search = lambda i=ivfpq: i.search(queries, K)  # noqa: E731
            config = f"nlist={nlist}, PQ64x8, nprobe={nprobe}"
        for threads in threads_list:
            faiss.omp_set_num_threads(threads)
            (_, found), seconds = timed(search)
            recall = recall_at_k(found, truth)
            if k_factor:
                widths.record(recall)
            yield dict(
                method=method,
                config=config,
                threads=threads,
                recall=recall,
                qps=len(queries) / seconds,
                build_s=build_s,
                bytes=refine_size if k_factor else plain_size,
            )
    del refine


def bench_hnswlib(database, queries, truth, threads_list, scratch, hnsw_note=None):
    try:
        import hnswlib
    except ImportError:
        yield dict(
            method="hnswlib", missing="not run: hnswlib is not installed (pip install hnswlib)"
        )
        return
    if hnsw_note:
        yield dict(method="hnswlib", missing=hnsw_note)
        return
    n, dim = database.shape
    index = hnswlib.Index(space="ip", dim=dim)
    start = time.perf_counter()
    index.init_index(max_elements=n, ef_construction=80, M=16)
    index.set_num_threads(max(threads_list))
    index.add_items(database, np.arange(n))
    build_s = time.perf_counter() - start
    path = Path(scratch) / "hnswlib.bin"
    index.save_index(str(path))
    size = path.stat().st_size
    path.unlink()
    widths = _Widths(HNSW_EFS, WIDEST_EF)
    for ef in widths:
        index.set_ef(ef)
        for threads in threads_list:
            index.set_num_threads(threads)
            (found, _), seconds = timed(
                lambda t=threads, i=index: i.knn_query(queries, K, num_threads=t)
            )
            widths.record(recall_at_k(found, truth))
            yield dict(
                method="hnswlib",
                config=f"M=16, ef_construction=80, ef={ef}",
                threads=threads,
                recall=widths.recall,
                qps=len(queries) / seconds,
                build_s=build_s,
                bytes=size,
            )
    del index


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _best_at_target(rows, threads):
    """Per other method, the highest-QPS row with recall >= TARGET_RECALL, and ScaNN's default."""
    best = {}
    for row in rows:
        if "missing" in row or row["threads"] != threads or row["recall"] < TARGET_RECALL:
            continue
        if row["method"] == "ScaNN" and not row.get("default"):
            continue  # ScaNN's other settings are not competitors of its default
        key = "ScaNN default" if row.get("default") else row["method"]
        if key not in best or row["qps"] > best[key]["qps"]:
            best[key] = row
    return best


def verdict(n, rows, threads, label="") -> str:
    """One line: is ScaNN's tuned default the fastest at recall >= TARGET_RECALL?

    "not measured" when a competitor could not run (not installed, or skipped at this size):
    beating the methods that did run is not the goal.
    """
    where = f"{n:,} vectors{label}, {threads} thread(s)"
    best = _best_at_target(rows, threads)
    default = best.pop("ScaNN default", None)
    others = sorted(best.items(), key=lambda kv: -kv[1]["qps"])
    missing = sorted({r["method"] for r in rows if "missing" in r})
    if default is None:
        scann_rows = [r for r in rows if r.get("default") and r["threads"] == threads]
        got = f"{scann_rows[0]['recall']:.3f}" if scann_rows else "n/a"
        return (
            f"{where}: goal **missed**: ScaNN's tuned default has recall@10 {got} < "
            f"{TARGET_RECALL} on these queries."
        )
    text = f"{where}: ScaNN tuned {default['qps']:,.0f} q/s at recall {default['recall']:.3f}"
    if others:
        name, top = others[0]
        text += (
            f"; best other at recall >= {TARGET_RECALL}: {name} ({top['config']}) "
            f"{top['qps']:,.0f} q/s at {top['recall']:.3f} ({default['qps'] / top['qps']:.2f}x)"
        )
        beaten = default["qps"] > top["qps"]
    else:
        text += "; no other method that ran reached the target"
        beaten = True
    if not beaten:
        return text + " -> goal **missed**."
    if missing:
        return text + f" -> goal **not measured**: {', '.join(missing)} did not run."
    return text + " -> goal **met**."


def summarise(n, rows, threads_list, label="", dim=DIM) -> tuple[str, list[str]]:
    lines = [
        f"### {n:,} vectors x {dim} dims{label}",
        "",
        "| method | configuration | threads | recall@10 | queries/s | build s | "
        "index MB per 1M vectors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "missing" in row:
            lines.append(f"| {row['method']} | **{row['missing']}** | | | | | |")
            continue
        per_million = row["bytes"] / n * 1e6 / 2**20
        name = "ScaNN (default)" if row.get("default") else row["method"]
        lines.append(
            f"| {name} | {row['config']} | {row['threads']} | {row['recall']:.3f} | "
            f"{row['qps']:,.0f} | {row['build_s']:.1f} | {per_million:,.0f} |"
        )
    lines += candidates_table(rows)
    return "\n".join(lines), [verdict(n, rows, t, label) for t in threads_list]


def candidates_table(rows) -> list[str]:
    """The partitionings the tuned ScaNN build tried (its ``tuning["candidates"]``), each with
    the search knobs tuned on it and what they measured, or why it was skipped."""
    candidates = next((r["candidates"] for r in rows if r.get("candidates")), None)
    if not candidates:
        return []
    lines = [
        "",
        "ScaNN's partitioning candidates (the tuning's own held-out measurements, 1 query "
        "batch on all threads; the chosen one is the fastest that reached the target):",
        "",
        "| leaves | PCA | dims/block | threshold | search | reorder | held-out recall | "
        "queries/s | build s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in candidates:
        shape = (
            f"| {c.get('num_leaves', '-')} | {c.get('pca_dims', '-')} | "
            f"{c.get('dimensions_per_block', '-')} | "
            f"{c.get('anisotropic_quantization_threshold', '-')} |"
        )
        if "skipped" in c:
            lines.append(f"{shape} | | | | **skipped: {c['skipped']}** |")
            continue
        lines.append(
            f"{shape} {c['num_leaves_to_search']} | {c['reorder']} | {c['recall']:.3f}"
            f"{'' if c['reached'] else ' (missed)'} | {c['qps']:,.0f} | {c['build_seconds']:.1f} |"
        )
    return lines


@dataclasses.dataclass
class Distribution:
    """The data of one run: cases of ``(label, make)``, ``make(n, num_queries) -> (database
    (n, dim), queries (num_queries, dim))``, the report's words for it and its section of
    docs/benchmarks.md (the clustered and the shaped results sit side by side)."""

    cases: list
    data_text: str
    section: str = "ann"
    title: str = "Approximate nearest-neighbour search: ScaNN against exact, faiss and hnswlib"


def clustered_distribution(spreads=(0.5,)) -> Distribution:
    """bench.ann's clustered unit vectors, one case per cluster noise."""

    def make(n, num_queries, spread):
        clusters = max(100, n // 100)
        database = clustered_unit_vectors(n, DIM, clusters, 1, spread, centres_seed=0)
        queries = clustered_unit_vectors(num_queries, DIM, clusters, 2, spread, centres_seed=0)
        return database, queries

    noise = " and ".join(str(s) for s in spreads)
    return Distribution(
        cases=[(f", noise {s}", functools.partial(make, spread=s)) for s in spreads],
        data_text=f"clustered unit vectors ({DIM}-d; n/100 Gaussian clusters, noise {noise} "
        "per dimension, then L2-normalised), {queries} fresh queries from the same clusters",
    )


def shaped_distribution(fit_path) -> Distribution:
    """Vectors shaped like real REMAP descriptors (`bench.shaped`); the queries are rows held
    out of the generated collection (every (n + q) / q-th), so that, as with real queries,
    most have views of their own scene in the database."""
    from bench.shaped import generate, load_fit

    fit = load_fit(fit_path)

    def make(n, num_queries):
        rows = generate(n + num_queries, fit, seed=1)
        held = np.zeros(len(rows), bool)
        held[np.linspace(0, len(rows) - 1, num_queries).astype(np.int64)] = True
        return rows[~held], rows[held]

    return Distribution(
        cases=[(", shaped like REMAP descriptors", make)],
        data_text=f"unit vectors shaped like real REMAP descriptors ({fit['basis'].shape[0]}-d, "
        f"`bench.shaped`, fit `{Path(fit_path).name}`: {fit['source']}; see 'Data shaped like "
        "real descriptors' below for the fit and its check), {queries} queries held out of the "
        "generated collection",
        section="ann-shaped",
        title="Approximate nearest-neighbour search on data shaped like REMAP descriptors",
    )


def run(
    sizes, threads_list, num_queries, nq_flat, write: bool, hnsw_max: int, data=None,
    tune_budget=None,
):  # fmt: skip
    """Measures every (case, size) of ``data`` (default: clustered, noise 0.5) in turn; the
    section is rewritten after each, so a run stopped early keeps what it measured (and says
    how far it got)."""
    data = data or clustered_distribution()
    started = time.perf_counter()
    load_before = os.getloadavg()
    sections, all_verdicts, built_hnsw = [], [], []
    planned = [(case, n) for case in data.cases for n in sizes]
    md = ""
    for done, ((label, make), n) in enumerate(planned, 1):
        rows, dim = _bench_size(
            n, threads_list, num_queries, nq_flat, hnsw_max, make, built_hnsw, tune_budget
        )
        for row in rows:
            is_graph = row["method"] in ("faiss HNSW", "hnswlib") and "missing" not in row
            built = is_graph and f"{row['method']} at {n:,}{label}: {row['build_s']:.0f} s"
            if built and built not in built_hnsw:
                built_hnsw.append(built)
        table, verdicts = summarise(n, rows, threads_list, label, dim)
        sections.append(table)
        all_verdicts.extend(verdicts)
        loads = (load_before, os.getloadavg())
        md = _markdown(
            time.perf_counter() - started, num_queries, nq_flat, data, all_verdicts, sections,
            loads, tune_budget,
        )  # fmt: skip
        if done < len(planned):
            rest = ", ".join(f"{m:,}{case[0]}" for case, m in planned[done:])
            md += f"\n\n**Partial run: not measured yet: {rest}.**"
        if write:
            from bench.report import write_section

            write_section(data.section, md)
    print(md)
    return md


def _bench_size(
    n, threads_list, num_queries, nq_flat, hnsw_max, make, built_hnsw, tune_budget=None
):  # fmt: skip
    """``(every method's rows on n vectors of make(n, num_queries), their dim)``."""
    t0 = time.perf_counter()
    database, queries = make(n, num_queries)
    truth = exact_search(database, queries, K, max(threads_list))
    print(f"[{n}] data + ground truth in {time.perf_counter() - t0:.1f}s", flush=True)
    hnsw_note = None
    if n > hnsw_max:
        hnsw_note = (
            f"not run: HNSW graphs are built only up to --hnsw-max {hnsw_max:,} vectors, "
            "to bound the run on 2 shared cores; their build time grows slightly faster "
            "than n"
        )
        if built_hnsw:
            hnsw_note += f" (this run's builds: {', '.join(built_hnsw)})"
    rows = []
    scratch = tempfile.mkdtemp(prefix="remap-ann-")
    try:
        for generator in (
            bench_scann(database, queries, truth, threads_list, scratch, tune_budget),
            bench_exact(database, queries, truth, threads_list, nq_flat),
            bench_faiss(database, queries, truth, threads_list, nq_flat, hnsw_note),
            bench_hnswlib(database, queries, truth, threads_list, scratch, hnsw_note),
        ):
            for row in generator:
                rows.append(row)
                if "missing" in row:
                    print(f"[{n}] {row['method']}: {row['missing']}", flush=True)
                else:
                    print(
                        f"[{n}] {row['method']:<22} {row['config'][:60]:<60} "
                        f"t={row['threads']} recall={row['recall']:.3f} "
                        f"qps={row['qps']:,.0f} build={row['build_s']:.1f}s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows, database.shape[1]


def _markdown(
    total, num_queries, nq_flat, data, all_verdicts, sections, loads, tune_budget=None
) -> str:  # fmt: skip
    from bench.report import machine_line

    command = "python -m bench.ann " + " ".join(sys.argv[1:])
    return "\n".join(
        [
            f"## {data.title}",
            "",
            f"Command: `{command.strip()}` · machine: {machine_line()} · "
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · "
            f"total {total / 60:.1f} min · load average (1/5/15 min) "
            f"{'/'.join(f'{x:.1f}' for x in loads[0])} at the start, "
            f"{'/'.join(f'{x:.1f}' for x in loads[1])} at the end"
            + (
                " (the cores were shared with other work, so absolute queries/s are noisy)"
                if max(loads[0][0], loads[1][0]) > 2.5
                else ""
            )
            + ". Each figure is the fastest of at least two timed passes over all queries "
            "(>= 1 s in total), methods measured in turn.",
            "",
            f"Data: {data.data_text.replace('{queries}', str(num_queries))} "
            f"({nq_flat} for the two exhaustive methods), dot product, k = {K}; recall@10 "
            "against exact NumPy search. Builds use all threads; ScaNN's build time includes "
            "its recall tuning. 'index MB per 1M vectors' is the serialized index size scaled "
            "to a million vectors (for exact search, the float32 matrix itself).",
            "",
            "ScaNN's default is tuned at build time (`remap_tf.serving.index.tuning`): "
            "1,000 of the collection's own vectors are held out of training, inserted after it, "
            "and searched as queries; the partitioning (a spherical tree of ~sqrt(n) leaves, "
            "without and, from 256 dims, with ScaNN's PCA projection; then leaf counts x 0.5, "
            "2, 4; then AH dimensions per block and anisotropic threshold) is built candidate "
            "by candidate "
            "within a build-time budget "
            f"({tune_budget if tune_budget is not None else 'default 1'} x the first build), "
            "and the fastest (partitioning, leaves searched, reorder) whose recall@10 against "
            "brute force reaches 0.95 (lower 2-SE bound) is kept; every candidate is listed "
            "under its table. 'old fixed default' is the same index searched with the settings "
            "that were the default before (a tenth of the leaves, reorder 100).",
            "",
            "**Goal: ScaNN at its tuned setting beats every other method's queries/s at "
            f'recall@10 >= {TARGET_RECALL}** ("not measured" when a competitor did not run).',
            "",
        ]
        + [f"- {v}" for v in all_verdicts]
        + [""]
        + sections
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument(
        "--hnsw-max",
        type=int,
        default=1_000_000,
        help="build the HNSW indexes (faiss, hnswlib) only up to this many vectors",
    )
    parser.add_argument("--flat-queries", type=int, default=200)
    parser.add_argument(
        "--spreads",
        type=float,
        nargs="+",
        default=[0.5, 1.0],
        help="cluster noise per dimension, one run per value (0.5 clustered, 1.0 noisier)",
    )
    parser.add_argument(
        "--distribution",
        choices=("clustered", "shaped"),
        default="clustered",
        help="clustered (--spreads; docs/benchmarks.md section 'ann') or shaped like real "
        "REMAP descriptors (--fit; section 'ann-shaped')",
    )
    parser.add_argument(
        "--fit", default=None, help="the bench.shaped fit (.npz) of --distribution shaped"
    )
    parser.add_argument(
        "--tune-budget",
        type=float,
        default=None,
        help="ScaNN's partitioning-tuning build budget, x the first build (default: ScannConfig's)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    from remap_tf.errors import InvalidInputError, RemapError

    try:
        if args.distribution == "shaped":
            from bench.shaped import DEFAULT_FIT

            data = shaped_distribution(args.fit or DEFAULT_FIT)
        elif args.fit is not None:
            raise InvalidInputError("--fit FILE goes with --distribution shaped only.")
        else:
            data = clustered_distribution(args.spreads)
        if args.tune_budget is not None:
            from remap_tf.serving.index.tuning import check_budget

            check_budget(args.tune_budget, "--tune-budget")
    except RemapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run(
        args.sizes,
        args.threads,
        args.queries,
        args.flat_queries,
        write=not args.no_write,
        hnsw_max=args.hnsw_max,
        data=data,
        tune_budget=args.tune_budget,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
