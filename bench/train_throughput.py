"""Training throughput: ``model.fit`` against a plain ``tf.function`` train step.

Same REMAP model (same weights at the start), same triplet loss, same optimiser type, same
in-memory batch, no XLA on either side; only the training loop differs. One ``fit`` call
runs all the fit steps (as in real training); a callback times every ``--steps`` fit steps
end to end (from one ``on_train_batch_end`` to the next, so all of fit's per-step work is
counted) and then runs ``--steps`` plain-loop steps, timed on their own, so the two loops
alternate and see the same machine load. The first ``--warmup`` steps of each (tracing)
are not timed. The ratio is of the medians over rounds. Writes the "training" section of
docs/benchmarks.md.

    python -m bench.train_throughput                      # ResNet50, 224 px, batch 8, CPU
    python -m bench.train_throughput --image-size 512 --mixed-precision --steps 50   # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--pooling", default="remap")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (P×K, K=2)")
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (tracing)")
    parser.add_argument("--no-write", action="store_true", help="do not touch benchmarks.md")
    args = parser.parse_args(argv)
    if args.batch_size < 4 or args.batch_size % 2:
        parser.error(f"--batch-size must be even and >= 4, received {args.batch_size}")
    for name in ("steps", "rounds", "image_size", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from remap_tf.losses import TripletLoss
    from remap_tf.model import REMAP

    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    size = args.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch_size, size, size, 3)).astype("float32")
    labels = np.repeat(np.arange(args.batch_size // 2), 2).astype("int32")
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)

    def make_model():
        return REMAP(args.backbone, pooling=args.pooling, input_shape=(size, size, 3))

    fit_model = make_model()
    loop_model = make_model()
    loop_model.set_weights(fit_model.get_weights())
    fit_model.compile(optimizer=keras.optimizers.Adam(1e-5), loss=TripletLoss(), jit_compile=False)
    loop = _plain_loop(loop_model, iter(dataset), args.mixed_precision)
    started = time.monotonic()
    loop(1)  # traces the step, as fit's first batch does
    loop_trace = time.monotonic() - started
    loop(args.warmup)
    timer = _alternate(args, loop)
    fit_model.fit(
        dataset,
        epochs=1,
        steps_per_epoch=args.warmup + args.rounds * args.steps,
        callbacks=[timer],
        shuffle=False,
        verbose=0,
    )
    return {
        "fit": statistics.median(timer.fit_rates),
        "loop": statistics.median(timer.loop_rates),
        "fit_rates": timer.fit_rates,
        "loop_rates": timer.loop_rates,
        "fit_trace_s": timer.trace,
        "loop_trace_s": loop_trace,
        "device": _device(tf),
    }


def _plain_loop(model, iterator, mixed_precision: bool):
    """``loop(steps) -> last loss``: a plain ``tf.function`` training step, the yardstick."""
    import keras
    import tensorflow as tf

    from remap_tf.losses import TripletLoss

    loss_fn = TripletLoss()
    optimizer = keras.optimizers.Adam(1e-5)
    if mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    def loop(steps):
        loss = None
        for _ in range(steps):
            x, y = next(iterator)
            loss = train_step(x, y)
        return float(loss)  # waits for the last step

    return loop


def _alternate(args, loop):
    """A callback that times every ``args.steps`` fit steps end to end, then runs a timed
    plain-loop round of the same length (so both sides see the same machine load)."""
    import keras

    class Alternate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.mark = None
            self.count = 0
            self.trace = None
            self.fit_rates, self.loop_rates = [], []

        def on_train_begin(self, logs=None):
            self.start = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if batch < args.warmup:  # the first call traces the train function
                self.trace = now - self.start if batch == 0 else self.trace
                self.mark = now
                return
            self.count += 1
            if self.count < args.steps:
                return
            self.fit_rates.append(args.steps * args.batch_size / (now - self.mark))
            started = time.monotonic()
            loop(args.steps)
            self.loop_rates.append(args.steps * args.batch_size / (time.monotonic() - started))
            self.count = 0
            self.mark = time.monotonic()

    return Alternate()


def _device(tf) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU ({details.get('device_name', gpus[0].name)})"


def markdown(args, result, command: str, load: str) -> str:
    from bench.report import machine_line

    ratio = result["fit"] / result["loop"]
    rounds = ", ".join(
        f"{a:.1f}/{b:.1f}" for a, b in zip(result["fit_rates"], result["loop_rates"], strict=True)
    )
    return "\n".join(
        [
            "## Training throughput: model.fit vs a plain tf.function step",
            "",
            f"Command: `{command}`  ",
            f"Machine: {machine_line()}; device: {result['device']}; load average at start: "
            f"{load} (cores shared with other jobs, so absolute rates are noisy; the ratio "
            "comes from alternating rounds in one run).",
            "",
            f"REMAP on {args.backbone}, {args.image_size} px, batch {args.batch_size}, "
            f"{'mixed_float16' if args.mixed_precision else 'float32'}, triplet loss, Adam, "
            f"no XLA; {args.rounds} rounds × {args.steps} timed steps each.",
            "",
            "| loop | images/s (median) | first step incl. tracing, s |",
            "|---|---|---|",
            f"| `model.fit` | {result['fit']:.2f} | {result['fit_trace_s']:.0f} |",
            f"| plain `tf.function` step | {result['loop']:.2f} | {result['loop_trace_s']:.0f} |",
            "",
            f"**Ratio fit / plain: {ratio:.3f}** (target >= 0.95). Per round, fit/plain "
            f"images/s: {rounds}.",
        ]
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    result = run(args)
    command = "python -m bench.train_throughput " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(args, result, command.strip(), load)
    print(md)
    if not args.no_write:
        from bench.report import write_section

        write_section("training", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
