"""Training REMAP with ``model.fit``: the library function behind `remap train`.

`train(config)` runs the whole job: strategy, data, model (inside ``strategy.scope()``),
KL-divergence region weights and learned whitening on a sample of the training set, compile
with the triplet or contrastive loss, callbacks, ``model.fit``, and the final ``model.keras``.
With ``epochs: 0`` it stops after the initialisation: no fit step, the same ``model.keras``
and ``config.yaml`` (no checkpoint or log, which come per epoch). `fit_model` is the
lower-level piece for a model that already exists (the demo uses it).

Output folder (``config.out_dir``)::

    model.keras            the trained model (safe_mode=True loadable), written atomically
    config.yaml            the resolved TrainConfig
    checkpoints/           epoch_NNN.weights.h5 after every epoch, and config.yaml
    backup/                BackupAndRestore state (resume after a kill); removed at the end
                           (other MultiWorker workers: backup_worker_N/)
    logs/                  TensorBoard: loss, learning_rate, val_map

`RUN_FILES` names them for the output marker (`remap_tf.outputs`): ``remap train`` claims the
folder and lists them before training, so a rerun after a kill resumes from ``backup/`` and a
folder holding a user's ``config.yaml`` (no marker) is never written into.

Reference: Husain & Bober, "REMAP: Multi-layer entropy-guided pooling of dense CNN features
for image retrieval", IEEE TIP 2019 (triplet loss, KL-initialised region weights, learned
whitening trained end to end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from remap_tf.backbones import batch_norm_layers, recalibrate_batch_norm
from remap_tf.contract import MODEL_FILE
from remap_tf.errors import InvalidInputError
from remap_tf.io import atomic_save
from remap_tf.losses import make_loss
from remap_tf.model import REMAP, whitening_layer
from remap_tf.region_weights import init_region_weights
from remap_tf.training import callbacks as cb
from remap_tf.training import keras_compat, pipeline, strategies
from remap_tf.training.config import CONFIG_FILE, TrainConfig
from remap_tf.training.data import Manifest, load_manifest
from remap_tf.training.images import BadFileLog, BadFileReporter, unusable_data_guard
from remap_tf.training.mining import OfflineHardNegativeMining
from remap_tf.whitening import init_whitening

BACKUP_DIR = "backup"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
# What `train` writes in out_dir (a trailing "/": a folder whose content is all remap's).
RUN_FILES = (MODEL_FILE, CONFIG_FILE, f"{BACKUP_DIR}/", f"{CHECKPOINT_DIR}/", f"{LOG_DIR}/")


@dataclasses.dataclass
class TrainResult:
    """What `train` produced.

    Attributes:
        model_path: ``out_dir/model.keras``.
        config_path: ``out_dir/config.yaml``.
        history: ``History.history`` of this run (``loss``, ``learning_rate``, ``val_map``).
        initial_epoch: the epoch this run started at (> 0 when resumed from a backup).
        epochs_run: epochs completed in this run.
        initial_val_map: validation mAP before fitting (after initialisation), or None.
        val_map: validation mAP after the last epoch, or None.
        stopped_early: True if the time limit stopped training.
        num_replicas: replicas in sync.
        seconds: wall-clock seconds of the run.
        bad_files: paths skipped as unreadable.
        model: the trained model (as saved to ``model_path``).
    """

    model_path: Path
    config_path: Path
    history: dict
    initial_epoch: int
    epochs_run: int
    initial_val_map: float | None
    val_map: float | None
    stopped_early: bool
    num_replicas: int
    seconds: float
    bad_files: list
    model: object = dataclasses.field(default=None, repr=False)


def build_model(config: TrainConfig):
    """The REMAP model of ``config.model``, for images of any size; build it in scope."""
    m = config.model
    model = REMAP(
        m.backbone,
        pooling=m.pooling,
        region_pooling=m.region_pooling,
        taps=m.taps,
        levels=m.levels,
        grid_shape=tuple(m.grid_shape),
        dim=m.dim,
        weights=m.weights,
        input_shape=(None, None, 3),  # any size: training, export and serving keep aspect
        backbone_kwargs=dict(m.backbone_kwargs) or None,
    )
    if m.freeze_backbone:
        # Frozen BatchNorm layers also run in inference mode (Keras 3 semantics).
        model.get_layer("backbone").trainable = False
    elif m.freeze_batch_norm:
        for layer in batch_norm_layers(model):
            layer.trainable = False
    return model


def make_learning_rate(config: TrainConfig):
    """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then cosine decay.

    Decays to ``min_learning_rate_ratio × learning_rate`` at step ``epochs ×
    steps_per_epoch``; without ``cosine_decay`` the rate stays at its peak after warm-up.
    """
    o = config.optimizer
    total = config.total_steps()
    warmup = o.warmup_steps
    alpha = o.min_learning_rate_ratio if o.cosine_decay else 1.0
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(total - warmup, 1),
            alpha=alpha,
            warmup_target=o.learning_rate,
            warmup_steps=warmup,
        )
    return keras.optimizers.schedules.CosineDecay(  # total is 0 with epochs 0 (no step)
        initial_learning_rate=o.learning_rate, decay_steps=max(total, 1), alpha=alpha
    )


def make_optimizer(config: TrainConfig):
    """SGD with momentum, Adam or AdamW with the schedule and ``clipnorm`` of ``config``."""
    o = config.optimizer
    common = {"learning_rate": make_learning_rate(config), "clipnorm": o.clipnorm}
    if o.name == "sgd":
        return keras.optimizers.SGD(
            momentum=o.momentum, weight_decay=o.weight_decay or None, **common
        )
    if o.name == "adam":
        return keras.optimizers.Adam(weight_decay=o.weight_decay or None, **common)
    return keras.optimizers.AdamW(weight_decay=o.weight_decay, **common)


def compile_model(model, config: TrainConfig) -> None:
    """Compiles ``model`` with the loss of ``config.loss`` (`remap_tf.losses.make_loss`:
    triplet or contrastive) and `make_optimizer`.

    Call inside the strategy's scope (the optimizer's variables are created there). Also
    applies `training.keras_compat` (Keras fixes for multi-replica ``fit``).
    """
    keras_compat.apply()

    lo = config.loss.resolve()
    model.compile(
        optimizer=make_optimizer(config),
        loss=make_loss(lo.kind, lo.margin, lo.mining, cross_replica=lo.cross_replica),
        jit_compile=config.jit_compile,
    )


def fit_model(
    model,
    train_ds,
    config: TrainConfig,
    callbacks=(),
    val=None,
    initial_epoch: int = 0,
    compile: bool = True,
    before_evaluate=None,
):
    """Fits an already-built REMAP model on a dataset of ``(images, labels)`` batches.

    Args:
        model: a REMAP ``keras.Model`` (built inside the strategy scope if one is used).
        train_ds: infinite ``tf.data.Dataset`` of ``(float32 (B, S, S, 3) 0-255,
            int32 (B,))`` class-balanced batches (`training.pipeline.make_train_dataset`).
        config: epochs, steps_per_epoch, optimiser, loss and time limit come from it.
        callbacks: extra Keras callbacks, run after the evaluation callback.
        val: validation data for `training.callbacks.RetrievalEvaluation` (arrays
            ``(images, labels)`` or a dataset of batches), or None.
        initial_epoch: as ``model.fit``.
        compile: compile with `compile_model` first (False: keep the model's own compile).
        before_evaluate: passed to `RetrievalEvaluation` (e.g. a BatchNorm recalibration).

    Returns:
        the ``keras.callbacks.History``; the evaluation and time-limit callbacks are
        reachable as ``history.retrieval`` and ``history.time_limit`` (or None).
    """
    if compile:
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            compile_model(model, config)
    evaluation = None
    own = []
    if val is not None:
        evaluation = cb.RetrievalEvaluation(
            val,
            batch_size=config.data.validation_batch_size,
            verbose=config.verbose,
            before_evaluate=before_evaluate,
        )
        own.append(evaluation)
    limit = cb.TimeLimit(config.time_limit) if config.time_limit else None
    if limit is not None:
        own.append(limit)
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        initial_epoch=initial_epoch,
        shuffle=False,  # the P×K sampler already shuffles; Keras would only warn
        callbacks=own + list(callbacks),
        verbose=config.verbose,
    )
    history.retrieval = evaluation
    history.time_limit = limit
    return history


def initialise(model, images, labels, config: TrainConfig, *, seed: int | None = None) -> dict:
    """KL-divergence region weights, then whitening, from a labelled image sample.

    Args:
        model: a REMAP model.
        images: ``(num_images, height, width, 3)`` RGB 0-255, several images per class.
        labels: ``(num_images,)``.
        config: ``config.init`` says what to initialise.
        seed: seed of the region weights' pair sampling (None: ``config.seed``).

    Returns:
        ``{"region_weights": (taps, regions) or None, "whitening": method or None}``, plus
        ``"whitening_selection"`` (the choice and the held-out figures) with
        ``init.whitening_select``.
    """
    done = {"region_weights": None, "whitening": None}
    if config.init.region_weights and config.model.pooling == "remap":
        done["region_weights"] = init_region_weights(
            model,
            images,
            labels,
            batch_size=config.data.validation_batch_size,
            max_pairs=config.init.max_pairs,
            seed=config.seed if seed is None else seed,
        )
    if config.init.whitening != "none":
        init_whitening(
            model,
            images,
            labels,
            method=config.init.whitening,
            batch_size=config.data.validation_batch_size,
            shrinkage=config.init.whitening_shrinkage,
            select=config.init.whitening_select,
            holdout=config.init.whitening_holdout,
        )
        done["whitening"] = config.init.whitening
        if config.init.whitening_select:
            done["whitening_selection"] = whitening_layer(model).selection
    return done


@dataclasses.dataclass
class _Cluster:
    """Where this process stands in the run: strategy, replicas, chief or not."""

    strategy: object
    replicas: int
    chief: bool
    task_id: int
    multi_worker: bool

    @classmethod
    def make(cls, config: TrainConfig) -> _Cluster:
        # The strategy first: MultiWorkerMirroredStrategy must come before TF's context starts.
        strategy = strategies.make_strategy(config.strategy, devices=config.devices, tpu=config.tpu)
        resolver = getattr(strategy, "cluster_resolver", None)
        return cls(
            strategy=strategy,
            replicas=strategy.num_replicas_in_sync,
            chief=strategies.is_chief(strategy),
            task_id=getattr(resolver, "task_id", 0) or 0,
            multi_worker=config.strategy == "multi_worker",
        )

    def backup_dir(self, out: Path) -> Path:
        # Every worker keeps its own copy (the chief's is the one users see).
        return out / BACKUP_DIR if self.chief else out / f"{BACKUP_DIR}_worker_{self.task_id}"


def load_training_data(config: TrainConfig, replicas: int) -> Manifest:
    """The training manifest, classes with fewer than 2 images dropped; checks the batch fits."""
    manifest = load_manifest(config.data.train).drop_small_classes(2)
    present = int(np.count_nonzero(manifest.class_counts()))
    global_classes = config.data.classes_per_batch * replicas
    if present < global_classes:
        raise InvalidInputError(
            f"data.train {config.data.train!r} has {present} classes with >= 2 images, fewer "
            f"than classes_per_batch × replicas = {global_classes}."
        )
    return manifest


def load_validation_data(config: TrainConfig, bad_files):
    """The validation dataset (at most ``validation_max_images``, seeded), or None."""
    if not config.data.validation:
        return None
    manifest = load_manifest(config.data.validation)
    if len(manifest) > config.data.validation_max_images:
        rng = np.random.default_rng(config.seed)
        keep = rng.choice(len(manifest), config.data.validation_max_images, False)
        manifest = manifest.subset(np.sort(keep))
    return pipeline.make_eval_dataset(
        manifest,
        image_size=config.data.image_size,
        batch_size=config.data.validation_batch_size,
        bad_files=bad_files,
    )


def prepare_model(
    model, manifest: Manifest, config: TrainConfig, *, resuming, recalibrate, bad_files
):
    """BatchNorm recalibration, KL region weights and whitening on a training sample.

    Nothing is initialised when resuming (the backup holds trained weights); BatchNorm
    statistics are still recalibrated when asked. Returns the sample ``(images, labels)``, or
    None when none was needed.
    """
    if config.init.num_images <= 0 or not (recalibrate or not resuming):
        return None
    sample = _init_sample(manifest, config, bad_files)
    if recalibrate:
        recalibrate_batch_norm(model, sample[0], batch_size=config.data.validation_batch_size)
    if not resuming:
        initialise(model, sample[0], sample[1], config)
        _check_descriptors(model, sample[0][: config.data.validation_batch_size], config)
    return sample


def make_training_dataset(
    model, manifest: Manifest, config: TrainConfig, *, global_classes, backup_dir, bad_files
):
    """The training batches, and the offline miner when ``loss.offline_mining`` (else None).

    Each worker keeps its own slice of every global batch (DATA sharding); sharding by file
    would break the class balance of the P×K batches.
    """
    miner = None
    if config.loss.offline_mining:
        miner = OfflineHardNegativeMining(
            manifest,
            image_size=config.data.image_size,
            tuples_per_batch=global_classes,
            num_negatives=config.loss.offline_num_negatives,
            num_anchors=config.loss.offline_num_anchors,
            pool_size=config.loss.offline_pool_size,
            embed_batch_size=config.data.validation_batch_size,
            augment=config.data.augment,
            seed=config.seed,
            bad_files=bad_files,
        )
        miner.mine(model, epoch=cb.backup_epoch(backup_dir) or 0)
        dataset = miner.dataset()
    else:
        dataset = pipeline.make_train_dataset(
            manifest,
            image_size=config.data.image_size,
            classes_per_batch=global_classes,
            images_per_class=config.data.images_per_class,
            augment=config.data.augment,
            seed=config.seed,
            bad_files=bad_files,
            min_crop_area=config.data.min_crop_area,
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options), miner


def make_callbacks(config: TrainConfig, *, write_dir: Path, backup_dir: Path, bad_files, miner):
    """Bad-file reports, NaN stop, the miner, backup, checkpoints and TensorBoard, in order."""
    callbacks = [BadFileReporter(bad_files), keras.callbacks.TerminateOnNaN()]
    if miner is not None:
        callbacks.append(miner)
    callbacks.append(
        cb.AtomicBackupAndRestore(
            str(backup_dir), config=config, save_freq=config.backup_every_steps or "epoch"
        )
    )
    callbacks.append(
        cb.AtomicModelCheckpoint(
            str(write_dir / CHECKPOINT_DIR / "epoch_{epoch:03d}.weights.h5"),
            config=config,
            save_weights_only=True,
        )
    )
    if config.tensorboard:
        callbacks.append(
            keras.callbacks.TensorBoard(
                str(write_dir / LOG_DIR), write_graph=False, profile_batch=0
            )
        )
    return callbacks


@contextlib.contextmanager
def _dtype_policy(mixed_precision: bool):
    """``mixed_float16`` inside the block when asked; the previous policy restored after."""
    previous = keras.config.dtype_policy()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _quiet(message: str) -> None:
    """The default progress reporter of `train`: says nothing."""


def train(config: TrainConfig, log=_quiet) -> TrainResult:
    """Trains a REMAP model as ``config`` says and writes ``out_dir`` (see module doc).

    Steps: strategy; training manifest and class-balanced P×K dataset (P =
    ``classes_per_batch × replicas`` per global batch, so each replica gets its own
    ``classes_per_batch`` classes); model inside ``strategy.scope()``; BatchNorm
    recalibration (random-init backbones), KL region weights and whitening on
    ``init.num_images`` training images; compile; ``model.fit`` with the callbacks; BatchNorm
    recalibration again; ``model.keras`` and ``config.yaml``.

    Resumes automatically: if ``out_dir/backup`` holds a `BackupAndRestore` state from a
    killed run, training continues from it (initialisation is skipped).

    Args:
        config: a `TrainConfig` (validated here).
        log: called with one line per initialisation step (strategy, data, model,
            initialisation), before ``fit`` shows its own progress.

    Returns:
        a `TrainResult`.

    Raises:
        remap_tf.errors.RemapError: bad data or configuration, with a one-line message.
    """
    start = time.monotonic()
    config.validate()
    out = Path(config.out_dir)
    cluster = _Cluster.make(config)
    log(f"strategy {config.strategy}: {cluster.replicas} replica(s)")
    keras.utils.set_random_seed(config.seed)
    bad_files = BadFileLog()
    manifest = load_training_data(config, cluster.replicas)
    log(f"training data: {len(manifest)} images of {manifest.num_classes} classes")
    val = load_validation_data(config, bad_files)
    scratch = None if cluster.chief else Path(tempfile.mkdtemp(prefix="remap_worker_"))
    try:
        with _dtype_policy(config.mixed_precision), unusable_data_guard(bad_files):
            model, history = _fit(
                config, cluster, manifest, val, out, scratch or out, bad_files, log
            )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    evaluation = history.retrieval
    return TrainResult(
        model_path=out / MODEL_FILE,
        config_path=out / CONFIG_FILE,
        history=dict(history.history),
        initial_epoch=int(history.epoch[0]) if history.epoch else config.epochs,
        epochs_run=len(history.epoch),
        initial_val_map=evaluation.initial_map if evaluation else None,
        val_map=evaluation.history[-1][1] if evaluation and evaluation.history else None,
        stopped_early=bool(history.time_limit and history.time_limit.stopped),
        num_replicas=cluster.replicas,
        seconds=time.monotonic() - start,
        bad_files=bad_files.paths,
        model=model,
    )


def _fit(config, cluster: _Cluster, manifest, val, out: Path, write_dir: Path, bad_files, log):
    """Builds, initialises, compiles and fits the model; the chief saves it. -> (model, history)"""
    with cluster.strategy.scope():
        model = build_model(config)
    backup_dir = cluster.backup_dir(out)
    # epochs 0 initialises anew: a backup's trained weights would only load inside fit.
    resuming = config.epochs > 0 and cb.backup_epoch(backup_dir) is not None
    recalibrate = config.init.recalibrate_batch_norm and not cluster.multi_worker
    log(f"model: {model.name}, {model.count_params():,} weights")
    lo = config.loss.resolve()
    log(f"loss: {lo.kind}, margin {lo.margin:g}, {lo.mining} mining")
    if not resuming and config.init.num_images > 0:
        log(f"initialising region weights and whitening from {config.init.num_images} images")
    elif resuming:
        log(f"resuming from {backup_dir}")
    sample = prepare_model(
        model, manifest, config, resuming=resuming, recalibrate=recalibrate, bad_files=bad_files
    )
    if whitening_layer(model).selection and not resuming:
        log(f"whitening selection: {whitening_layer(model).selection['choice']}")
    with cluster.strategy.scope():
        compile_model(model, config)  # also with epochs 0: model.keras is always compiled
    before_evaluate = None
    if recalibrate and sample is not None:

        def before_evaluate():
            recalibrate_batch_norm(model, sample[0], batch_size=config.data.validation_batch_size)

    if config.epochs == 0:
        log("epochs 0: initialised only, no fine-tuning")
        with cluster.strategy.scope():  # as fit would, so model.keras loads without a warning
            model.optimizer.build(model.trainable_variables)
        history = _initialised_history(model, config, val, before_evaluate)
    else:
        history = _fit_steps(
            model,
            manifest,
            config,
            cluster,
            val=val,
            write_dir=write_dir,
            bad_files=bad_files,
            before_evaluate=before_evaluate,
        )
    if cluster.chief:
        save_model(model, out / MODEL_FILE)
        config.save(out / CONFIG_FILE)
    return model, history


def _fit_steps(model, manifest, config, cluster, *, val, write_dir, bad_files, before_evaluate):
    """The fitting part of `_fit`: data, callbacks, ``model.fit``, then a last BatchNorm
    recalibration (``before_evaluate``). -> History"""
    backup_dir = cluster.backup_dir(Path(config.out_dir))
    train_ds, miner = make_training_dataset(
        model,
        manifest,
        config,
        global_classes=config.data.classes_per_batch * cluster.replicas,
        backup_dir=backup_dir,
        bad_files=bad_files,
    )
    callbacks = make_callbacks(
        config, write_dir=write_dir, backup_dir=backup_dir, bad_files=bad_files, miner=miner
    )
    history = fit_model(
        model,
        train_ds,
        config,
        callbacks=callbacks,
        val=val,
        compile=False,
        before_evaluate=before_evaluate,
    )
    if before_evaluate is not None:
        before_evaluate()
    return history


def _initialised_history(model, config: TrainConfig, val, before_evaluate):
    """The History of a run with no epoch: empty, its ``retrieval`` holding the initialised
    model's validation mAP as ``initial_map`` (None without validation data)."""
    history = keras.callbacks.History()
    history.set_model(model)
    history.epoch, history.time_limit, history.retrieval = [], None, None
    if val is not None:
        history.retrieval = cb.RetrievalEvaluation(
            val,
            batch_size=config.data.validation_batch_size,
            verbose=config.verbose,
            before_evaluate=before_evaluate,
        )
        history.retrieval.set_model(model)
        history.retrieval.on_train_begin()
    return history


def save_model(model, path) -> Path:
    """Saves ``model`` as a ``.keras`` file atomically (temporary file, then rename)."""
    return atomic_save(path, model.save)


def _check_descriptors(model, images, config: TrainConfig) -> None:
    """InvalidInputError if the initialised model's descriptors are not finite."""
    descriptors = np.asarray(model(images, training=False), dtype=np.float32)
    if not np.all(np.isfinite(descriptors)):
        hint = ""
        if config.mixed_precision and config.model.weights is None:
            hint = (
                " A random-initialised backbone's features underflow float16: use "
                "model.weights, init.recalibrate_batch_norm, or turn mixed_precision off."
            )
        raise InvalidInputError(
            "The model's descriptors are not finite after the region-weight and whitening "
            f"initialisation, so training cannot start.{hint}"
        )


def _init_sample(manifest, config: TrainConfig, bad_files):
    """``config.init.num_images`` un-augmented training images, P×K class-balanced, as 4:3
    crops with the run's long side (one array)."""
    per_batch = config.data.classes_per_batch * config.data.images_per_class
    batches = max(1, -(-config.init.num_images // per_batch))
    dataset = pipeline.make_train_dataset(
        manifest,
        image_size=config.data.image_size,
        classes_per_batch=config.data.classes_per_batch,
        images_per_class=config.data.images_per_class,
        augment=False,
        seed=config.seed + 1,
        bad_files=bad_files,
        aspects=(4 / 3,),  # one shape, so the sample is one array
    )
    images, labels = [], []
    for batch_images, batch_labels in dataset.take(batches):
        images.append(np.asarray(batch_images))
        labels.append(np.asarray(batch_labels))
    return np.concatenate(images), np.concatenate(labels)
