"""docs/scale.md: from the figures bench/scale.py measured here to 100M and 1B images.

Every number in the document is either measured by bench/scale.py in the same run (named
"measured") or one of the assumptions below (named "assumed", with its source), and the
arithmetic is written out so it can be redone with other assumptions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from remap_tf.io import atomic_write_text

SCALE_MD = Path(__file__).resolve().parent.parent / "docs" / "scale.md"

# Assumptions (not measurable here; change them and rerun the arithmetic).
RESNET50_GFLOP = 121.5  # REMAP ResNet50 forward at 1024x768 (docs/benchmarks.md, "model")
GFLOPS_PER_VCPU = 83.0  # 166 GFLOP/s achieved on this machine's 2 cores (same section)
WORKER_VCPUS, WORKER_GB = 4, 15  # Dataflow n1-standard-4 batch worker
PRICE_VCPU_HOUR, PRICE_GB_HOUR = 0.056, 0.003557  # Dataflow batch list prices, us-central1
WORKERS = 250  # workers of the embedding job
SERVER_RAM_GB = 64  # memory of one search server
SERVER_FILL = 0.75  # share of it given to index shards
NETWORK_MS = 1.0  # one in-zone round trip, fan-out and merge
# Resident memory of a process with Python, TensorFlow and ScaNN loaded and nothing built
# (0.87-0.93 GiB measured by bench/scale.py's children): not part of a build's per-vector cost.
BASELINE_GIB = 0.9


def _largest(rows, shards):
    done = [r for r in rows if "skipped" not in r and r["shards"] == shards]
    return max(done, key=lambda r: r["n"]) if done else None


def _embedding_section(embedding) -> list[str]:
    beam = embedding["beam"]
    inproc = embedding["inprocess"]
    # End to end at the larger size (start-up included): the steady-state difference of two
    # single runs on shared cores is too noisy to plan with.
    small_rate = beam["end_to_end"] / 2  # 2 workers x 1 core
    efficiency = beam["end_to_end"] / inproc["end_to_end"]
    resnet_rate = GFLOPS_PER_VCPU / RESNET50_GFLOP * min(1.0, efficiency)
    worker_hour = WORKER_VCPUS * PRICE_VCPU_HOUR + WORKER_GB * PRICE_GB_HOUR
    lines = [
        "## Embedding on Dataflow",
        "",
        f"- measured: Beam's end-to-end rate here (start-up included), MobileNetV2 at "
        f"{embedding['image_size']} px: {beam['end_to_end']:.2f} images/s on 2 workers x 1 vCPU "
        f"= **{small_rate:.2f} images/s per vCPU**; Beam / in-process = {efficiency:.2f}.",
        f"- assumed for production: REMAP on ResNet50 at 1024x768, {RESNET50_GFLOP} GFLOP per "
        f"image, at the {GFLOPS_PER_VCPU:.0f} GFLOP/s per vCPU this machine's TensorFlow reaches "
        f"(docs/benchmarks.md, model section) x Beam's efficiency {min(1.0, efficiency):.2f} = "
        f"{GFLOPS_PER_VCPU:.0f} / {RESNET50_GFLOP} x {min(1.0, efficiency):.2f} = "
        f"**{resnet_rate:.3f} images/s per vCPU**.",
        f"- assumed: Dataflow batch workers n1-standard-{WORKER_VCPUS} ({WORKER_VCPUS} vCPU, "
        f"{WORKER_GB} GB) at ${PRICE_VCPU_HOUR}/vCPU-hour + ${PRICE_GB_HOUR}/GB-hour (list "
        f"prices for us-central1 as we know them; check the current page) = {WORKER_VCPUS} x "
        f"{PRICE_VCPU_HOUR} + {WORKER_GB} x {PRICE_GB_HOUR} = **${worker_hour:.3f} per "
        f"worker-hour**; {WORKERS} workers.",
        "",
        "| images | model | vCPU-hours = images / rate / 3600 | hours on "
        f"{WORKERS} workers = vCPU-hours / {WORKERS * WORKER_VCPUS} | cost = vCPU-hours / "
        f"{WORKER_VCPUS} x ${worker_hour:.3f} |",
        "|---:|---|---:|---:|---:|",
    ]
    for images in (100e6, 1e9):
        for name, rate in (("ResNet50 1024x768", resnet_rate), (
            f"MobileNetV2 {embedding['image_size']} px (measured)", small_rate)):  # fmt: skip
            vcpu_hours = images / rate / 3600
            hours = vcpu_hours / (WORKERS * WORKER_VCPUS)
            cost = vcpu_hours / WORKER_VCPUS * worker_hour
            lines.append(
                f"| {images:,.0f} | {name} | {images:,.0f} / {rate:.3f} / 3600 = "
                f"{vcpu_hours:,.0f} | {hours:,.1f} | ${cost:,.0f} |"
            )
    lines += [
        "",
        "Not included: reading the images (at ~500 KB per image, 100M images are 50 TB read "
        "from Cloud Storage once), the output (2 KB per 512-d descriptor: 200 GB at 100M), and "
        "GPU workers, which were not measured here. The driver lists the images before the job "
        "starts (about 150 bytes per path in memory: 15 GB at 100M): past ~10M images, split "
        "the collection into several list files and run one `remap embed` per list, then give "
        "all the output folders to `remap index build --from-embeddings`.",
        "",
    ]
    return lines


def _build_bytes(row) -> float:
    """A build's peak resident memory over its process's start (measured; else over
    `BASELINE_GIB`), per vector."""
    build = row["build"]
    base = build.get("baseline_gib", BASELINE_GIB)
    return max(build["peak_gib"] - base, 0.1) * 2**30 / row["n"]


def _index_section(rows) -> list[str]:
    from remap_tf.serving.beam_index import BUILD_BYTES_PER_VECTOR_BYTE

    one = _largest(rows, 1)
    if one is None:
        return ["## Index shards", "", "No single-shard build was measured.", ""]
    n, build, search = one["n"], one["build"], one["search"]
    dim = one.get("dim", 512)
    peak_per_vector = _build_bytes(one)
    base = build.get("baseline_gib", BASELINE_GIB)
    disk_per_vector = search["index_bytes"] / n
    sharded = _largest_sharded(rows, dim)
    timed = sharded if sharded is not None and sharded["n"] > n else one
    build_s_per_million = timed["build"]["seconds"] / (timed["n"] / 1e6)
    budget = SERVER_RAM_GB * 1e9 * SERVER_FILL
    shard = max(1, int(budget / peak_per_vector / 1e6)) * 1_000_000
    product = int(budget / (dim * 4 * BUILD_BYTES_PER_VECTOR_BYTE))
    lines = [
        "## Index shards",
        "",
        f"- measured, one ScaNN index of {n:,} x {dim} (tuned to recall 0.95, partitioning "
        f"included): build {build['seconds']:.0f} s, peak memory {build['peak_gib']:.2f} GiB, "
        f"({build['peak_gib']:.2f} - {base:.2f} GiB of runtime before the build) / {n:,} = "
        f"**{peak_per_vector:,.0f} bytes per vector** while building "
        f"({peak_per_vector / (dim * 4):.2f}x the raw float32 rows, the save included), "
        f"**{disk_per_vector:,.0f} bytes per vector** on disk and loaded; 1-query latency "
        f"p50 / p99 {search['latency_p50_ms']:.1f} / {search['latency_p99_ms']:.1f} ms; "
        f"{search['qps_1']:,.0f} queries/s on 1 thread at recall {search['recall']:.3f}.",
    ]
    if timed is sharded:
        s = sharded["search"]
        lines.append(
            f"- measured, the largest sharded build: {sharded['n']:,} x "
            f"{sharded.get('dim', 512)} as {sharded['shards']} shards on 2 Beam workers: build "
            f"{sharded['build']['seconds']:.0f} s = **{build_s_per_million:.0f} s per million "
            f"on 2 cores**, peak {sharded['build']['peak_gib']:.1f} GiB; recall "
            f"{s['recall']:.3f}, {s['qps_1']:,.0f} queries/s on 1 thread, 1-query p50 / p99 "
            f"{s['latency_p50_ms']:.1f} / {s['latency_p99_ms']:.1f} ms."
        )
    largest = _largest_sharded(rows)
    if largest is not None and largest is not sharded:
        b, s = largest["build"], largest["search"]
        big_dim = largest.get("dim", 512)
        lines.append(
            f"- measured, the largest build on this machine: {largest['n']:,} x {big_dim} as "
            f"{largest['shards']} shards: build {b['seconds']:.0f} s, peak "
            f"{b['peak_gib']:.1f} GiB ({_build_bytes(largest) / (big_dim * 4):.2f}x the raw "
            f"float32 rows); searched at recall {s['recall']:.3f}, {s['qps_1']:,.0f} "
            f"queries/s on 1 thread (not used above: its rows are not {dim}-d)."
        )
    lines += [
        f"- shard size: the most vectors whose build fits {SERVER_FILL:.0%} of a "
        f"{SERVER_RAM_GB} GB machine = {SERVER_RAM_GB}e9 x {SERVER_FILL} / {peak_per_vector:,.0f}"
        f" = **{shard / 1e6:.0f}M vectors per shard** (rounded down to millions). `remap index "
        f"build --shard-memory {int(SERVER_RAM_GB * SERVER_FILL)}GB` sizes shards by "
        f"`beam_index.BUILD_BYTES_PER_VECTOR_BYTE = {BUILD_BYTES_PER_VECTOR_BYTE}` (the worst "
        f"bounded build measured by bench/build_memory.py plus the save): {SERVER_RAM_GB}e9 x "
        f"{SERVER_FILL} / "
        f"({dim} x 4 x {BUILD_BYTES_PER_VECTOR_BYTE}) = {product / 1e6:.1f}M vectors, "
        f"{'more cautious than' if product < shard else 'above'} the measured figure.",
        "",
        "| images | shards = images / shard size | index size = images x bytes/vector | "
        f"servers of {SERVER_RAM_GB} GB = size / ({SERVER_RAM_GB} x {SERVER_FILL}) | build "
        "time, shards in parallel (one per worker) | query latency |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for images in (100e6, 1e9):
        shards = math.ceil(images / shard)
        size_gb = images * disk_per_vector / 1e9
        servers = math.ceil(size_gb / (SERVER_RAM_GB * SERVER_FILL))
        build_h = build_s_per_million * shard / 1e6 / 3600
        lines.append(
            f"| {images:,.0f} | {shards} | {size_gb:,.0f} GB | {servers} | "
            f"~{build_h:.1f} h ({build_s_per_million:.0f} s per million x {shard / 1e6:.0f}M, "
            "assuming linear, 2 cores per worker) | every query fans out to all shards: ~ the "
            f"slowest shard's p99 + {NETWORK_MS:.0f} ms network |"
        )
    lines += _fan_out_lines(rows, shard, search)
    return lines


def _largest_sharded(rows, dim=None):
    """The largest sharded build measured (of ``dim`` dimensions when given: the build rate
    extrapolated must be one of the extrapolated descriptors' size)."""
    done = [
        r
        for r in rows
        if "skipped" not in r and r["shards"] > 1 and dim in (None, r.get("dim", 512))
    ]
    return max(done, key=lambda r: (r["n"], r["shards"])) if done else None


def _fan_out_lines(rows, shard, search) -> list[str]:
    four = _largest_sharded(rows)
    lines = [""]
    if four is not None:
        s = four["search"]
        lines.append(
            f"Fan-out measured here: {four['n']:,} vectors ({four.get('dim', 512)}-d) as "
            f"{four['shards']} shards searched "
            f"in parallel threads of one process: 1-query p50 / p99 {s['latency_p50_ms']:.1f} / "
            f"{s['latency_p99_ms']:.1f} ms at recall {s['recall']:.3f} (the merge of "
            f"{four['shards']} x k results is negligible next to the searches)."
        )
    largest = _largest(rows, 1)["n"]
    lines += [
        "",
        "Every query is searched in every shard, so the CPU a query costs grows with the "
        "shard count, and a shard of "
        f"{shard / 1e6:.0f}M vectors costs more per query than the "
        f"{largest:,}-vector index measured here: each of its sqrt(n) leaves "
        "holds about sqrt(n) vectors, so at the same number of leaves searched a query scans "
        f"about sqrt({shard / 1e6:.0f}M / {largest / 1e6:g}M) times more "
        "vectors (not measured past that size here). Queries/s therefore grow with replicas of "
        "the whole sharded index, and latency follows the slowest shard of each query.",
        "",
    ]
    return lines


def write_scale_doc(embedding, rows, path: Path = SCALE_MD) -> None:
    lines = [
        "# Scale: from one machine to 100M and 1B images",
        "",
        "Written by `python -m bench.scale` from the figures it measured "
        f"({time.strftime('%Y-%m-%d')}, docs/benchmarks.md section 'scale') and the "
        "assumptions named below. Nothing here was run on Dataflow, Flink or Spark: the "
        "command lines are in [search.md](search.md#beyond-one-machine).",
        "",
    ]
    if embedding:
        lines += _embedding_section(embedding)
    else:  # not measured in this run: the document's figures from an earlier one stay
        lines += _kept_section(path, "## Embedding on Dataflow", "## Index shards")
    lines += _index_section(rows)
    lines += _kept_section(path, "## Build memory")
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")


def _kept_section(path: Path, heading: str, before: str | None = None) -> list[str]:
    """The document's section under ``heading`` (up to ``before``, or the end), kept as it is:
    "Build memory", which bench/build_memory.py's runs wrote, and the embedding figures of an
    earlier run when this one did not measure them."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start = text.find("\n" + heading)
    if start < 0:
        return []
    end = text.find("\n" + before, start) if before else -1
    kept = text[start + 1 : end if end >= 0 else None].rstrip()
    return [kept, ""] if before else ["", kept]
