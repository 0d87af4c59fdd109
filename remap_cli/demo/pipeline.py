"""`remap demo`: train, export, index and search REMAP on the photos inside scikit-image.

One command, offline, on a laptop CPU, shows the whole path of this project:

1. **data**: `remap_cli.demo.photoset.make_photo_views` turns the photographs bundled with
   scikit-image into an instance-retrieval set (views of each photo; train and test split by
   photo; test groups plus distractors);
2. **models**: REMAP on a small random-initialised backbone (or ``--weights``), and the
   R-MAC, GeM and MAC baselines on the same backbone, the same initial weights and the same
   training budget;
3. **initialise** REMAP's region weights by KL divergence
   (`remap_tf.region_weights.init_region_weights`);
4. **train** each with ``model.fit`` (`remap_tf.training.fit.fit_model`: triplet loss with
   batch-hard mining on class-balanced P×K batches from
   `remap_tf.training.pipeline.make_train_dataset`), for ``steps`` steps or ``minutes``
   minutes, whichever comes first;
5. **export** the trained REMAP in TF Serving layout (`remap_tf.export.saved_model.export_model`);
6. **embed** the test database through the exported SavedModel
   (`remap_tf.serving.client.LocalEmbedder`) or through a running TF Serving
   (``--serving host:port``);
7. **index** the descriptors with ScaNN (`remap_tf.serving.index.ScannIndex`) and **search** every
   test image against the rest;
8. **evaluate** mAP (`remap_tf.evaluation`, every image of a group is a query against all the
   others, as in INRIA Holidays) and **report**: a table of test mAP, ``report.html`` with
   the queries' top results (`remap_tf.serving.report.write_report`), the training curves and the
   region weights (`remap_cli.demo.figures`).

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

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from remap_cli.demo.config import GRID_SHAPE, LEVELS, DemoConfig, DemoResult, config_json
from remap_cli.demo.photoset import PhotoViews, load_images, make_photo_views
from remap_cli.demo.report import RemapOutcome, format_table, table_row, write_outputs
from remap_tf.backbones import batch_norm_layers
from remap_tf.datasets import RetrievalDataset, load_groups_json
from remap_tf.errors import InvalidInputError, ModelNotFoundError
from remap_tf.export.saved_model import export_model
from remap_tf.model import REMAP, get_region_weights
from remap_tf.region_weights import init_region_weights
from remap_tf.serving.client import LocalEmbedder, make_embedder
from remap_tf.serving.index import ScannIndex
from remap_tf.specs import POOLING_NAMES
from remap_tf.training.config import TrainConfig
from remap_tf.training.data import load_manifest
from remap_tf.training.fit import fit_model
from remap_tf.training.pipeline import make_train_dataset


class _Status:
    """One status line per step, with the elapsed time: ``[ 12.3s] step: message``."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.start = time.monotonic()

    def __call__(self, step: str, message: str) -> None:
        self.log(f"[{time.monotonic() - self.start:6.1f}s] {step}: {message}")


@dataclasses.dataclass
class DemoData:
    """The photo set, in the forms the pipeline needs.

    Attributes:
        views: the photo set on disk.
        test: the test groups + distractors, as a retrieval dataset.
        ids: database ids: paths relative to the photo set ("test/coffee/coffee_001.jpg").
        pixels: database images, float32 (h, w, 3) 0-255, decoded by Pillow.
        train_images: float32 (num_train, h, w, 3), for the KL initialisation.
        train_labels: int32 (num_train,).
    """

    views: PhotoViews
    test: RetrievalDataset
    ids: list
    pixels: list
    train_images: np.ndarray
    train_labels: np.ndarray


@dataclasses.dataclass
class _Training:
    """What `_train` measured: the curve and the budget used."""

    steps: list[int]
    losses: list[float]
    done: int
    seconds: float
    stopped: bool


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
        remap_tf.errors.RemapError: a bad option (named), or an unreachable ``serving``.
    """
    config.validate()
    status = _Status(log)
    if config.serving:
        _check_server(config.serving)
        status("serving", f"TF Serving answers at {config.serving}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _make_data(config, out, status)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    logger, level = tf.get_logger(), tf.get_logger().level
    with warnings.catch_warnings():
        # Noise, not news, for a demo user: Keras notes that tf.data datasets are not
        # shuffled by fit, and tf.function notes the retracing of predict for each model.
        warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
        logger.setLevel("ERROR")
        try:
            remap = _run_remap(config, out, data, curves, status)
            baselines = [
                _run_baseline(pooling, config, data, curves, status)
                for pooling in config.poolings[1:]
            ]
        finally:
            logger.setLevel(level)
    paths: dict[str, Path] = {"data": data.views.root, "saved_model": remap.version_dir}
    paths["index"] = remap.index.save(out / "index")
    status("index", f"ScaNN index of {len(data.ids)} REMAP descriptors saved to {paths['index']}")
    paths.update(write_outputs(config, out, data, remap, baselines, curves))
    rows = [remap.untrained, remap.trained, *baselines]
    seconds = time.monotonic() - status.start
    for line in ["", format_table(rows), "", "Wrote:"]:
        log(line)
    for key, path in paths.items():
        log(f"  {key:<14} {path}")
    log(f"Done in {seconds / 60:.1f} minutes.")
    return DemoResult(
        table=rows, paths=paths, seconds=seconds, max_export_difference=remap.export_difference
    )


def _make_data(config: DemoConfig, out: Path, status) -> DemoData:
    """Writes (or refreshes) the photo set under ``out/data`` and loads what is needed."""
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
    return DemoData(
        views=views,
        test=test,
        ids=[Path(os.path.relpath(p, views.root)).as_posix() for p in test.database],
        pixels=_load_pixels(test.database),
        train_images=images,
        train_labels=labels,
    )


def _fresh_model(config: DemoConfig, pooling: str, status):
    """The model for ``pooling`` from the seed's initial weights (same backbone for all)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)
    model = _build_model(config, pooling)
    status(POOLING_NAMES[pooling], f"built {model.name}: {model.count_params():,} weights")
    return model


def _run_remap(config: DemoConfig, out: Path, data: DemoData, curves, status) -> RemapOutcome:
    """REMAP: evaluated untrained, KL-initialised, trained, exported, embedded through the
    export (or TF Serving), indexed with ScaNN and evaluated."""
    name = POOLING_NAMES["remap"]
    model = _fresh_model(config, "remap", status)
    untrained = _embed_in_process(model, data.pixels)
    untrained_row = _evaluate("untrained REMAP (= R-MAC, random init)", "remap", untrained, data)[0]
    untrained_row["trained"] = False
    status(name, f"untrained test mAP {untrained_row['mAP']:.3f}")
    started = time.monotonic()
    initial = init_region_weights(
        model, data.train_images, data.train_labels, batch_size=32, seed=config.seed
    )
    status(
        name,
        f"region weights initialised by KL divergence ({initial.shape[0]} layers x "
        f"{initial.shape[1]} regions, {time.monotonic() - started:.1f}s)",
    )
    training = _train(model, config, data.views.train_csv, name, curves, status)
    reference = _embed_in_process(model, data.pixels)
    version_dir, descriptors, where = _export_and_embed(model, config, out, data, status)
    difference = float(np.abs(descriptors - reference).max())
    status(
        "export",
        f"exported vs Keras descriptors: max |difference| {difference:.1e} "
        "(TF's and Pillow's JPEG decoders differ slightly)",
    )
    row, index, rankings = _evaluate("REMAP trained (KL-initialised)", "remap", descriptors, data)
    _record_training(row, training)
    status(name, f"test mAP {row['mAP']:.3f} after {training.done} steps ({training.seconds:.0f}s)")
    return RemapOutcome(
        untrained=untrained_row,
        trained=row,
        initial_weights=initial,
        learned_weights=get_region_weights(model),
        similarity_before=_mean_similarity(untrained),
        similarity_after=_mean_similarity(descriptors),
        version_dir=version_dir,
        embedded_through=where,
        export_difference=difference,
        index=index,
        rankings=rankings,
        descriptors=descriptors,
    )


def _run_baseline(pooling: str, config: DemoConfig, data: DemoData, curves, status) -> dict:
    """A baseline pooling trained with the same budget and evaluated in process."""
    name = POOLING_NAMES[pooling]
    model = _fresh_model(config, pooling, status)
    training = _train(model, config, data.views.train_csv, name, curves, status)
    descriptors = _embed_in_process(model, data.pixels)
    row = _evaluate(f"{name} trained", pooling, descriptors, data)[0]
    _record_training(row, training)
    status(name, f"test mAP {row['mAP']:.3f} after {training.done} steps ({training.seconds:.0f}s)")
    return row


def _record_training(row: dict, training: _Training) -> None:
    row.update(
        steps=training.done,
        train_seconds=round(training.seconds, 1),
        stopped_by_time_limit=training.stopped,
    )


def _build_model(config: DemoConfig, pooling: str):
    """The model for ``pooling``, its BatchNorm layers frozen (see the module docstring)."""
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


def _train_config(config: DemoConfig, train_csv: Path, classes: int, steps_per_epoch: int):
    return TrainConfig.from_dict(
        {
            "epochs": config.steps // steps_per_epoch,
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


def _train(model, config: DemoConfig, train_csv: Path, name: str, curves, status) -> _Training:
    """Fits ``model`` with `remap_tf.training.fit.fit_model` for ``config.steps`` steps at most;
    records its training curve in ``curves[name]``."""
    # Epochs of up to 10 steps (a point of the curve each), exactly config.steps in all.
    steps_per_epoch = max(d for d in range(1, 11) if config.steps % d == 0)
    manifest = load_manifest(train_csv)
    classes = min(config.classes_per_batch, manifest.num_classes)
    train_config = _train_config(config, train_csv, classes, steps_per_epoch)
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
    curves[name] = (steps, losses)
    if stopped:
        status(
            name,
            f"the {config.minutes:g}-minute time limit stopped training at step {progress.step}",
        )
    return _Training(steps, losses, progress.step, seconds, stopped)


class _Progress(keras.callbacks.Callback):
    """Draws a `keras.utils.Progbar` over ``total`` training steps."""

    def __init__(self, total: int, label: str):
        super().__init__()
        self.total = total
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
        if self.step < self.total:
            self.bar.update(self.step, values=[("loss", self.loss)], finalize=True)


def _progress_callback(total: int, label: str) -> _Progress:
    return _Progress(total, label)


def _load_pixels(paths) -> list:
    """Decodes images to float32 RGB arrays ``(h, w, 3)`` 0-255 with Pillow."""
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    return pixels


def _embed_in_process(model, pixels) -> np.ndarray:
    """Descriptors ``(num_images, dim)`` of same-sized images from the Keras model."""
    batch = np.stack(pixels)
    return np.asarray(model.predict(batch, batch_size=32, verbose=0), dtype=np.float32)


def _export_and_embed(model, config: DemoConfig, out: Path, data: DemoData, status):
    """Exports ``model`` as a new version of ``out/models/remap`` and embeds the database.

    Returns:
        ``(version_dir, descriptors (len(database), dim) from the exported model, where they
        were computed)``.
    """
    started = time.monotonic()
    database = data.test.database
    version_dir = export_model(
        model,
        out / "models" / "remap",
        image_size=config.image_size,
        config={"demo": config_json(config)},
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
    with embedder:
        descriptors = embedder.embed(database)
    status(
        "embed",
        f"{len(database)} database images through {where} ({time.monotonic() - started:.1f}s)",
    )
    return version_dir, descriptors, where


def _check_server(target: str) -> None:
    """Fails fast, before any training, when no TF Serving answers at ``target``.

    Raises:
        remap_tf.errors.ServerUnavailableError: nothing answers (one-line CLI error).
    """
    client = make_embedder(target, model_name="remap", timeout=5.0, retries=1)
    try:
        client.metadata()
    except ModelNotFoundError:
        pass  # the server is up; the model appears once the demo has exported it
    finally:
        client.close()


def _wait_for_version(client, version: int, target: str, timeout: float = 120.0) -> None:
    """Waits until TF Serving serves ``version`` (it polls the base path for new versions)."""
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
    raise InvalidInputError(
        f"TF Serving at {target} still serves version {served} of model 'remap' after "
        f"{timeout:.0f}s, not the exported version {version}; is its --model_base_path the "
        "demo's models/remap folder?"
    )


def _mean_similarity(descriptors) -> float:
    """Mean cosine similarity over all pairs of distinct rows of L2-normalised descriptors."""
    n = len(descriptors)
    gram = descriptors @ descriptors.T
    return float((gram.sum() - gram.trace()) / max(n * (n - 1), 1))


def _evaluate(label: str, pooling: str, descriptors, data: DemoData):
    """Indexes ``descriptors`` with ScaNN, searches every test query, scores the rankings.

    Returns:
        ``(row, index, rankings)``: the table row (``mAP``, ``mP@1``, ``mP@5``, per-query
        ``ap``), the `remap_tf.serving.index.ScannIndex` and the ``(num_queries,
        num_database)`` rankings (database indices, best first; the query itself included,
        as junk).
    """
    index = ScannIndex(dim=descriptors.shape[1])
    index.add(data.ids, descriptors)
    positions = {i: n for n, i in enumerate(data.ids)}
    query_rows = [data.test.database.index(q.path) for q in data.test.queries]
    found, _ = index.search(descriptors[query_rows], k=len(data.ids))
    rankings = np.array([[positions[i] for i in row] for row in found], dtype=np.int64)
    scores = data.test.evaluate(rankings)["default"]
    return table_row(label, pooling, scores), index, rankings
