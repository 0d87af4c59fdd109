"""Cost of the REMAP head against the backbone alone, and achieved GFLOP/s of the forward pass.

    python -m bench.model_cost [--backbone resnet50] [--height 768] [--width 1024]
                               [--batches 1 8] [--repeats 5]

Both models are the same graph up to the backbone taps (preprocessing included); the full
model adds region max pooling, region weighting, concatenation, whitening and the final
normalisation. Each is traced once as a ``tf.function``; timings alternate between the two
models so that load from other processes hits both alike, and the median of the repeats is
reported. FLOPs are counted by TensorFlow's profiler on the traced graph (a multiply-add
counts as 2). Writes the "model" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

import remap_tf
from bench.report import machine_line, write_section


def count_flops(function, spec) -> int:
    """Float operations of one call of ``function`` on inputs of ``spec``, by tf.profiler."""
    concrete = tf.function(function).get_concrete_function(spec)
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
    return int(profile.total_float_ops)


def cpu_peak_gflops() -> tuple[float, float, str]:
    """FP32 peak of this machine's cores: AVX2 FMA (2 units × 8 lanes × 2) and AVX-512."""
    mhz, flags = None, ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
        mhz = float(found.group(1)) if found else None
        found = re.search(r"^flags\s*:(.*)$", text, re.M)
        flags = found.group(1) if found else ""
    except OSError:
        pass
    cores = os.cpu_count() or 1
    if mhz is None:
        return float("nan"), float("nan"), "unknown clock"
    avx2 = cores * mhz / 1000 * 32
    avx512 = cores * mhz / 1000 * 64 if "avx512f" in flags else float("nan")
    return avx2, avx512, f"{cores} cores × {mhz / 1000:.2f} GHz (nominal clock from /proc/cpuinfo)"


def time_call(function, data) -> float:
    start = time.perf_counter()
    for output in tf.nest.flatten(function(data)):
        output.numpy()  # waits for the result
    return time.perf_counter() - start


def run(backbone: str, height: int, width: int, batches, repeats: int) -> str:
    model = remap_tf.REMAP(backbone, input_shape=(height, width, 3))
    features = keras.Model(
        model.inputs, model.get_layer("backbone")(model.get_layer("preprocessing").output)
    )
    full_fn = tf.function(lambda x: model(x, training=False), jit_compile=False)
    backbone_fn = tf.function(lambda x: features(x, training=False), jit_compile=False)
    load_before = os.getloadavg()[0]
    rows = [
        _measure_batch(model, features, full_fn, backbone_fn, batch, (height, width), repeats)
        for batch in batches
    ]
    load = (load_before, os.getloadavg()[0])
    return _section(backbone, height, width, batches, repeats, model, rows, load)


def _measure_batch(model, features, full_fn, backbone_fn, batch, size, repeats) -> dict:
    """Paired timings of the backbone alone and the whole model at one batch size."""
    height, width = size
    spec = tf.TensorSpec((batch, height, width, 3), tf.float32)
    full_flops = count_flops(lambda x: model(x, training=False), spec)
    backbone_flops = count_flops(lambda x: features(x, training=False), spec)
    data = tf.random.uniform((batch, height, width, 3), 0, 255, seed=1)
    for fn in (full_fn, backbone_fn):  # trace and warm up
        time_call(fn, data)
        time_call(fn, data)
    full_times, backbone_times = [], []
    for _ in range(repeats):
        backbone_times.append(time_call(backbone_fn, data))
        full_times.append(time_call(full_fn, data))
    full_s = statistics.median(full_times)
    backbone_s = statistics.median(backbone_times)
    ratios = [f / b for f, b in zip(full_times, backbone_times, strict=True)]
    row = {
        "batch": batch,
        "backbone_ms": backbone_s * 1000,
        "full_ms": full_s * 1000,
        "overhead": statistics.median(ratios) - 1,
        "overhead_min": min(ratios) - 1,
        "overhead_max": max(ratios) - 1,
        "gflop": full_flops / 1e9,
        "head_gflop": (full_flops - backbone_flops) / 1e9,
        "gflops": full_flops / 1e9 / full_s,
    }
    print(row, flush=True)
    return row


def _section(backbone, height, width, batches, repeats, model, rows, load) -> str:
    """The markdown section of the measurements."""
    avx2_peak, avx512_peak, clock = cpu_peak_gflops()
    load_before, load_after = load

    lines = [
        "## Model: REMAP head cost and forward-pass GFLOP/s",
        "",
        f"Command: `python -m bench.model_cost --backbone {backbone} --height {height} "
        f"--width {width} --batches {' '.join(map(str, batches))} --repeats {repeats}`",
        f"Machine: {machine_line()}; TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        "CPU only, float32, tf.function without XLA, random weights (speed does not depend "
        "on them).",
        f"Model: REMAP on {backbone}, taps {list(remap_tf.BACKBONES[backbone].taps)}, 40 "
        f"regions per tap, input {width}×{height}, descriptor size {model.output_shape[-1]}.",
        "",
        "| batch | backbone alone (ms) | full REMAP (ms) | head overhead (median, min..max "
        f"of {repeats} paired runs) | forward GFLOP | head GFLOP | achieved GFLOP/s |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['backbone_ms']:.0f} | {r['full_ms']:.0f} | "
            f"{r['overhead'] * 100:+.1f}% ({r['overhead_min'] * 100:+.1f}..."
            f"{r['overhead_max'] * 100:+.1f}%) | {r['gflop']:.1f} | {r['head_gflop']:.3f} | "
            f"{r['gflops']:.0f} |"
        )
    lines.insert(
        4,
        f"Load average (1 min) on the {os.cpu_count()} cores: {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end (above {os.cpu_count()}, other processes competed for "
        "the cores; the overhead is taken per paired run so that load hits both sides alike).",
    )
    worst = max(r["overhead"] for r in rows)
    verdict = "meets" if worst < 0.10 else "misses"
    lines += [
        "",
        f"Target: the head adds under 10%. Measured worst median overhead {worst * 100:.1f}%: "
        f"{verdict} the target.",
        "",
        f"FP32 peak of this CPU: {avx2_peak:.0f} GFLOP/s with AVX2 FMA (32 FLOP/cycle/core), "
        f"{avx512_peak:.0f} GFLOP/s with AVX-512 (64 FLOP/cycle/core); {clock}. Achieved "
        f"at batch {rows[-1]['batch']}: {rows[-1]['gflops'] / avx2_peak * 100:.0f}% of the "
        f"AVX2 peak, {rows[-1]['gflops'] / avx512_peak * 100:.0f}% of the AVX-512 peak.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    markdown = run(args.backbone, args.height, args.width, args.batches, args.repeats)
    print(markdown)
    if not args.no_write:
        write_section("model", markdown)


if __name__ == "__main__":
    main()
