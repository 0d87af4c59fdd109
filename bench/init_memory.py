"""Memory and time of the initialisations on 100k images: pairs, KL region weights, whitening.

    python -m bench.init_memory [--images 100000] [--labels 1000000]

Synthetic streams with the shapes of MobileNet v1 α=0.75 (40 regions; taps of 384 and 768
channels; D = 1152 descriptors) are read once, a batch at a time, by the public streaming
functions (`remap_tf.kl_region_weights_from_stream`,
`remap_tf.learned_whitening_from_stream`, imported before measuring, as they load
TensorFlow), so what is measured is the initialisation, not the data: the generators reuse
one block of noise. Peak memory is the growth of the process's peak resident set (VmHWM,
reset through ``/proc/self/clear_refs``; each step in its own process), which counts what
tracemalloc does not see (LAPACK's workspace); the pair sampler is measured with
tracemalloc. Each figure is set against the bound the docstrings state and against what
holding everything in memory would take. Writes the "init_memory" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.report import machine_line, write_section
from remap_tf import kl_region_weights_from_stream, learned_whitening_from_stream
from remap_tf.pairs import sample_pairs

REGIONS, TAPS, BATCH, CLASSES = 40, (384, 768), 32, 25_000
MIB = 1 << 20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_rss_growth(function):
    """``(result, seconds, peak RSS growth in bytes)`` of ``function()``."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS:")
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, _status("VmHWM:") - base


def labels_stream(num_images: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for start in range(0, num_images, batch):
        yield rng.integers(0, CLASSES, size=min(batch, num_images - start))


def region_data():
    """Class centres and a block of noise per tap, made before the measurement."""
    rng = np.random.default_rng(1)
    centres = [rng.random((CLASSES // 50, REGIONS, c), dtype=np.float32) for c in TAPS]
    noise = [rng.random((256, REGIONS, c), dtype=np.float32) for c in TAPS]
    return centres, noise


def region_batches(num_images: int, centres, noise):
    """``([(b, 40, 384), (b, 40, 768)], labels)``: a class centre plus a slice of noise."""
    for number, labels in enumerate(labels_stream(num_images, BATCH)):
        at = (number * BATCH) % (256 - BATCH)
        taps = [
            centre[labels % len(centre)] + block[at : at + len(labels)]
            for centre, block in zip(centres, noise, strict=True)
        ]
        yield taps, labels


def descriptor_data(dim: int):
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 3, size=(CLASSES, dim)).astype(np.float32)
    return centres, rng.standard_normal((1024, dim), dtype=np.float32)


def descriptor_batches(num_images: int, centres, noise):
    for number, labels in enumerate(labels_stream(num_images, 256)):
        at = (number * 256) % (1024 - 256)
        yield centres[labels] + noise[at : at + len(labels)], labels


def measure_pairs(num_labels: int) -> str:
    """GLDv2-like class sizes (1 to 40 images)."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 41, size=num_labels // 10)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)[:num_labels])
    tracemalloc.start()
    start = time.perf_counter()
    sample_pairs(labels, max_pairs=2000, seed=0)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = len(labels)
    return (
        f"| `sample_pairs`, {n:,} labels, 2000 + 2000 pairs | {seconds:.2f} s | "
        f"{peak / MIB:.0f} MiB (tracemalloc) | O(N): {peak / n:.0f} B per label | "
        f"{n * (n - 1) // 2 * 17 / 2**40:,.0f} TiB (`triu_indices` + mask) |"
    )


def measure_kl(num_images: int) -> str:
    centres, noise = region_data()
    _, seconds, peak = peak_rss_growth(
        lambda: kl_region_weights_from_stream(region_batches(num_images, centres, noise))
    )
    channels = sum(TAPS)
    bound = 512 * REGIONS * channels * 4 + 3 * MIB + 2 * 2000 * REGIONS * 24 + 200 * CLASSES
    bound += 3 * BATCH * REGIONS * channels * 4  # the generator's batch and its temporaries
    everything = num_images * REGIONS * channels * 4
    return (
        f"| KL region weights, {num_images:,} images × 40 regions × (384 + 768) | "
        f"{seconds:.0f} s | {peak / MIB:.0f} MiB | {bound / MIB:.0f} MiB | "
        f"{everything / 2**30:.1f} GiB (region vectors of every image) |"
    )


def measure_whitening(num_images: int, dim: int) -> str:
    centres, noise = descriptor_data(dim)
    _, seconds, peak = peak_rss_growth(
        lambda: learned_whitening_from_stream(descriptor_batches(num_images, centres, noise))
    )
    bound = 3 * dim * dim * 8 + 4096 * dim * 4 + 3.5 * dim * dim * 8 + 200 * CLASSES
    bound += 3 * 256 * dim * 8  # the generator's batch, its float64 copy and the centring
    everything = num_images * dim * (4 + 8 + 8 + 8)  # float32 + float64, centred, whitened
    return (
        f"| learned whitening, {num_images:,} descriptors, D = {dim} | {seconds:.0f} s | "
        f"{peak / MIB:.0f} MiB | {bound / MIB:.0f} MiB | "
        f"{everything / 2**30:.1f} GiB (descriptors, float64 copies) |"
    )


def run_step(step: str, args) -> str:
    """One step's table row, measured in a fresh process: memory freed by an earlier step
    stays resident in the allocator and would hide a later step's growth."""
    command = [sys.executable, "-m", "bench.init_memory", "--step", step]
    command += ["--images", str(args.images), "--labels", str(args.labels)]
    command += ["--dim", str(args.dim)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("| "))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=sum(TAPS))
    parser.add_argument("--step", choices=("pairs", "kl", "whitening"), default=None)
    args = parser.parse_args(argv)
    if args.step:
        steps = {
            "pairs": lambda: measure_pairs(args.labels),
            "kl": lambda: measure_kl(args.images),
            "whitening": lambda: measure_whitening(args.images, args.dim),
        }
        print(steps[args.step]())
        return
    load_before = os.getloadavg()
    rows = [run_step(step, args) for step in ("pairs", "kl", "whitening")]
    body = "\n".join(
        [
            "## Initialisation memory on 100k images",
            "",
            f"Machine: {machine_line()}; load average {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after (shared machine). `python -m bench.init_memory`.",
            "Synthetic streams with MobileNet v1 α=0.75 shapes, read once a batch at a time, "
            f"{CLASSES:,} classes; defaults (KL: 512 images kept, 2000 pairs of each kind; "
            "whitening: 4096 descriptors kept, 20000 matching pairs). Each step runs in its "
            "own process.",
            "",
            "| step | time | peak memory (RSS growth) | stated bound (+ the batch) "
            "| everything in memory |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    write_section("init_memory", body)


if __name__ == "__main__":
    main()
