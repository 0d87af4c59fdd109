"""What N shards searched on one machine can reach against one index of the same rows.

    python -m bench.shard_cost [--size 100000] [--shards 4] [--spread 0.5]

On the same clustered rows (bench.ann's distribution: n/100 clusters, noise ``--spread``,
fresh queries from the same clusters) it builds one tuned ``ScannIndex`` of all n rows and
a ``ShardedIndex`` of N tuned ScaNN shards (as ``remap index build --shards N`` makes them),
then measures on 1 search thread:

- one index and the N shards at their tuned settings (recall@10 against exact search);
- the N shards with every shard's search lowered towards its share of the top-k (1 leaf
  searched where there is a tree, fewer candidates re-scored): the merged recall and
  queries/s, i.e. the lever "tune each shard to its share of the top-k" measured directly;
- one shard alone at the cheapest searches a top-k can have (1 leaf, re-scoring only k;
  and k = 1 with no re-scoring). N shards searched one after the other cost N times one
  shard's search, so ``shard q/s / N / one index q/s`` bounds what any per-shard setting
  can reach on one thread.

The shard is searched through ``ScannIndex.search`` (ids included), as the merged search does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

K = 10


def _qps(search, queries) -> float:
    from bench.ann import timed

    _, seconds = timed(lambda: search(queries), min_seconds=2.0, min_runs=3)
    return len(queries) / seconds


def measure(size: int, shards: int, spread: float, num_queries: int) -> list[dict]:
    from bench.ann import clustered_unit_vectors, exact_search, recall_at_k
    from remap_tf.serving.index import make_index
    from remap_tf.serving.index.sharded import ShardedIndex, shard_of

    clusters = max(100, size // 100)
    rows = clustered_unit_vectors(size, 512, clusters, 1, spread, centres_seed=0)
    queries = clustered_unit_vectors(num_queries, 512, clusters, 2, spread, centres_seed=0)
    ids = np.array([f"v{i:09d}" for i in range(size)], dtype=object)
    truth = ids[exact_search(rows, queries, K, 2)]

    one = make_index("scann", 512)
    one.add(list(ids), rows)
    one.build()
    split = ShardedIndex(512, shards, make_shard=lambda: make_index("scann", 512))
    split.add(list(ids), rows)
    split.build()

    def settings(config):
        if config["mode"] != "tree_ah":
            return f"{config['mode']}, reorder {config['reorder']}"
        leaves = f"{config['num_leaves']} ({config['num_leaves_to_search']})"
        return f"{leaves}, reorder {config['reorder']}"

    out = []

    def row(what, config_text, recall, qps, bound=False):
        out.append(dict(what=what, config=config_text, recall=recall, qps=qps, bound=bound))
        print(f"{what:<60} {config_text:<40} recall={recall:.3f} qps={qps:,.0f}", flush=True)

    def search_one(q):
        return one.search(q, K, num_threads=1)

    row("one index, tuned", settings(one.config), recall_at_k(search_one(queries)[0], truth),
        _qps(search_one, queries))  # fmt: skip
    tuned = "; ".join(settings(split.shard(s).config) for s in range(shards))
    for what, overrides in [
        ("tuned (each shard to recall 0.95 of its own top-10)", {}),
        *[
            ("each lowered towards its share of the top-k", dict(leaves_to_search=1, reorder=r))
            for r in (25, 15, 10)
        ],
    ]:

        def search_split(q, o=overrides):
            return split.search(q, K, num_threads=1, **o)

        config_text = f"1 leaf searched, reorder {overrides['reorder']}" if overrides else tuned
        row(f"{shards} shards, {what}", config_text, recall_at_k(search_split(queries)[0], truth),
            _qps(search_split, queries))  # fmt: skip

    # One shard alone, against exact search within the shard.
    number = 0
    mine = shard_of(list(ids), shards) == number
    shard = split.shard(number)
    own_truth = ids[mine][exact_search(rows[mine], queries, K, 2)]
    for text, k, overrides in [
        ("tuned", K, {}),
        ("cheapest top-10", K, dict(leaves_to_search=1, reorder=K)),
        ("cheapest top-1", 1, dict(leaves_to_search=1, reorder=1)),
    ]:

        def search_shard(q, k=k, o=overrides):
            return shard.search(q, k, num_threads=1, **o)

        recall = recall_at_k(search_shard(queries)[0], own_truth) if k == K else float("nan")
        config_text = settings(shard.config)
        if overrides:
            config_text = f"1 leaf searched, reorder {overrides['reorder']}, k = {k}"
        row(f"one shard of {int(mine.sum()):,} rows, {text}", config_text, recall,
            _qps(search_shard, queries), bound=True)  # fmt: skip
    return out


def markdown(rows, size, shards, spread, num_queries, started, loads) -> str:
    one = rows[0]["qps"]
    lines = [
        f"`python -m bench.shard_cost {' '.join(sys.argv[1:])}`: {size:,} x 512 clustered "
        f"(noise {spread}), {shards} shards, {num_queries} fresh queries, k = {K}, 1 search "
        f"thread, {started}, load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the "
        "end",
        "",
        f"| search | leaves (searched), re-scored | recall@10 | queries/s | x one index "
        f"({shards} shards) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["qps"] / one
        text = f"{ratio:.2f}x"
        if r["bound"]:
            text = f"bound {ratio / shards:.2f}x (q/s / {shards})"
        recall = "" if np.isnan(r["recall"]) else f"{r['recall']:.3f}"
        lines.append(f"| {r['what']} | {r['config']} | {recall} | {r['qps']:,.0f} | {text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--spread", type=float, default=0.5, help="cluster noise")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    rows = measure(args.size, args.shards, args.spread, args.queries)
    text = markdown(
        rows, args.size, args.shards, args.spread, args.queries, started,
        (load, os.getloadavg()[0]),
    )  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
