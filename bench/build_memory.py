"""Peak memory of a ScaNN index build, per vector and against the raw float32 vectors.

    python -m bench.build_memory [--num 200000] [--dim 256] [--source memory|embeddings]

Each measurement runs in a fresh child process. The child imports ScaNN and the project,
makes the vectors (clustered unit vectors, bench.scale's distribution), then resets its peak
resident set (VmHWM, through ``/proc/self/clear_refs``) and builds:

- ``memory``: ``ScannIndex.add`` of one in-memory ``(num, dim)`` array, then ``build()``; the
  array itself is in the baseline (the caller holds it either way);
- ``embeddings``: the vectors are first written in the ``remap embed`` format (10,000 rows a
  shard), then indexed the way ``remap index build --from-embeddings`` does it
  (``build_index_from_embeddings``: the shards' readers handed to ``ScannIndex.add_lazily``,
  read one at a time by the build), built, then saved; the peak is read after the build and
  again after the save, so the two are told apart; nothing of the vectors is in the baseline.

The figure is the growth of the peak resident set over the baseline, in bytes per vector and
as a ratio to the raw float32 vectors (``num * dim * 4``); `ScannIndex.build` and
docs/scale.md state the bound measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULT = "RESULT "


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def clustered(num: int, dim: int, seed: int = 1, chunk: int = 10_000):
    """Yields ``(start, rows)``: L2-normalised rows around num / 100 centres, a chunk at a time
    (so that making them costs one chunk beside the rows kept)."""
    import numpy as np

    clusters = max(100, num // 100)
    centres = np.random.default_rng(0).standard_normal((clusters, dim), np.float32)
    for number, start in enumerate(range(0, num, chunk)):
        rng = np.random.default_rng([seed, number])
        x = centres[rng.integers(0, clusters, min(chunk, num - start))]
        x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield start, x


def measure(num: int, dim: int, source: str, config: dict) -> dict:
    """Builds in this process; returns the peak growth over the baseline (see the module)."""
    import numpy as np
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401  (in the baseline)

    from remap_tf.serving import embeddings
    from remap_tf.serving.index import ScannIndex
    from remap_tf.serving.index.rows import LazyRows

    with tempfile.TemporaryDirectory() as scratch:
        if source == "embeddings":
            folder = Path(scratch, "vectors")
            shards = 0
            for start, rows in clustered(num, dim):
                ids = [f"v{start + i:09d}" for i in range(len(rows))]
                embeddings.write_shard(folder, shards, ids, rows)
                shards += 1
            run = {"num_shards": shards, "model": None, "source": None}
            embeddings.write_json(embeddings.join(folder, embeddings.RUN_FILE), run)
            embeddings.finalize(folder, run)
        else:
            vectors = np.empty((num, dim), np.float32)
            for start, rows in clustered(num, dim):
                vectors[start : start + len(rows)] = rows
            ids = [f"v{i:09d}" for i in range(num)]
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status("VmRSS:")
        started = time.perf_counter()
        built = None
        if source == "embeddings":
            ids, readers, _ = embeddings.shard_readers(folder)
            index = ScannIndex(dim, **config)
            index.add_lazily(ids, [LazyRows(count, read, name) for name, count, read in readers])
            index.build()
            built = _status("VmHWM:") - base
            index.save(Path(scratch, "index"))
            chosen = index.config
        else:
            index = ScannIndex(dim, **config)
            index.add(ids, vectors)
            index.build()
            chosen = index.config
        seconds = time.perf_counter() - started
        growth = _status("VmHWM:") - base
    raw = num * dim * 4
    return {
        "num": num,
        "dim": dim,
        "source": source,
        "mode": chosen["mode"],
        "num_leaves": chosen.get("num_leaves"),
        "seconds": round(seconds, 1),
        "baseline_mib": round(base / 2**20, 1),
        "growth_mib": round(growth / 2**20, 1),
        "bytes_per_vector": round(growth / num),
        "ratio_to_float32": round(growth / raw, 3),
        # embeddings: the peak after the build, before the save (which sets "growth")
        "built_ratio_to_float32": None if built is None else round(built / raw, 3),
        "recall": (chosen.get("tuning") or {}).get("measured_recall"),
        "qps": (chosen.get("tuning") or {}).get("qps"),
    }


def run_child(num: int, dim: int, source: str, config: dict) -> dict:
    """`measure` in a fresh process (its peak is its own)."""
    command = [sys.executable, "-m", "bench.build_memory", "--child", "--num", str(num)]
    command += ["--dim", str(dim), "--source", source, "--config", json.dumps(config)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    line = [x for x in output.splitlines() if x.startswith(RESULT)][-1]
    return json.loads(line[len(RESULT) :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--source", choices=("memory", "embeddings"), default="memory")
    parser.add_argument("--config", default="{}", help="ScannConfig fields as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    if args.child:
        print(RESULT + json.dumps(measure(args.num, args.dim, args.source, config)), flush=True)
        return 0
    print(json.dumps(run_child(args.num, args.dim, args.source, config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
