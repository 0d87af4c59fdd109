"""Load and soak of ``remap serve``: throughput against the in-process loop, then a soak
with changes and a ``kill -9``.

1. Export REMAP on MobileNet v1 (alpha 0.75, descriptors whitened to 512-d; ``--weights``
   loads ImageNet weights, else random ones: speed does not depend on them) at 224 px.
2. Index: ``--index-size`` (100k) synthetic unit vectors plus the real query photos, embedded
   by that export; ScaNN as ``remap index build`` configures it at that size.
3. Baseline, in this process: ``embed([image]); index.search(descriptor, k=10)`` in a loop
   over the photos (the same embedder and index the service uses), for ``--duration`` s.
4. ``remap serve`` in a subprocess on 127.0.0.1 (the SavedModel in process: TF Serving cannot
   run here); 1, 8 and 32 concurrent clients (asyncio + httpx, raw JPEG bodies, k=10), each
   level ``--duration`` s after a short warm-up: queries/s, latency p50/p99 as the client saw
   it and per stage as the service reported it, mean batch size, errors.
5. Soak, ``--soak-minutes`` (10): 8 clients, 80% searches, 10% additions (fresh ids, the
   photo stored under the collection root), 10% deletions (of acknowledged additions); the
   log compacts past ``--compact-after``; at half time ``kill -9`` and a restart; memory
   (RSS) sampled; at the end every acknowledged change is checked (an added id present, a
   deleted one absent).

The clients run on the same machine as the service and take CPU from it; the load average is
recorded with each phase.

    python -m bench.search_load [--photos DIR] [--weights FILE] [--duration 60]
        [--soak-minutes 10] [--index-size 100000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.report import machine_line, write_section

K = 10
CLIENT_LEVELS = (1, 8, 32)
GOAL = 0.8  # service throughput / in-process loop, at 8 clients


def _load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def _photos(folder: str | None, limit: int) -> list[tuple[str, bytes]]:
    """``(relative name, JPEG bytes)``: the photos under ``folder``, else scikit-image's."""
    from PIL import Image

    out = []
    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        for path in paths[:: max(1, len(paths) // limit)][:limit]:
            out.append((path.relative_to(folder).as_posix(), path.read_bytes()))
        return out
    from skimage import data as skdata

    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page"):
        image = Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append((f"{name}.jpg", buffer.getvalue()))
    return out


def _export(out: Path, weights: str | None) -> Path:
    from remap_tf.export.saved_model import export_model
    from remap_tf.model import REMAP

    model = REMAP("mobilenet", backbone_kwargs={"alpha": 0.75}, weights=weights, dim=512)
    return export_model(model, out / "models" / "remap", image_size=224).parent


def _build_index(embedder, model: Path, photos, root: Path, out: Path, size: int) -> Path:
    """Synthetic unit vectors plus the photos' descriptors, saved as a ScaNN index."""
    from remap_tf.serving.index import ScannIndex
    from remap_tf.serving.search import IMAGE_ROOT, MODEL

    rng = np.random.default_rng(0)
    synthetic = rng.standard_normal((size, embedder.dim)).astype(np.float32)
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    for name, data in photos:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    real = embedder.embed([data for _, data in photos])
    index = ScannIndex(embedder.dim)
    index.add([f"synthetic/{i:06d}" for i in range(size)], synthetic)
    index.add([name for name, _ in photos], real)
    index.metadata = {IMAGE_ROOT: str(root), MODEL: str(model)}  # as remap index build does
    started = time.perf_counter()
    index.save(out)
    print(f"index: {len(index)} vectors, {index.config['mode']}, built and saved in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return out


def _baseline(embedder, index_dir: Path, photos, duration: float, batch: int) -> dict:
    """The in-process loop: embed ``batch`` photos, search each; queries/s and stage times."""
    from remap_tf.serving.index import load_index

    index = load_index(index_dir)
    images = [data for _, data in photos]
    for _ in range(2):  # warm-up
        index.search(embedder.embed(images[:batch]), k=K)
    embed_s, search_s, done, cycle = [], [], 0, itertools.cycle(range(len(images)))
    end = time.perf_counter() + duration
    started = time.perf_counter()
    while time.perf_counter() < end:
        group = [images[next(cycle)] for _ in range(batch)]
        t = time.perf_counter()
        descriptors = embedder.embed(group)
        embed_s.append(time.perf_counter() - t)
        for row in descriptors:
            t = time.perf_counter()
            index.search(row[None], k=K)
            search_s.append(time.perf_counter() - t)
        done += batch
    elapsed = time.perf_counter() - started
    return {"qps": done / elapsed, "embed": embed_s, "search": search_s, "load": _load_avg()}


class Service:
    """``remap serve`` in a subprocess (port 0: the printed URL is read back)."""

    def __init__(self, workdir: Path, index: Path, compact_after: int):
        self.workdir, self.index, self.compact_after = workdir, index, compact_after
        self.logs: list[Path] = []
        self.proc = None
        self.url = None

    def start(self) -> None:
        log = self.workdir / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        command = [sys.executable, "-m", "remap_cli", "serve", "--index", str(self.index)]
        command += ["--port", "0", "--compact-after", str(self.compact_after)]
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600
        while time.time() < deadline and self.proc.poll() is None:
            lines = [x for x in log.read_text().splitlines() if x.startswith("remap serve: http")]
            if lines:
                self.url = lines[0].split()[2].rstrip("/")
                break
            time.sleep(0.5)
        if self.url is None or self.proc.poll() is not None:
            raise RuntimeError(f"remap serve did not start:\n{log.read_text()[-3000:]}")

    async def wait_ready(self, client: httpx.AsyncClient, timeout=600.0) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            try:
                if (await client.get(self.url + "/readyz")).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError("remap serve never became ready")

    def rss_mb(self) -> float:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kb / 1024

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=120)

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs)


async def _search_once(client, url, image, record) -> None:
    t = time.perf_counter()
    try:
        response = await client.post(url + "/v1/search", content=image, params={"k": K})
    except httpx.HTTPError as error:
        record["errors"].append(type(error).__name__)
        return
    record["latency"].append(time.perf_counter() - t)
    if response.status_code != 200:
        record["errors"].append(f"{response.status_code} {response.text[:120]}")
        return
    answer = response.json()
    for stage in ("queue", "embed", "search"):
        record[stage].append(answer["timing_ms"][stage] / 1000)
    record["batch"].append(answer["batch_size"])


async def _load_level(service: Service, photos, clients: int, duration: float) -> dict:
    images = [data for _, data in photos]
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker(record, end, offset):
            for i in itertools.count(offset):
                if time.perf_counter() >= end:
                    return
                await _search_once(client, service.url, images[i % len(images)], record)

        for seconds in (min(5.0, duration), duration):  # warm-up, then the measurement
            record = {k: [] for k in ("latency", "queue", "embed", "search", "batch", "errors")}
            end = time.perf_counter() + seconds
            started = time.perf_counter()
            await asyncio.gather(*(worker(record, end, 7 * c) for c in range(clients)))
            elapsed = time.perf_counter() - started
    record.update(clients=clients, qps=len(record["latency"]) / elapsed, load=_load_avg())
    record["rss_mb"] = service.rss_mb()
    return record


class _Soak:
    """The soak's shared bookkeeping: what was acknowledged, what is uncertain."""

    def __init__(self, photos):
        self.images = [data for _, data in photos]
        self.added: dict[str, bytes] = {}  # acknowledged additions not deleted since
        self.deleted: set[str] = set()  # acknowledged deletions
        self.uncertain: set[str] = set()  # in flight when the service died
        self.counts = {"search": 0, "add": 0, "delete": 0}
        self.errors: list[str] = []
        self.refused = 0  # transport errors while the service was down
        self.down = False
        self.fresh = itertools.count()
        self.write_latency: list[float] = []
        self.search_latency: list[float] = []


async def _soak_op(client, url: str, soak: _Soak, rng: random.Random) -> None:
    roll = rng.random()
    item, op = None, "search"
    if roll < 0.1:
        op, item = "add", f"soak/{next(soak.fresh):06d}.jpg"
    elif roll < 0.2 and len(soak.added) > 20:
        op, item = "delete", rng.choice(sorted(soak.added))
        del soak.added[item]  # no one else deletes it meanwhile
    image = soak.images[rng.randrange(len(soak.images))]
    t = time.perf_counter()
    try:
        if op == "search":
            response = await client.post(url + "/v1/search", content=image, params={"k": K})
        elif op == "add":
            files = {"image": ("x.jpg", image)}
            response = await client.post(url + "/v1/images", data={"id": item}, files=files)
        else:
            response = await client.delete(f"{url}/v1/images/{item}")
    except httpx.HTTPError as error:
        if item is not None:
            soak.uncertain.add(item)
        if soak.down:
            soak.refused += 1
        else:
            soak.errors.append(f"{op}: {type(error).__name__}")
        return
    elapsed = time.perf_counter() - t
    (soak.search_latency if op == "search" else soak.write_latency).append(elapsed)
    if response.status_code not in (200, 201):
        soak.errors.append(f"{op} {item}: {response.status_code} {response.text[:160]}")
        if item is not None:
            soak.uncertain.add(item)
        return
    soak.counts[op] += 1
    if op == "add":
        soak.added[item] = image
    elif op == "delete":
        soak.deleted.add(item)


async def _verify(client, url: str, soak: _Soak) -> dict:
    """Every acknowledged change as the service reports it now."""
    missing, resurrected = [], []
    for item in sorted(soak.added):
        if (
            item not in soak.uncertain
            and (await client.get(f"{url}/v1/images/{item}")).status_code != 200
        ):
            missing.append(item)
    for item in sorted(soak.deleted):
        response = await client.get(f"{url}/v1/images/{item}")
        if item not in soak.uncertain and response.status_code != 404:
            resurrected.append(item)
    return {"checked": len(soak.added) + len(soak.deleted), "missing": missing,
            "resurrected": resurrected}  # fmt: skip


async def _soak(
    service: Service, photos, minutes: float, clients: int = 8
) -> dict:  # long: one timeline
    soak, rng = _Soak(photos), random.Random(0)
    end = time.perf_counter() + minutes * 60
    kill_at = time.perf_counter() + minutes * 30
    memory, segments, restart = [], [], {}
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker(seed):
            local = random.Random(seed)
            while time.perf_counter() < end:
                if soak.down:
                    await asyncio.sleep(0.2)
                    continue
                await _soak_op(client, service.url, soak, local)

        async def sampler():
            while time.perf_counter() < end:
                if not soak.down:
                    memory.append((time.perf_counter(), service.rss_mb()))
                await asyncio.sleep(5)

        async def killer():
            await asyncio.sleep(max(0.0, kill_at - time.perf_counter()))
            segments.append(list(memory))
            soak.down = True
            service.kill9()
            restart["killed_after_ops"] = sum(soak.counts.values())
            t = time.perf_counter()
            await asyncio.to_thread(service.start)
            restart["ready_s"] = await service.wait_ready(client) + 0
            restart["total_s"] = time.perf_counter() - t
            restart["after_restart"] = await _verify(client, service.url, soak)
            memory.clear()
            soak.down = False

        started = time.perf_counter()
        await asyncio.gather(killer(), sampler(), *(worker(rng.random()) for _ in range(clients)))
        segments.append(list(memory))
        final = await _verify(client, service.url, soak)
    return {
        "minutes": (time.perf_counter() - started) / 60,
        "soak": soak,
        "segments": segments,
        "restart": restart,
        "final": final,
        "compactions": service.output().count("compacted "),
        "replayed": re.findall(r"(\d+) logged change\(s\) replayed", service.output()),
        "load": _load_avg(),
    }


def _stage_row(name, values) -> str:
    ms = [v * 1000 for v in values]
    return f"{name} {_pct(ms, 50):.1f} / {_pct(ms, 99):.1f}"


def _report(args, baseline, baseline8, levels, soak, timings) -> str:  # long: a report
    lines = [
        "## Search service: load and soak (`python -m bench.search_load`)",
        "",
        f"Machine: {machine_line()}; shared with other jobs (load average 1/5/15 min given "
        "per phase). Model: REMAP on MobileNet v1 (alpha 0.75), 512-d, exported at 224 px, "
        f"{'ImageNet weights' if args.weights else 'random weights'}, embedded in process "
        "(the SavedModel's `serving_default`, as TF Serving would run it; TF Serving itself "
        f"cannot run here). Index: {args.index_size:,} synthetic unit vectors + "
        f"{timings['photos']} real photos ({timings['source']}), ScaNN {timings['mode']}. "
        f"Queries: those photos as JPEG bodies, k={K}. Clients: asyncio + httpx on the same "
        "machine (they take CPU from the service).",
        "",
        "| | clients | queries/s | ratio to in-process | latency p50 / p99 ms | "
        "queue p50 / p99 | embed (batch call) p50 / p99 | search p50 / p99 | mean batch | "
        "errors | service RSS MB | load avg |",
        "|---|---:|---:|---:|---|---|---|---|---:|---:|---:|---|",
        f"| in-process loop, 1 image per call | 1 | {baseline['qps']:.1f} | 1.00 | | | "
        f"{_stage_row('', baseline['embed'])} | {_stage_row('', baseline['search'])} | 1 | 0 | | "
        f"{baseline['load']} |",
        f"| in-process loop, 8 images per call | 1 | {baseline8['qps']:.1f} | "
        f"{baseline8['qps'] / baseline['qps']:.2f} | | | {_stage_row('', baseline8['embed'])} | "
        f"{_stage_row('', baseline8['search'])} | 8 | 0 | | {baseline8['load']} |",
    ]
    for level in levels:
        lines.append(
            f"| `remap serve` | {level['clients']} | {level['qps']:.1f} | "
            f"{level['qps'] / baseline['qps']:.2f} | {_stage_row('', level['latency'])} | "
            f"{_stage_row('', level['queue'])} | {_stage_row('', level['embed'])} | "
            f"{_stage_row('', level['search'])} | {np.mean(level['batch']):.1f} | "
            f"{len(level['errors'])} | {level['rss_mb']:.0f} | {level['load']} |"
        )
    at8 = next(level for level in levels if level["clients"] == 8)
    ratio = at8["qps"] / baseline["qps"]
    verdict = "met" if ratio >= GOAL else "missed"
    versus8 = at8["qps"] / baseline8["qps"]
    lines += ["", f"Goal: service/in-process >= {GOAL} at 8 clients: **{ratio:.2f}, {verdict}**. "
              f"Against the 8-images-per-call loop: {versus8:.2f}."]  # fmt: skip
    lines += _soak_report(soak)
    lines += [
        "",
        f"Index build and save: {timings['index_s']:.0f} s; from the service's printed URL "
        f"(index loaded) to ready (model warmed up): {timings['ready_s']:.0f} s. "
        f"Run: {timings['command']}.",
    ]
    return "\n".join(lines)


def _soak_report(result) -> list[str]:
    soak, restart, final = result["soak"], result["restart"], result["final"]
    growth = []
    names = ("before the kill", "after the restart")
    for name, segment in zip(names, result["segments"], strict=False):
        if len(segment) >= 2:
            rss = [m for _, m in segment]
            growth.append(f"{name}: {rss[0]:.0f} -> {rss[-1]:.0f} MB (max {max(rss):.0f}) over "
                          f"{(segment[-1][0] - segment[0][0]) / 60:.1f} min")  # fmt: skip
    ok = not final["missing"] and not final["resurrected"] and not soak.errors
    verdict = "every acknowledged change present" if ok else "FAILED"
    early = restart.get("after_restart", {})
    return [
        "",
        f"**Soak** ({result['minutes']:.1f} min, 8 clients, 80% searches / 10% additions / "
        f"10% deletions, `--compact-after` {result['compact_after']}; load average at the end "
        f"{result['load']}): {soak.counts['search']} searches, {soak.counts['add']} additions, "
        f"{soak.counts['delete']} deletions acknowledged; errors {len(soak.errors)}"
        + (f" (first: {soak.errors[0]})" if soak.errors else "")
        + f"; {result['compactions']} automatic compaction(s). Search latency p50 / p99 "
        f"{_pct(soak.search_latency, 50) * 1000:.0f} / {_pct(soak.search_latency, 99) * 1000:.0f}"
        f" ms, writes {_pct(soak.write_latency, 50) * 1000:.0f} / "
        f"{_pct(soak.write_latency, 99) * 1000:.0f} ms.",
        "",
        f"Memory (service RSS): {'; '.join(growth)}.",
        "",
        f"`kill -9` at half time (after {restart.get('killed_after_ops')} operations), restart "
        f"to ready in {restart.get('total_s', float('nan')):.0f} s "
        f"({(result['replayed'] + ['?', '?'])[1]} logged changes replayed); requests refused while "
        f"down: {soak.refused}; changes in flight at the kill (outcome unknown, not checked): "
        f"{len(soak.uncertain)}. Right after the restart {early.get('checked')} acknowledged "
        f"changes checked, missing {len(early.get('missing', []))}, deleted-but-back "
        f"{len(early.get('resurrected', []))}; at the end {final['checked']} checked, missing "
        f"{len(final['missing'])}, deleted-but-back {len(final['resurrected'])}: **{verdict}**.",
    ]


async def _service_phases(args, service: Service, photos) -> tuple[list, dict, float]:
    async with httpx.AsyncClient(timeout=120) as client:
        ready_s = await service.wait_ready(client)
    levels = []
    for clients in CLIENT_LEVELS:
        print(f"load: {clients} client(s) for {args.duration:.0f} s", flush=True)
        levels.append(await _load_level(service, photos, clients, args.duration))
        print(f"  {levels[-1]['qps']:.1f} q/s, errors {len(levels[-1]['errors'])}", flush=True)
    print(f"soak: {args.soak_minutes:g} min", flush=True)
    soak = await _soak(service, photos, args.soak_minutes)
    soak["compact_after"] = args.compact_after
    return levels, soak, ready_s


def main(argv=None) -> int:  # long: the benchmark's one timeline
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=None, help="a folder of JPEG photos (default: skimage)")
    parser.add_argument("--max-photos", type=int, default=200)
    parser.add_argument("--weights", default=None, help="MobileNet v1 0.75 no-top weights file")
    parser.add_argument("--index-size", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load level")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--compact-after", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="print, do not write the docs")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from remap_tf.serving.client import make_embedder
    from remap_tf.serving.index import load_index

    work = Path(tempfile.mkdtemp(prefix="remap-search-load-"))
    try:
        photos = _photos(args.photos, args.max_photos)
        export = _export(work, args.weights)
        embedder = make_embedder(str(export))
        t = time.perf_counter()
        index_dir = _build_index(
            embedder, export, photos, work / "photos", work / "photos.index", args.index_size
        )
        timings = {
            "index_s": time.perf_counter() - t,
            "photos": len(photos),
            "source": args.photos or "scikit-image",
            "command": " ".join(["python -m bench.search_load", *sys.argv[1:]]),
            "mode": load_index(index_dir).config["mode"],
        }
        print(f"baseline: {args.duration:.0f} s, load {_load_avg()}", flush=True)
        baseline = _baseline(embedder, index_dir, photos, args.duration, 1)
        baseline8 = _baseline(embedder, index_dir, photos, args.duration, 8)
        print(f"  {baseline['qps']:.1f} q/s (1 per call), {baseline8['qps']:.1f} (8)", flush=True)
        del embedder
        service = Service(work, index_dir, args.compact_after)
        service.start()
        try:
            levels, soak, timings["ready_s"] = asyncio.run(_service_phases(args, service, photos))
        finally:
            print(f"service exit: {service.stop()}", flush=True)
        markdown = _report(args, baseline, baseline8, levels, soak, timings)
        print(markdown)
        if not args.no_write:
            write_section("search_load", markdown)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
