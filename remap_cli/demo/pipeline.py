"""`remap demo`: REMAP against its baselines on the photos inside scikit-image, end to end.

One command, offline, on a laptop CPU, shows the whole path of this project:

1. **data**: `remap_cli.demo.photoset.make_photo_views` turns the 18 photographs bundled with
   scikit-image into an instance-retrieval set: views of each photo (crops, rotation,
   perspective, colour, blur, JPEG), split by photo so that the test photos are never seen in
   training; each test photo's query is a crop of 20-42% of its area, its database views
   show 36-100%, and views of the training photos are distractors;
2. **models**, all on ImageNet MobileNet v1 (alpha 0.75, the weights that ship with remap-tf)
   at 384 px long side: off-the-shelf SPoC, MAC, GeM and R-MAC; REMAP with KL-divergence
   region weights (`remap_tf.region_weights.init_region_weights`), then also with learned
   whitening (`remap_tf.whitening.init_whitening`), both fitted on the training photos;
   then R-MAC, GeM and REMAP fine-tuned with ``model.fit`` and a triplet loss
   (`remap_tf.training.fit.fit_model`) for the same number of steps;
3. **export** the fine-tuned REMAP in TF Serving layout
   (`remap_tf.export.saved_model.export_model`) and **embed** the test set through the
   SavedModel (`remap_tf.serving.client.LocalEmbedder`) or a running TF Serving
   (``--serving host:port``);
4. **index** with ScaNN (`remap_tf.serving.index.ScannIndex`), **search** every query and
   **evaluate** mAP (`remap_tf.evaluation`) for every model;
5. **report**: the table, ``report.html`` with the queries' top results
   (`remap_tf.serving.report.write_report`), the training curves and the region weights
   (`remap_cli.demo.figures`).

Deterministic: TensorFlow's op determinism is on and every model starts from
``keras.utils.set_random_seed(seed)``, so one seed gives one table. BatchNorm layers stay in
inference mode (their ImageNet statistics) during fine-tuning: batches of 18 images would
estimate them badly.

Everything is written under ``out_dir``; running again over an earlier run reuses the photo
set, adds a new SavedModel version and replaces the index, report and results atomically.

Reference: Husain & Bober, "REMAP: Multi-layer entropy-guided pooling of dense CNN features
for image retrieval", IEEE TIP 2019.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from remap_cli.demo.config import (
    GRID_SHAPE,
    LEVELS,
    REPORTED,
    DemoConfig,
    DemoModel,
    DemoResult,
    config_json,
)
from remap_cli.demo.photoset import DATA_DIR, PhotoViews, load_images, make_photo_views
from remap_cli.demo.report import RemapOutcome, format_table, table_row, write_outputs
from remap_tf import evaluation
from remap_tf.errors import InvalidInputError, ModelNotFoundError
from remap_tf.export.saved_model import export_model
from remap_tf.model import get_region_weights
from remap_tf.serving.client import LocalEmbedder, make_embedder
from remap_tf.serving.index import ScannIndex
from remap_tf.training.config import TrainConfig
from remap_tf.training.data import Manifest, load_manifest
from remap_tf.training.fit import build_model, fit_model, initialise
from remap_tf.training.pipeline import embed_batches, make_train_dataset

# The seed of the KL region weights' pair sampling: the demo has always drawn its pairs with
# seed 0, whatever --seed (remap train uses its run's seed).
KL_PAIR_SEED = 0


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
        queries: the query crops' paths, ``queries_per_photo`` per test photo.
        owners: per query, the name of its photo.
        database: the database paths: the test photos' other views, then the distractors.
        positives: per query, the database rows of its photo.
        ids: database ids, paths relative to the photo set ("test/coffee/coffee_003.jpg").
        query_pixels, database_pixels: decoded float32 ``(1, h, w, 3)`` each.
        train_images: float32 ``(num_train, h, w, 3)`` training views (KL and whitening).
        train_labels: int ``(num_train,)``.
        manifest: the training views' `remap_tf.training.data.Manifest` (fine-tuning).
    """

    views: PhotoViews
    queries: list[str]
    owners: list[str]
    database: list[str]
    positives: list[list[int]]
    ids: list[str]
    query_pixels: list
    database_pixels: list
    train_images: np.ndarray
    train_labels: np.ndarray
    manifest: Manifest


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
    ``keras.utils.set_random_seed(config.seed)``; models the caller built before are not
    affected, but Keras' layer-name counters restart. Turns on TensorFlow's op determinism
    for the rest of the process.

    Args:
        config: a `DemoConfig`.
        log: receives one line per step, and the final table.

    Returns:
        a `DemoResult`.

    Raises:
        remap_tf.errors.RemapError: a bad option (named), or an unreachable ``serving``.
    """
    config.validate()
    tf.config.experimental.enable_op_determinism()
    status = _Status(log)
    if config.serving:
        _check_server(config.serving)
        status("serving", f"TF Serving answers at {config.serving}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _make_data(config, out, status)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    rows, remap = [], None
    with _quiet_tensorflow():
        for spec in config.selected():
            row, outcome = _run_model(spec, config, out, data, curves, status)
            rows.append(row)
            remap = outcome or remap
    paths: dict[str, Path] = {"data": data.views.root, "saved_model": remap.version_dir}
    paths["index"] = remap.index.save(out / "index")
    status("index", f"ScaNN index of {len(data.ids)} REMAP descriptors saved to {paths['index']}")
    paths.update(write_outputs(config, out, data, remap, rows, curves))
    seconds = time.monotonic() - status.start
    for line in ["", format_table(rows), "", "Wrote:"]:
        log(line)
    for key, path in paths.items():
        log(f"  {key:<14} {path}")
    log(f"Done in {seconds / 60:.1f} minutes.")
    return DemoResult(
        table=rows, paths=paths, seconds=seconds, max_export_difference=remap.export_difference
    )


@contextlib.contextmanager
def _quiet_tensorflow():
    """Keras' note that tf.data datasets are not shuffled by fit, and tf.function's notes on
    retracing, are noise, not news, for a demo user."""
    logger, level = tf.get_logger(), tf.get_logger().level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
        logger.setLevel("ERROR")
        try:
            yield
        finally:
            logger.setLevel(level)


def _make_data(config: DemoConfig, out: Path, status) -> DemoData:
    """Writes (or refreshes) the photo set under ``out/data`` and loads what is needed."""
    views = make_photo_views(
        out / DATA_DIR,
        seed=config.seed,
        views_per_photo=config.views_per_photo,
        image_size=config.view_size(),
        test_fraction=config.test_fraction,
        distractors_per_photo=config.distractors_per_photo,
        photos=config.photos,
        query_scale=config.query_scale,
        queries_per_photo=config.queries_per_photo,
    )
    images, labels, _ = load_images(views.train_csv)
    spec = json.loads(views.test_groups_json.read_text(encoding="utf-8"))
    queries, database, positives, owners = [], [], [], []
    for group in spec["groups"]:
        count = int(group.get("queries", 1))
        start = len(database)
        database += [str(views.root / p) for p in group["images"][count:]]
        for path in group["images"][:count]:
            queries.append(str(views.root / path))
            positives.append(list(range(start, len(database))))
            owners.append(group["name"])
    database += [str(views.root / p) for p in spec["distractors"]]
    status(
        "data",
        f"{len(views.train_photos)} training photos ({len(images)} views), "
        f"{len(views.test_photos)} test photos: {len(queries)} query crops against "
        f"{len(database)} database images ({len(spec['distractors'])} distractors), in "
        f"{views.root}",
    )
    return DemoData(
        views=views,
        queries=queries,
        owners=owners,
        database=database,
        positives=positives,
        ids=[Path(os.path.relpath(p, views.root)).as_posix() for p in database],
        query_pixels=_load_pixels(queries),
        database_pixels=_load_pixels(database),
        train_images=images,
        train_labels=labels,
        manifest=load_manifest(views.train_csv),
    )


def _run_model(spec: DemoModel, config: DemoConfig, out: Path, data: DemoData, curves, status):
    """Builds, initialises, (fine-tunes,) embeds and scores one row of the table.

    Returns:
        ``(row, outcome)``: the table row, and for the reported model (fine-tuned REMAP) the
        `RemapOutcome` the report draws (else None).
    """
    train_config = _train_config(config, spec, data)
    keras.backend.clear_session()
    keras.utils.set_random_seed(config.seed)  # every model starts from the same head
    model = build_model(train_config)
    initial = _initialise(model, spec, data, train_config, status)
    training = None
    if spec.fine_tune:
        training = _train(model, config, train_config, data.manifest, spec.label, curves, status)
    if spec.key == REPORTED:
        return _run_reported(model, spec, config, out, data, initial, training, status)
    queries = embed_batches(model, data.query_pixels)
    database = embed_batches(model, data.database_pixels)
    row = _evaluate(spec, queries, database, data)[0]
    _record_training(row, training)
    status(spec.label, f"test mAP {row['mAP']:.3f}")
    return row, None


def _initialise(model, spec: DemoModel, data: DemoData, train_config: TrainConfig, status):
    """KL region weights (and learned whitening) from the training views
    (`remap_tf.training.fit.initialise`, as ``train_config.init`` says); the KL weights."""
    if spec.init == "none":
        return None
    started = time.monotonic()
    done = initialise(model, data.train_images, data.train_labels, train_config, seed=KL_PAIR_SEED)
    status(
        spec.label,
        f"{spec.init.replace('kl', 'KL region weights').replace('+lw', ' and learned whitening')}"
        f" from {len(data.train_images)} training views ({time.monotonic() - started:.1f}s)",
    )
    return done["region_weights"]


def _run_reported(model, spec, config, out, data, initial, training, status):
    """The fine-tuned REMAP: export, embed through the export, ScaNN, and the report's data."""
    reference = embed_batches(model, data.database_pixels)
    version_dir, embedded, where = _export_and_embed(model, config, out, data, status)
    database, queries = embedded[: len(data.database)], embedded[len(data.database) :]
    difference = float(np.abs(database - reference).max())
    status(
        "export",
        f"exported vs Keras descriptors: max |difference| {difference:.1e} "
        "(TF's and Pillow's JPEG decoders differ slightly)",
    )
    row, index, rankings = _evaluate(spec, queries, database, data)
    _record_training(row, training)
    status(spec.label, f"test mAP {row['mAP']:.3f}")
    outcome = RemapOutcome(
        row=row,
        initial_weights=initial,
        learned_weights=get_region_weights(model),
        version_dir=version_dir,
        embedded_through=where,
        export_difference=difference,
        index=index,
        rankings=rankings,
        queries=queries,
        descriptors=database,
    )
    return row, outcome


def _record_training(row: dict, training: _Training | None) -> None:
    if training is not None:
        row.update(
            trained=True,
            steps=training.done,
            train_seconds=round(training.seconds, 1),
            stopped_by_time_limit=training.stopped,
        )


def _steps_per_epoch(steps: int) -> int:
    """Epochs of up to 10 steps (a point of the training curve each), ``steps`` in all."""
    return max(d for d in range(1, 11) if steps % d == 0)


def _train_config(config: DemoConfig, spec: DemoModel, data: DemoData) -> TrainConfig:
    """The `TrainConfig` of one row: its model (BatchNorm frozen, see the module docstring),
    its initialisation and, when fine-tuned, its training; the rest is remap train's default
    (e.g. ``init.whitening_shrinkage``)."""
    steps_per_epoch = _steps_per_epoch(config.steps)
    return TrainConfig.from_dict(
        {
            "model": {
                "backbone": config.backbone,
                "weights": config.weights,
                "pooling": spec.pooling,
                "levels": LEVELS,
                "grid_shape": list(GRID_SHAPE),
                "backbone_kwargs": config.backbone_kwargs(),
                "freeze_batch_norm": True,
            },
            "init": {
                "region_weights": spec.init != "none",
                "whitening": "learned" if spec.init == "kl+lw" else "none",
            },
            "epochs": config.steps // steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "time_limit": config.minutes * 60.0,
            "verbose": 0,
            "seed": config.seed,
            "optimizer": {"learning_rate": config.learning_rate},
            "loss": {"margin": config.margin, "mining": config.mining},
            "data": {
                "train": str(data.views.train_csv),
                "image_size": config.image_size,
                "classes_per_batch": min(config.classes_per_batch, data.manifest.num_classes),
                "images_per_class": config.images_per_class,
            },
        }
    ).validate()


def _train(
    model, config: DemoConfig, train_config: TrainConfig, manifest: Manifest, name, curves, status
) -> _Training:
    """Fits ``model`` with `remap_tf.training.fit.fit_model` for ``config.steps`` steps at most;
    records its training curve in ``curves[name]``."""
    steps_per_epoch = train_config.steps_per_epoch
    dataset = make_train_dataset(
        manifest,
        image_size=train_config.data.image_size,
        classes_per_batch=train_config.data.classes_per_batch,
        images_per_class=train_config.data.images_per_class,
        seed=config.seed,
    )
    progress = _Progress(config.steps, f"  training {name}")
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
            name, f"the {config.minutes:g}-minute limit stopped training at step {progress.step}"
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


def _load_pixels(paths) -> list:
    """Decodes images to float32 RGB batches ``(1, h, w, 3)`` 0-255 with Pillow."""
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32)[None])
    return pixels


def _export_and_embed(model, config: DemoConfig, out: Path, data: DemoData, status):
    """Exports ``model`` as a new version of ``out/models/remap`` and embeds the database
    and the queries through it.

    Returns:
        ``(version_dir, descriptors (len(database) + len(queries), dim), where)``.
    """
    started = time.monotonic()
    version_dir = export_model(
        model,
        out / "models" / "remap",
        image_size=config.image_size,
        config={"demo": config_json(config)},
        warmup_images=data.database[:4],
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
    images = data.database + data.queries
    with embedder:
        descriptors = embedder.embed(images)
    status("embed", f"{len(images)} images through {where} ({time.monotonic() - started:.1f}s)")
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


def _evaluate(spec: DemoModel, queries, database, data: DemoData):
    """Indexes the database with ScaNN, searches every query, scores the rankings.

    Returns:
        ``(row, index, rankings)``: the table row, the `remap_tf.serving.index.ScannIndex`
        and the ``(num_queries, num_database)`` rankings (database rows, best first).
    """
    index = ScannIndex(dim=database.shape[1])
    index.add(data.ids, database)
    positions = {i: n for n, i in enumerate(data.ids)}
    found, _ = index.search(queries, k=len(data.ids))
    rankings = np.array([[positions[i] for i in row] for row in found], dtype=np.int64)
    junk = [[] for _ in data.queries]
    scores = evaluation.mean_average_precision(rankings, data.positives, junk, (1, 5))
    return table_row(spec, scores), index, rankings
