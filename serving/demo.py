"""`remap demo`: train, export, index and search REMAP on the photos inside scikit-image.

One command, offline, on a laptop CPU, shows the whole path of this project:

1. **data**: `training.photoset.make_photo_views` turns the photographs bundled with
   scikit-image into an instance-retrieval set (views of each photo; train and test split by
   photo; test groups plus distractors);
2. **models**: REMAP on a small random-initialised backbone (or ``--weights``), and the
   R-MAC, GeM and MAC baselines on the same backbone, the same initial weights and the same
   training budget;
3. **initialise** REMAP's region weights by KL divergence
   (`remap_tf.region_weights.init_region_weights`);
4. **train** each with ``model.fit`` (`training.fit.fit_model`: triplet loss with batch-hard
   mining on class-balanced P×K batches from `training.pipeline.make_train_dataset`), for
   ``steps`` steps or ``minutes`` minutes, whichever comes first;
5. **export** the trained REMAP in TF Serving layout (`export.saved_model.export_model`);
6. **embed** the test database through the exported SavedModel (`serving.client.LocalEmbedder`)
   or through a running TF Serving (``--serving host:port``);
7. **index** the descriptors with ScaNN (`serving.index.ScannIndex`) and **search** every
   test image against the rest;
8. **evaluate** mAP (`remap_tf.evaluation`, every image of a group is a query against all the
   others, as in INRIA Holidays) and **report**: a table of test mAP, ``report.html`` with
   the queries' top results (`serving.report.write_report`), the training curves and the
   region weights (`serving.figures`).

The untrained row is REMAP as built, before KL initialisation and training (all region weights
1, i.e. R-MAC pooling on the random backbone), so the table shows what training bought.

BatchNorm: the random backbone is used with its BatchNorm layers frozen at their initial
statistics (identity), during training too. Recalibrating them on the training photos
(`remap_tf.recalibrate_batch_norm`) lowered the untrained and the trained mAP on this data
(measured: test mAP 0.47 -> 0.27 untrained, and training then stalled), and letting them
train makes inference use stale moving averages after a few hundred steps.

Everything is written under ``out_dir``; running again over an earlier run reuses the photo
set, adds a new SavedModel version and replaces the index, report and results atomically.

Reference: Husain & Bober, "REMAP: Multi-layer entropy-guided pooling of dense CNN features
for image retrieval", IEEE TIP 2019.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = "demo_out"
DEFAULT_BACKBONE = "mobilenet_v2"
# Width multiplier used for the MobileNets unless --alpha says otherwise: 0.35 is the
# smallest MobileNetV2 with ImageNet weights in keras.applications.
DEFAULT_ALPHA = {"mobilenet_v2": 0.35, "mobilenet": 0.25}
POOLING_NAMES = {"remap": "REMAP", "rmac": "R-MAC", "gem": "GeM", "mac": "MAC", "spoc": "SPoC"}
TRAINED = ("remap", "rmac", "gem", "mac")
# REMAP's region grid: 4 scales on a 24x32 reference map, the paper's 40 regions.
LEVELS, GRID_SHAPE = 4, (24, 32)


@dataclasses.dataclass
class DemoConfig:
    """Everything `run_demo` needs; the CLI flags map one to one onto these fields.

    Attributes:
        out_dir: the folder everything is written to.
        seed: fixes the photo set, the initial weights and the training batches.
        minutes: training time limit per model, in minutes: a cap that keeps the demo
            under 10 minutes on a slow or busy machine. Training normally stops after
            ``steps`` steps, so that the seed, not the machine's speed, decides the numbers.
        steps: training steps per model.
        backbone: a `remap_tf.backbones.BACKBONES` name.
        alpha: width multiplier for the MobileNets (None: `DEFAULT_ALPHA`).
        weights: backbone weights: None (random init), ``"imagenet"`` or a file.
        serving: ``host:port`` of a TF Serving gRPC endpoint serving ``out_dir/models/remap``
            (the demo waits for it to load the version it exported); None embeds in-process.
        image_size: side of the square views, in pixels.
        views_per_photo: views of each photo (each test group: 1 query + the rest).
        distractors_per_photo: views of each training photo added to the test database.
        test_fraction: fraction of the photos held out for test.
        photos: names from `training.photoset.PHOTOS` (None: all 18).
        poolings: the trained models, REMAP first.
        classes_per_batch, images_per_class: the P×K batch.
        learning_rate: Adam's peak learning rate (cosine decay over ``steps``).
        margin: triplet margin.
        mining: online mining of `remap_tf.losses.TripletLoss`. Measured on the default
            set (REMAP, 200 steps, seed 0, untrained test mAP 0.469): batch-hard at 1e-3
            gave 0.725, semi-hard at 1e-3 0.690; at 1e-4 batch-hard 0.571, semi-hard 0.601,
            batch-all 0.616. PCA whitening initialised from the training views lowered it
            (0.610): 144 views are too few to estimate a 1376-dimensional whitening.
        top_k: results per query shown in the report.
    """

    out_dir: str = DEFAULT_OUT
    seed: int = 0
    minutes: float = 1.5
    steps: int = 200
    backbone: str = DEFAULT_BACKBONE
    alpha: float | None = None
    weights: str | None = None
    serving: str | None = None
    image_size: int = 96
    views_per_photo: int = 12
    distractors_per_photo: int = 2
    test_fraction: float = 0.35
    photos: list[str] | None = None
    poolings: tuple[str, ...] = TRAINED
    classes_per_batch: int = 6
    images_per_class: int = 4
    learning_rate: float = 1e-3
    margin: float = 0.1
    mining: str = "batch_hard"
    top_k: int = 8

    def validate(self) -> DemoConfig:
        """Checks every field once; ValueError naming the field and the value received."""
        from remap_tf.backbones import get_spec

        get_spec(self.backbone)
        if not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise ValueError(f"--minutes must be a number > 0, received {self.minutes!r}.")
        for name, minimum in (
            ("steps", 1),
            ("seed", 0),
            ("image_size", 64),
            ("views_per_photo", 3),
            ("distractors_per_photo", 0),
            ("classes_per_batch", 2),
            ("images_per_class", 2),
            ("top_k", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be an integer >= {minimum}, received {value!r}.")
        if self.images_per_class > self.views_per_photo:
            raise ValueError(
                f"images_per_class ({self.images_per_class}) cannot exceed --views-per-photo "
                f"({self.views_per_photo})."
            )
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"--alpha must be > 0, received {self.alpha!r}.")
        if self.weights not in (None, "imagenet") and not os.path.isfile(self.weights):
            raise FileNotFoundError(
                f"--weights {self.weights!r} is neither 'imagenet' nor an existing weights file."
            )
        if not self.poolings or self.poolings[0] != "remap":
            raise ValueError(f"poolings must start with 'remap', received {self.poolings!r}.")
        unknown = [p for p in self.poolings if p not in POOLING_NAMES]
        if unknown:
            raise ValueError(f"Unknown poolings {unknown}; expected {sorted(POOLING_NAMES)}.")
        if self.serving is not None and ":" not in self.serving:
            raise ValueError(f"--serving must be host:port, received {self.serving!r}.")
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {self.out_dir!r} exists and is not a folder.")
        return self

    def backbone_kwargs(self) -> dict:
        alpha = self.alpha if self.alpha is not None else DEFAULT_ALPHA.get(self.backbone)
        return {"alpha": alpha} if alpha is not None else {}


@dataclasses.dataclass
class DemoResult:
    """What `run_demo` produced.

    Attributes:
        table: rows ``{"model", "pooling", "trained", "mAP", "mP@1", "mP@5", "steps",
            "train_seconds", "stopped_by_time_limit"}``, untrained first.
        paths: name -> path of everything written (data, SavedModel, index, report, ...).
        seconds: wall-clock seconds of the whole run.
        max_export_difference: largest absolute difference between the exported model's
            descriptors and the Keras model's on the test database.
    """

    table: list[dict]
    paths: dict[str, Path]
    seconds: float
    max_export_difference: float | None


# ---------------------------------------------------------------------------------------
# Command line


def add_parsers(subparsers) -> None:
    """Registers ``remap demo`` (no TensorFlow import here)."""
    parser = subparsers.add_parser(
        "demo",
        help="train, export, index and search REMAP on the photos inside scikit-image",
        description=(
            "Builds a retrieval set from the photographs bundled with scikit-image, trains "
            "REMAP and the R-MAC, GeM and MAC baselines on a small backbone, exports REMAP "
            "for TF Serving, indexes the test photos with ScaNN, searches them, prints a "
            "mAP table and writes OUT/report.html. Offline; under 10 minutes on 2 CPU cores."
        ),
    )
    defaults = DemoConfig()
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="output folder; reruns reuse it (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=defaults.minutes,
        help="training time limit per model, minutes (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="training steps per model, if the time limit allows (default: %(default)s)",
    )
    parser.add_argument(
        "--backbone", default=DEFAULT_BACKBONE, help="backbone name (default: %(default)s)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="MobileNet width multiplier (default: 0.35 for mobilenet_v2, 0.25 for mobilenet)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="backbone weights: 'imagenet' (downloaded by Keras) or a weights file "
        "(default: random initialisation)",
    )
    parser.add_argument(
        "--serving",
        default=None,
        metavar="HOST:PORT",
        help="embed through the gRPC port of a TF Serving that serves OUT/models/remap as "
        "model 'remap' (default: the exported SavedModel, in-process)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=defaults.image_size,
        help="side of the square views, pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--views-per-photo",
        type=int,
        default=defaults.views_per_photo,
        help="views made of each photo (default: %(default)s)",
    )
    parser.set_defaults(func=_command)


def _command(args) -> int:
    # TensorFlow's C++ start-up notices (oneDNN, CUDA probing) are noise in a demo's output.
    # Level 3 also hides the "failed call to cuInit" error every CPU-only machine prints.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    config = DemoConfig(
        out_dir=args.out,
        seed=args.seed,
        minutes=args.minutes,
        steps=args.steps,
        backbone=args.backbone,
        alpha=args.alpha,
        weights=args.weights,
        serving=args.serving,
        image_size=args.image_size,
        views_per_photo=args.views_per_photo,
        images_per_class=min(DemoConfig.images_per_class, args.views_per_photo),
    )
    result = run_demo(config)
    return 0 if result.table else 1


# ---------------------------------------------------------------------------------------
# The pipeline


class _Status:
    """One status line per step, with the elapsed time: ``[ 12.3s] step: message``."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.start = time.monotonic()

    def __call__(self, step: str, message: str) -> None:
        self.log(f"[{time.monotonic() - self.start:6.1f}s] {step}: {message}")


@dataclasses.dataclass
class _Data:
    """The photo set, in the forms the pipeline needs."""

    views: object  # training.photoset.PhotoViews
    test: object  # remap_tf.datasets.RetrievalDataset of the test groups + distractors
    ids: list  # database ids: paths relative to the photo set ("test/coffee/coffee_001.jpg")
    pixels: list  # database images, float32 (h, w, 3) 0-255, decoded by Pillow
    train_images: object  # float32 (num_train, h, w, 3), for the KL initialisation
    train_labels: object  # int32 (num_train,)


def _print(line: str) -> None:
    print(line, flush=True)  # shown at once even when stdout is a pipe (CI logs, tee)


def run_demo(config: DemoConfig, log: Callable[[str], None] = _print) -> DemoResult:
    """Runs the demo end to end (see the module docstring) and writes ``config.out_dir``.

    Each model is built after ``keras.backend.clear_session()`` and
    ``keras.utils.set_random_seed(config.seed)``, so that all start from the same backbone
    weights; models the caller built before are not affected, but Keras' layer-name counters
    restart.

    Args:
        config: a `DemoConfig`.
        log: receives one line per step, and the final table.

    Returns:
        a `DemoResult`.

    Raises:
        ValueError / FileNotFoundError: a bad option (named), or an unreachable ``serving``.
    """
    config.validate()
    status = _Status(log)
    if config.serving:
        _check_server(config.serving)
        status("serving", f"TF Serving answers at {config.serving}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _make_data(config, out, status)
    status("tensorflow", "importing TensorFlow and Keras")
    import tensorflow as tf

    rows: list[dict] = []
    curves: dict[str, tuple[list[int], list[float]]] = {}
    state: dict = {}
    logger, level = tf.get_logger(), tf.get_logger().level
    with warnings.catch_warnings():
        # Noise, not news, for a demo user: Keras notes that tf.data datasets are not
        # shuffled by fit, and tf.function notes the retracing of predict for each model.
        warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
        logger.setLevel("ERROR")
        try:
            for pooling in config.poolings:
                rows.extend(_run_model(pooling, config, out, data, curves, state, status))
        finally:
            logger.setLevel(level)

    paths: dict[str, Path] = {"data": data.views.root, "saved_model": state["version_dir"]}
    paths["index"] = state["index"].save(out / "index")
    status("index", f"ScaNN index of {len(data.ids)} REMAP descriptors saved to {paths['index']}")
    paths.update(_write_outputs(config, out, data, rows, curves, state))
    seconds = time.monotonic() - status.start
    log("")
    log(format_table(rows))
    log("")
    log("Wrote:")
    for key, path in paths.items():
        log(f"  {key:<14} {path}")
    log(f"Done in {seconds / 60:.1f} minutes.")
    return DemoResult(
        table=rows,
        paths=paths,
        seconds=seconds,
        max_export_difference=state.get("difference"),
    )


def _make_data(config: DemoConfig, out: Path, status) -> _Data:
    """Writes (or refreshes) the photo set under ``out/data`` and loads what is needed."""
    from remap_tf.datasets import load_groups_json
    from training.photoset import load_images, make_photo_views

    views = make_photo_views(
        out / "data",
        seed=config.seed,
        views_per_photo=config.views_per_photo,
        image_size=config.image_size,
        test_fraction=config.test_fraction,
        distractors_per_photo=config.distractors_per_photo,
        photos=config.photos,
    )
    images, labels, _ = load_images(views.train_csv)
    test = load_groups_json(views.test_groups_json)
    status(
        "data",
        f"{len(views.train_photos)} training photos ({len(images)} views), "
        f"{len(views.test_photos)} test photos + {test.info['distractors']} distractors "
        f"({len(test.database)} database images) in {views.root}",
    )
    return _Data(
        views=views,
        test=test,
        ids=[Path(os.path.relpath(p, views.root)).as_posix() for p in test.database],
        pixels=_load_pixels(test.database),
        train_images=images,
        train_labels=labels,
    )


def _run_model(pooling: str, config: DemoConfig, out: Path, data: _Data, curves, state, status):
    """Builds, (initialises,) trains and evaluates one pooling; returns its table rows.

    For REMAP also: the untrained row, the KL initialisation, the export, the embedding
    through the exported model (or TF Serving), and ``state`` (index, rankings,
    descriptors, region weights) for the report.
    """
    import keras
    import numpy as np

    from remap_tf.model import get_region_weights
    from remap_tf.region_weights import init_region_weights

    name = POOLING_NAMES[pooling]
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)  # every pooling starts from the same backbone
    model = _build_model(config, pooling)
    status(name, f"built {model.name}: {model.count_params():,} weights")
    rows = []
    if pooling == "remap":
        untrained = _embed_in_process(model, data.pixels)
        row, _, _ = _evaluate("untrained REMAP (= R-MAC, random init)", pooling, untrained, data)
        row["trained"] = False
        rows.append(row)
        state["similarity"] = [_mean_similarity(untrained)]
        status(name, f"untrained test mAP {row['mAP']:.3f}")
        started = time.monotonic()
        initial = init_region_weights(
            model, data.train_images, data.train_labels, batch_size=32, seed=config.seed
        )
        status(
            name,
            f"region weights initialised by KL divergence ({initial.shape[0]} layers x "
            f"{initial.shape[1]} regions, {time.monotonic() - started:.1f}s)",
        )
    steps, losses, done, seconds, stopped = _train(model, config, data.views.train_csv, name)
    curves[name] = (steps, losses)
    if stopped:
        status(name, f"the {config.minutes:g}-minute time limit stopped training at step {done}")
    if pooling == "remap":
        state["region_weights"] = (initial, get_region_weights(model))
        reference = _embed_in_process(model, data.pixels)
        descriptors = _export_and_embed(model, config, out, data.test.database, state, status)
        state["difference"] = float(np.abs(descriptors - reference).max())
        status(
            "export",
            f"exported vs Keras descriptors: max |difference| {state['difference']:.1e} "
            "(TF's and Pillow's JPEG decoders differ slightly)",
        )
        label = "REMAP trained (KL-initialised)"
    else:
        descriptors = _embed_in_process(model, data.pixels)
        label = f"{name} trained"
    row, index, rankings = _evaluate(label, pooling, descriptors, data)
    row.update(steps=done, train_seconds=round(seconds, 1), stopped_by_time_limit=stopped)
    if pooling == "remap":
        state.update(index=index, rankings=rankings, descriptors=descriptors)
        state["similarity"].append(_mean_similarity(descriptors))
    rows.append(row)
    status(name, f"test mAP {row['mAP']:.3f} after {done} steps ({seconds:.0f}s)")
    return rows


def _build_model(config: DemoConfig, pooling: str):
    """The model for ``pooling``, its BatchNorm layers frozen (see the module docstring)."""
    from remap_tf.backbones import batch_norm_layers
    from remap_tf.model import REMAP

    model = REMAP(
        config.backbone,
        pooling=pooling,
        levels=LEVELS,
        grid_shape=GRID_SHAPE,
        weights=config.weights,
        input_shape=(None, None, 3),
        backbone_kwargs=config.backbone_kwargs() or None,
    )
    for layer in batch_norm_layers(model):
        layer.trainable = False
    return model


def _tap_name(config: DemoConfig, layer: int) -> str:
    from remap_tf.backbones import get_spec

    taps = get_spec(config.backbone).taps
    return taps[layer] if layer < len(taps) else str(layer)


def _train(model, config: DemoConfig, train_csv: Path, name: str):
    """Fits ``model`` with `training.fit.fit_model` for ``config.steps`` steps at most.

    Returns:
        ``(steps, losses, done, seconds, stopped)``: the step at each epoch end and the
        epoch's mean loss (the training curve), the steps run, the seconds spent in ``fit``,
        and whether the ``config.minutes`` time limit stopped it.
    """
    from training.config import TrainConfig
    from training.data import load_manifest
    from training.fit import fit_model
    from training.pipeline import make_train_dataset

    # Epochs of up to 10 steps (a point of the curve each), exactly config.steps in all.
    steps_per_epoch = max(d for d in range(1, 11) if config.steps % d == 0)
    epochs = config.steps // steps_per_epoch
    manifest = load_manifest(train_csv)
    classes = min(config.classes_per_batch, manifest.num_classes)
    train_config = TrainConfig.from_dict(
        {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "time_limit": config.minutes * 60.0,
            "verbose": 0,
            "seed": config.seed,
            "optimizer": {"learning_rate": config.learning_rate},
            "loss": {"margin": config.margin, "mining": config.mining},
            "data": {
                "train": str(train_csv),
                "image_size": config.image_size,
                "classes_per_batch": classes,
                "images_per_class": config.images_per_class,
            },
        }
    ).validate()
    dataset = make_train_dataset(
        manifest,
        image_size=config.image_size,
        classes_per_batch=classes,
        images_per_class=config.images_per_class,
        seed=config.seed,
    )
    progress = _progress_callback(config.steps, f"  training {name}")
    started = time.monotonic()
    history = fit_model(model, dataset, train_config, callbacks=[progress])
    seconds = time.monotonic() - started
    progress.finish()
    stopped = bool(history.time_limit is not None and history.time_limit.stopped)
    losses = [float(v) for v in history.history.get("loss", [])]
    steps = [min((i + 1) * steps_per_epoch, progress.step) for i in range(len(losses))]
    return steps, losses, progress.step, seconds, stopped


def _progress_callback(total: int, label: str):
    """A Keras callback drawing a `keras.utils.Progbar` over ``total`` training steps."""
    import keras

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.loss = float("nan")
            print(label, flush=True)
            self.bar = keras.utils.Progbar(total, stateful_metrics=["loss"])

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            self.loss = float((logs or {}).get("loss", float("nan")))
            self.bar.update(self.step, values=[("loss", self.loss)])

        def finish(self):
            """Closes the bar when the time limit stopped training before ``total``."""
            if self.step < total:
                self.bar.update(self.step, values=[("loss", self.loss)], finalize=True)

    return Progress()


def _load_pixels(paths) -> list:
    """Decodes images to float32 RGB arrays ``(h, w, 3)`` 0-255 with Pillow."""
    import numpy as np
    from PIL import Image

    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    return pixels


def _embed_in_process(model, pixels) -> object:
    """Descriptors ``(num_images, dim)`` of same-sized images from the Keras model."""
    import numpy as np

    batch = np.stack(pixels)
    return np.asarray(model.predict(batch, batch_size=32, verbose=0), dtype=np.float32)


def _export_and_embed(model, config: DemoConfig, out: Path, database: list, state, status):
    """Exports ``model`` as a new version of ``out/models/remap`` and embeds ``database``.

    Sets ``state["version_dir"]`` and ``state["embedder"]`` (where the descriptors came from).

    Returns:
        float32 ``(len(database), dim)`` descriptors from the exported model.
    """
    from export.saved_model import export_model
    from serving.client import LocalEmbedder, make_embedder

    started = time.monotonic()
    version_dir = export_model(
        model,
        out / "models" / "remap",
        image_size=config.image_size,
        config={"demo": _jsonable(config)},
        warmup_images=database[:4],
        model_name="remap",
    )
    status("export", f"SavedModel written to {version_dir} ({time.monotonic() - started:.0f}s)")
    started = time.monotonic()
    if config.serving:
        embedder = make_embedder(config.serving, model_name="remap")
        _wait_for_version(embedder, int(version_dir.name), config.serving)
        where = f"TF Serving at {config.serving}"
    else:
        embedder = LocalEmbedder(version_dir)
        where = "the exported SavedModel in this process"
    descriptors = embedder.embed(database)
    status(
        "embed",
        f"{len(database)} database images through {where} ({time.monotonic() - started:.1f}s)",
    )
    state.update(version_dir=version_dir, embedder=where)
    return descriptors


def _check_server(target: str) -> None:
    """Fails fast, before any training, when no TF Serving answers at ``target``.

    Raises:
        serving.client.ServerUnavailableError: nothing answers (one-line CLI error).
    """
    from serving.client import ModelNotFoundError, make_embedder

    client = make_embedder(target, model_name="remap", timeout=5.0, retries=1)
    try:
        client.metadata()
    except ModelNotFoundError:
        pass  # the server is up; the model appears once the demo has exported it
    finally:
        client.close()


def _wait_for_version(client, version: int, target: str, timeout: float = 120.0) -> None:
    """Waits until TF Serving serves ``version`` (it polls the base path for new versions)."""
    from serving.client import ModelNotFoundError

    deadline = time.monotonic() + timeout
    served = None
    while time.monotonic() < deadline:
        try:
            served = client.metadata().get("version")
        except ModelNotFoundError:
            served = None
        if served is not None and int(served) >= version:
            return
        time.sleep(2.0)
    raise ValueError(
        f"TF Serving at {target} still serves version {served} of model 'remap' after "
        f"{timeout:.0f}s, not the exported version {version}; is its --model_base_path the "
        "demo's models/remap folder?"
    )


def _scores_uninformative(state) -> bool:
    """True when the trained descriptors are so alike that similarities print as 1.000."""
    return state["similarity"][-1] > 0.995


def _mean_similarity(descriptors) -> float:
    """Mean cosine similarity over all pairs of distinct rows of L2-normalised descriptors."""
    n = len(descriptors)
    gram = descriptors @ descriptors.T
    return float((gram.sum() - gram.trace()) / max(n * (n - 1), 1))


def _evaluate(label: str, pooling: str, descriptors, data: _Data):
    """Indexes ``descriptors`` with ScaNN, searches every test query, scores the rankings.

    Returns:
        ``(row, index, rankings)``: the table row (``mAP``, ``mP@1``, ``mP@5``, per-query
        ``ap``), the `serving.index.ScannIndex` and the ``(num_queries, num_database)``
        rankings (database indices, best first; the query itself included, as junk).
    """
    import numpy as np

    from serving.index import ScannIndex

    index = ScannIndex(dim=descriptors.shape[1])
    index.add(data.ids, descriptors)
    positions = {i: n for n, i in enumerate(data.ids)}
    query_rows = [data.test.database.index(q.path) for q in data.test.queries]
    found, _ = index.search(descriptors[query_rows], k=len(data.ids))
    rankings = np.array([[positions[i] for i in row] for row in found], dtype=np.int64)
    scores = data.test.evaluate(rankings)["default"]
    row = {
        "model": label,
        "pooling": pooling,
        "trained": True,
        "mAP": scores["mAP"],
        "mP@1": scores["mP@1"],
        "mP@5": scores["mP@5"],
        "ap": scores["ap"],
        "steps": 0,
        "train_seconds": 0.0,
        "stopped_by_time_limit": False,
    }
    return row, index, rankings


def format_table(rows) -> str:
    """The mAP table as aligned text."""
    header = f"{'model':<40} {'test mAP':>8} {'mP@1':>6} {'mP@5':>6} {'steps':>6} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        note = " (time limit)" if row["stopped_by_time_limit"] else ""
        lines.append(
            f"{row['model']:<40} {row['mAP']:>8.3f} {row['mP@1']:>6.3f} {row['mP@5']:>6.3f} "
            f"{row['steps']:>6d} {row['train_seconds']:>8.0f}{note}"
        )
    return "\n".join(lines)


def _jsonable(config: DemoConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _write_outputs(config: DemoConfig, out: Path, data: _Data, rows, curves, state) -> dict:
    """Figures, report.html (+ report.png) and results.json; returns their paths."""
    from remap_tf.regions import rmac_regions
    from serving.figures import region_weights_svg, training_curve_svg, write_svg
    from serving.report import write_report

    views, test, ids = data.views, data.test, data.ids
    paths = {}
    figures = out / "figures"
    mining = config.mining.replace("_", "-")
    paths["training_curve"] = write_svg(
        figures / "training_curve.svg",
        training_curve_svg(curves, title=f"Training loss ({mining} triplet, mean per epoch)"),
    )
    initial, learned = state["region_weights"]
    region_rows = []
    for layer in range(initial.shape[0]):
        tap = _tap_name(config, layer)
        region_rows.append((f"layer {layer + 1}: {tap}\nKL init", initial[layer]))
        region_rows.append((f"layer {layer + 1}: {tap}\nlearned", learned[layer]))
    paths["region_weights"] = write_svg(
        figures / "region_weights.svg",
        region_weights_svg(
            region_rows,
            rmac_regions(*GRID_SHAPE, LEVELS),
            grid_shape=GRID_SHAPE,
            title="REMAP region weights: KL-divergence initialisation and after training",
        ),
    )
    # The report shows one query per test photo (its first view) with its top results.
    # Items are given as paths relative to the photo set, from inside it, so that the
    # report's captions read "test/coffee/coffee_001.jpg" rather than absolute paths.
    rankings, descriptors, ap = state["rankings"], state["descriptors"], rows[1]["ap"]
    first: dict[str, int] = {}
    for q, query in enumerate(test.queries):
        first.setdefault(query.name.split(":", 1)[0], q)
    queries, results, relevance, aps, scores, names = [], [], [], [], [], []
    for photo, q in first.items():
        query = test.queries[q]
        row = test.database.index(query.path)
        positives = set(query.groundtruth["default"][0])
        top = [int(i) for i in rankings[q] if int(i) != row][: config.top_k]
        queries.append(ids[row])
        results.append([ids[i] for i in top])
        relevance.append([i in positives for i in top])
        aps.append(float(ap[q]))
        scores.append([float(descriptors[row] @ descriptors[i]) for i in top])
        names.append(f"{photo}: {ids[row]}")
    extra = _report_html(config, rows, state, views, test)
    with _working_directory(views.root):
        write_report(
            out.resolve() / "report.html",
            queries=queries,
            results=results,
            relevance=relevance,
            ap=aps,
            scores=None if _scores_uninformative(state) else scores,
            query_names=names,
            title="remap demo: REMAP on the photos inside scikit-image",
            extra_sections_html=extra,
            thumb_size=128,
        )
    paths["report"] = out / "report.html"
    paths["report_png"] = out / "report.png"
    results_json = {
        "config": _jsonable(config),
        "table": [{k: v for k, v in row.items() if k != "ap"} for row in rows],
        "saved_model": str(state["version_dir"]),
        "embedded_through": state["embedder"],
        "max_export_difference": state.get("difference"),
        "train_photos": list(views.train_photos),
        "test_photos": list(views.test_photos),
    }
    paths["results"] = _write_text(out / "results.json", json.dumps(results_json, indent=2))
    return paths


def _report_html(config: DemoConfig, rows, state, views, test) -> str:
    """The report's sections above the query grid: mAP table, figures, what was run."""
    best_baseline = max((r for r in rows[2:]), key=lambda r: r["mAP"], default=None)
    table = [
        "<table class=metrics><tr><th>model</th><th>test mAP</th><th>mP@1</th>"
        "<th>mP@5</th><th>training steps</th><th>training time</th></tr>"
    ]
    for row in rows:
        strong = " style='font-weight:bold'" if row["pooling"] == "remap" and row["trained"] else ""
        note = " (time limit)" if row["stopped_by_time_limit"] else ""
        table.append(
            f"<tr{strong}><td style='text-align:left'>{html.escape(row['model'])}</td>"
            f"<td>{row['mAP']:.3f}</td><td>{row['mP@1']:.3f}</td><td>{row['mP@5']:.3f}</td>"
            f"<td>{row['steps']}</td><td>{row['train_seconds']:.0f} s{note}</td></tr>"
        )
    table.append("</table>")
    verdict = (
        f"Training raised REMAP's test mAP from {rows[0]['mAP']:.3f} to {rows[1]['mAP']:.3f}"
        if rows[1]["mAP"] > rows[0]["mAP"]
        else f"Training did not raise REMAP's test mAP ({rows[0]['mAP']:.3f} before, "
        f"{rows[1]['mAP']:.3f} after)"
    )
    if best_baseline is not None:
        verdict += (
            f"; the best baseline, {best_baseline['model']}, reached {best_baseline['mAP']:.3f}."
        )
    untrained_similarity, trained_similarity = state["similarity"]
    collapse_note = score_note = ""
    if _scores_uninformative(state):
        collapse_note = (
            " A random backbone maps every image to almost the same descriptor, so distances "
            f"are tiny next to the triplet margin ({config.margin:g}) and the loss can stay near "
            "the margin while the rankings, and the mAP, already improve."
        )
        score_note = (
            "its rank and file (not its similarity to the query: they would all print as 1.000)"
        )
    else:
        score_note = "its rank, its cosine similarity to the query and its file"
    alpha = config.backbone_kwargs().get("alpha")
    backbone = config.backbone + (f" (alpha {alpha})" if alpha else "")
    weights = config.weights or "random initialisation"
    return f"""
<style>
table.metrics {{ border-collapse: collapse; margin: 0.5em 0 1em 0; }}
table.metrics td, table.metrics th {{ border: 1px solid #ccc; padding: 4px 10px; font-size: 14px;
  text-align: right; max-width: none; word-break: normal; }}
table.metrics th {{ background: #f2f2f2; }}
.figure img {{ max-width: 100%; max-height: none; border: none; }}
p.note {{ color: #444; max-width: 60em; }}
</style>
<h2>Test mAP</h2>
<p class=note>{len(views.test_photos)} test photos never seen in training
({html.escape(", ".join(views.test_photos))}), {config.views_per_photo} views each, plus
{test.info["distractors"]} distractor views of the training photos: {len(test.database)} database
images. Every test view is a query against all the other images (INRIA Holidays-style mAP).
Backbone {html.escape(backbone)}, {html.escape(weights)},
{config.image_size}&times;{config.image_size} px; each model trained with the same budget
({config.steps} steps of
{config.classes_per_batch}&times;{config.images_per_class} images, at most {config.minutes:g}
min) from the same initial weights.</p>
{"".join(table)}
<p class=note>{html.escape(verdict)}</p>
<h2>Training curves</h2>
<div class=figure><img src="figures/training_curve.svg" alt="training loss per step"></div>
<p class=note>Mean cosine similarity between two database images: {untrained_similarity:.4f}
before training, {trained_similarity:.4f} after it (REMAP).{collapse_note}</p>
<h2>Region weights</h2>
<p class=note>REMAP's weight for each of the 40 R-MAC regions in each tapped layer, before
(KL-divergence initialisation) and after training. Each panel is one scale; a tile stands for
one region at its place in the image (regions of a scale overlap by about 40%).</p>
<div class=figure><img src="figures/region_weights.svg" alt="region weight heatmaps"></div>
<h2>Queries and their top {config.top_k} results (trained REMAP, ScaNN)</h2>
<p class=note>The first view of each test photo, embedded through
{html.escape(state["embedder"])} and searched in the ScaNN index; under each result,
{score_note}. The AP under a query is that query's over the
whole database; the mAP in the line at the top of the page averages only the
{len(views.test_photos)} queries shown here, while the table above averages every test view
as a query.</p>
"""


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _write_text(path: Path, text: str) -> Path:
    from remap_tf.io import atomic_write_text  # lazy: importing remap_tf loads TensorFlow

    return atomic_write_text(path, text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":  # pragma: no cover
    from serving.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
