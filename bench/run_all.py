"""Runs every benchmark in turn, each in its own process, and rewrites docs/benchmarks.md.

    python -m bench.run_all [--only model training serving ann init_memory search quality]

Each benchmark writes its own section; one that fails is reported and the others still run.
The ANN benchmark needs the ``bench`` extra (``pip install -e ".[bench]"``: faiss-cpu,
hnswlib) for its competitors and says so in its section when they are missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = {
    "model": "bench.model_cost",
    "training": "bench.train_throughput",
    "serving": "bench.serving_latency",
    "ann": "bench.ann",
    "init_memory": "bench.init_memory",
    "search": "bench.search_load",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or list(BENCHMARKS):
        start = time.monotonic()
        print(f"== {name}: python -m {BENCHMARKS[name]}", flush=True)
        code = subprocess.call([sys.executable, "-m", BENCHMARKS[name]])
        print(f"== {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
