"""ScaNN's partitioning choices side by side: generic or spherical tree, with or without PCA.

The evidence behind `ScannConfig`'s defaults (spherical trees) and the tuner's PCA candidate:
each variant is built once by ScaNN's own builder on the same rows (all of them, ~sqrt(n)
leaves, AH 2 dims/block threshold 0.2), then searched over a grid of (leaves searched,
reorder) on 1 thread; the row is the fastest setting whose recall@10 against exact search
reaches 0.95 on the held-out queries. Usage:

    python -m bench.scann_partitioning --distribution clustered --size 200000 --spread 1.0
    python -m bench.scann_partitioning --distribution shaped --size 100000
    python -m bench.scann_partitioning --size 1000000 --samples 100000 250000 400000

``--samples``: the spherical tree alone, trained on each number of sampled rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

TARGET = 0.95
LEAVES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 200, 256, 320, 400, 640, 1000)
REORDERS = (25, 40, 100, 250)
VARIANTS = {
    "generic tree (ScaNN's default)": {},
    "spherical tree": {"spherical": True},
    "generic tree + PCA (auto)": {"pca": True},
    "spherical tree + PCA (auto)": {"spherical": True, "pca": True},
}


def _data(args):
    from bench.ann import clustered_distribution, shaped_distribution

    if args.distribution == "shaped":
        from bench.shaped import DEFAULT_FIT

        data = shaped_distribution(args.fit or DEFAULT_FIT)
    else:
        data = clustered_distribution([args.spread])
    label, make = data.cases[0]
    return label, make(args.size, args.queries)


def best_setting(searcher, queries, truth, leaves):
    """The fastest (leaves searched, reorder) reaching `TARGET`: for each leaf count the
    smallest reorder that reaches it, timed over 3 passes."""
    from bench.ann import recall_at_k

    best = None
    for searched in [v for v in LEAVES if v <= leaves]:
        for reorder in REORDERS:
            found, _ = searcher.search_batched(queries, 10, reorder, searched)
            recall = recall_at_k(found, truth)
            if recall < TARGET:
                continue
            start = time.perf_counter()
            for _ in range(3):
                searcher.search_batched(queries, 10, reorder, searched)
            qps = 3 * len(queries) / (time.perf_counter() - start)
            if best is None or qps > best["qps"]:
                best = dict(qps=qps, recall=recall, leaves=searched, reorder=reorder)
            break
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distribution", choices=("clustered", "shaped"), default="clustered")
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--spread", type=float, default=1.0, help="clustered: noise")
    parser.add_argument("--fit", default=None, help="shaped: the bench.shaped fit")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument(
        "--samples", type=int, nargs="*", help="spherical tree trained on these sample sizes"
    )
    args = parser.parse_args(argv)
    from scann.scann_ops.py import scann_ops_pybind

    from bench.ann import exact_search

    label, (database, queries) = _data(args)
    truth = exact_search(database, queries, 10, 2)
    leaves = int(round(np.sqrt(len(database))))
    lines = [
        f"`python -m bench.scann_partitioning {' '.join(sys.argv[1:])}`: {len(database):,} x "
        f"{database.shape[1]}{label}, {leaves} leaves, {len(queries)} queries, 1 search thread, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{os.getloadavg()[0]:.1f} at the start",
        "",
        f"| variant | build s | leaves searched | reorder | recall@10 | queries/s at recall "
        f">= {TARGET} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    variants = VARIANTS
    if args.samples:
        variants = {
            f"spherical tree, {n:,} sampled rows": {"spherical": True, "sample": n}
            for n in args.samples
        }
    for name, variant in variants.items():
        start = time.perf_counter()
        builder = scann_ops_pybind.builder(database, 10, "dot_product")
        if variant.get("pca"):
            builder = builder.pca()
        searcher = (
            builder.tree(
                num_leaves=leaves,
                num_leaves_to_search=max(1, leaves // 10),
                training_sample_size=variant.get("sample", min(len(database), 100_000)),
                spherical=variant.get("spherical", False),
            )
            .score_ah(2, anisotropic_quantization_threshold=0.2)
            .reorder(100)
            .build()
        )
        searcher.set_num_threads(1)
        built = time.perf_counter() - start
        best = best_setting(searcher, queries, truth, leaves)
        if best is None:
            lines.append(f"| {name} | {built:.0f} | not reached | | | |")
        else:
            lines.append(
                f"| {name} | {built:.0f} | {best['leaves']} | {best['reorder']} | "
                f"{best['recall']:.3f} | {best['qps']:,.0f} |"
            )
        print(lines[-1], flush=True)
        del searcher
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
