"""Building a sharded index from ``remap embed`` output, one Beam task per shard.

Two stages in one pipeline, so that no process ever holds more than one shard:

1. **route** (one task per embedding shard): read the shard (checksums checked), split its rows
   by `remap_tf.serving.index.sharded.shard_of` and write one part per index shard under
   ``<staging>/routing/``;
2. **build** (one task per index shard, after every route task): read that shard's parts,
   build its index (ScaNN, tuned to its recall target, or exact) and save it as
   ``<staging>/shard-NNNNN-<token>/``.

The launcher then writes the top-level manifest (`sharded.write_top_level`) and renames the
staging folder into place, so a failed build never leaves a half-written index. The index
folder must be on a filesystem that the launcher and every worker share: the local disk for
the local runner, a shared mount (NFS, Filestore, GCSFuse) for a distributed one.

How many shards: ``num_shards``, or enough that each shard's build fits ``memory_budget``
bytes, from `estimated_build_bytes`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import apache_beam as beam
import numpy as np

from remap_tf.errors import InvalidInputError
from remap_tf.serving import embeddings
from remap_tf.serving.beam_embed import pipeline_options, runs_locally
from remap_tf.serving.index import LazyRows, make_index
from remap_tf.serving.index.files import staged_index_dir
from remap_tf.serving.index.sharded import shard_of, write_top_level

# Peak resident memory of building and saving one ScaNN shard (tree-AH, recall tuning
# included), per byte of the float32 vectors it indexes, above the process with ScaNN
# loaded. docs/scale.md "Build memory" (bench.build_memory, bounded-memory build): the worst
# measured build is 2.7x (200k x 256, default 100k training sample, whose ~5x training
# copies dominate), and saving adds 0.76x for a moment (ScaNN's serialize); 2.7 + 0.76 ->
# 3.5. Larger shards sit lower (500k x 256 builds at 1.33x, ~2.1x with the save); a shard
# much smaller than the training sample can go higher during training (~5x the sample).
# The 4.5 used before was measured on the build that preceded the bounded-memory one.
BUILD_BYTES_PER_VECTOR_BYTE = 3.5


# Every shard is a Beam task, an index folder and a searcher held open by a service; past a
# few thousand the per-shard costs outweigh any build, whatever the collection size.
MAX_SHARDS = 4096


def check_num_shards(num_shards: int, count: int) -> int:
    """``num_shards`` when it is from 1 to `MAX_SHARDS` and at most ``count`` (the vectors to
    index: a shard holds at least one); InvalidInputError naming both numbers otherwise,
    before any work."""
    if not 1 <= num_shards <= MAX_SHARDS:
        raise InvalidInputError(f"--shards must be from 1 to {MAX_SHARDS}, got {num_shards}")
    if num_shards > count:
        raise InvalidInputError(
            f"--shards {num_shards} is more than the {count} vectors to index; give at most "
            f"{count} shards"
        )
    return num_shards


def estimated_build_bytes(count: int, dim: int) -> int:
    """Peak memory of building one index of ``count`` ``dim``-d vectors (see the constant)."""
    return int(count * dim * 4 * BUILD_BYTES_PER_VECTOR_BYTE)


def shards_for_budget(count: int, dim: int, memory_budget: int) -> int:
    """The fewest shards whose builds each fit in ``memory_budget`` bytes."""
    if memory_budget <= 0:
        raise InvalidInputError(f"the memory budget must be positive, got {memory_budget}")
    return max(1, math.ceil(estimated_build_bytes(count, dim) / memory_budget))


def _num_shards(num_shards: int | None, memory_budget: int | None, count: int, dim: int) -> int:
    """``num_shards`` checked (`check_num_shards`), or the fewest whose builds each fit in
    ``memory_budget`` bytes (at most one per vector)."""
    if num_shards is None:
        if memory_budget is None:
            raise InvalidInputError("give the number of shards or a memory budget")
        num_shards = min(count, shards_for_budget(count, dim, memory_budget))
        if num_shards > MAX_SHARDS:
            raise InvalidInputError(
                f"--shard-memory {memory_budget} bytes needs {num_shards} shards, more than "
                f"{MAX_SHARDS}; give a larger budget"
            )
    return check_num_shards(num_shards, count)


def _route(
    task, folders: Sequence[str], manifests: Sequence[dict], routing: str, num_shards: int
) -> int:
    """Splits one embedding shard into per-index-shard parts; returns its row count."""
    folder_index, shard = task
    folder = folders[folder_index]
    ids, rows = embeddings.read_shard(folder, shard, manifests[folder_index])
    targets = shard_of(ids, num_shards)
    for target in np.unique(targets):
        keep = np.flatnonzero(targets == target)
        stem = os.path.join(routing, f"part-s{int(target):05d}-f{folder_index:03d}-e{shard:05d}")
        embeddings.write_json(stem + ".ids.json", [ids[k] for k in keep])
        embeddings.write_bytes(stem + ".npy", embeddings.npy_bytes(rows[keep]))
    return len(ids)


def _build(shard: int, staging: str, kind: str, dim: int, config: dict, routed) -> str:
    """Builds and saves index shard ``shard`` from its routed parts; returns its folder name."""
    del routed  # only orders this stage after the routing
    routing = Path(staging) / "routing"
    parts = sorted(routing.glob(f"part-s{shard:05d}-*.npy"))
    ids, rows = [], []
    for part in parts:
        names = json.loads(part.with_name(part.name[: -len(".npy")] + ".ids.json").read_text())
        ids.extend(names)
        # Read when the build asks: a ScaNN build streams them (`ScannIndex.build`).
        read = functools.partial(np.load, part, allow_pickle=False)
        rows.append(LazyRows(len(names), read, part))
    index = make_index(kind, dim, **config)
    index.add_lazily(ids, rows)
    name = f"shard-{shard:05d}-{uuid.uuid4().hex[:8]}"
    index.save(Path(staging) / name)
    return name


def build_sharded_index(
    folders,
    out,
    num_shards: int | None = None,
    memory_budget: int | None = None,
    kind: str = "scann",
    scann_config: dict | None = None,
    workers: int = 1,
    beam_args: Sequence[str] = (),
    metadata: dict | None = None,
    manifests: Sequence[dict] | None = None,
) -> dict:
    """Builds a sharded index of one or more descriptor folders (`remap_tf.serving.embeddings`)
    with Beam.

    Args:
        folders: embedding folders (their ids must not overlap).
        out: the index folder (replaced atomically if it is an index already).
        num_shards: shards; or None with ``memory_budget`` (bytes per shard build).
        kind: "scann" or "exact" shards.
        scann_config: `ScannConfig` overrides for every shard (e.g. ``target_recall``).
        workers: worker processes of the local runner (shards built that many at a time).
        beam_args: Beam options (another runner; see `beam_embed.pipeline_options`).
        metadata: recorded in the index (image root, model).
        manifests: the folders' manifests, when the caller read them already.

    Returns:
        ``{"index", "count", "dim", "num_shards", "shards": [entries], "config"}``.
    """
    folders = [str(Path(f).resolve()) for f in ([folders] if isinstance(folders, str) else folders)]
    manifests = list(manifests or [embeddings.read_manifest(f) for f in folders])
    dims = {m["dim"] for m in manifests if m["dim"] is not None}
    if len(dims) != 1:
        raise InvalidInputError(f"the embedding folders hold descriptors of sizes {sorted(dims)}")
    dim, count = dims.pop(), sum(m["count"] for m in manifests)
    num_shards = _num_shards(num_shards, memory_budget, count, dim)
    config = dict(scann_config or {}) if kind == "scann" else {}
    if kind == "scann":  # each shard gets the mode the whole collection's size calls for
        config["collection_size"] = count
    if kind == "scann" and runs_locally(beam_args) and "num_threads" not in config:
        config["num_threads"] = max(1, (os.cpu_count() or 1) // min(workers, num_shards))
    out = Path(out)
    tasks = [(f, s) for f, m in enumerate(manifests) for s in range(m["num_shards"])]
    with staged_index_dir(out) as staging:
        (staging / "routing").mkdir()
        with beam.Pipeline(options=pipeline_options(beam_args, workers)) as pipeline:
            routed = (
                pipeline
                | "EmbeddingShards" >> beam.Create(tasks)
                | "Route"
                >> beam.Map(_route, folders, manifests, str(staging / "routing"), num_shards)
            )
            _ = (
                pipeline
                | "IndexShards" >> beam.Create(list(range(num_shards)))
                | "Spread" >> beam.Reshuffle()
                | "Build"
                >> beam.Map(
                    _build, str(staging), kind, dim, config, routed=beam.pvalue.AsList(routed)
                )
            )
        shutil.rmtree(staging / "routing")
        names = {int(p.name[6:11]): p.name for p in staging.glob("shard-*") if p.is_dir()}
        if sorted(names) != list(range(num_shards)):
            raise RuntimeError(f"built shards {sorted(names)} of {num_shards}")
        entries = write_top_level(staging, dim, num_shards, names, metadata or {})
    return {
        "index": str(out),
        "count": sum(e["count"] for e in entries),
        "dim": dim,
        "num_shards": num_shards,
        "shards": entries,
        "config": {"kind": "sharded", "shard_kind": kind, **config},
    }
