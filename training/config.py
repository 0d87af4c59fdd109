"""The training configuration: one typed dataclass, loaded from YAML, overridden by flags.

``TrainConfig`` holds every knob of `training.fit.train`, in sections (``model``, ``data``,
``optimizer``, ``loss``, ``init``) plus run-level fields. The resolution order is:
defaults < YAML file (``--config``) < command-line flags; `TrainConfig.validate` then checks
everything once and raises ``ValueError`` naming the field and the value received. The
resolved config is written (atomically) as ``config.yaml`` next to every checkpoint and next
to ``model.keras``.

Batch sizes are **per replica**: one replica's batch is ``data.classes_per_batch`` classes ×
``data.images_per_class`` images; the global batch is that times the number of replicas.

Example:
    >>> config = load_config("my.yaml", overrides={"epochs": 3, "model.backbone": "vgg16"})
    >>> config.global_batch_size(num_replicas=2)
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import yaml

from remap_tf.checks import check_choice, check_int, check_number, closest
from remap_tf.contract import MIN_IMAGE_SIZE
from remap_tf.errors import BadPathError, FileFormatError, InvalidInputError
from remap_tf.io import atomic_write_text
from remap_tf.specs import (
    BACKBONES,
    POOLINGS,
    REGION_POOLINGS,
    WHITENING_METHODS,
    check_loss_mining,
    get_loss_spec,
)

# A training crop keeps this to 100% of the largest rectangle of its aspect: down to a
# quarter of the frame, so training sees the partial views retrieval queries often are.
# Stated here, in the light config module, so that `remap --help` needs no TensorFlow.
MIN_CROP_AREA = 0.25

OPTIMIZERS = ("sgd", "adam", "adamw")
WHITENING_INIT = (*WHITENING_METHODS, "none")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
# The resolved config, written next to every checkpoint, backup and trained model.
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class ModelConfig:
    """The REMAP model (arguments of `remap_tf.model.REMAP`)."""

    backbone: str = "mobilenet_v2"
    weights: str | None = None  # None (random), "imagenet" or a local weights file
    pooling: str = "remap"
    # Per-region pooling of remap/rmac: "max" (the paper's) or "gem" (regional GeM, learned p)
    region_pooling: str = "max"
    taps: list[str] | None = None  # default: the backbone's last two stages
    levels: int = 4
    grid_shape: list[int] = dataclasses.field(default_factory=lambda: [24, 32])
    dim: int | None = None  # whitened descriptor size; None keeps the concatenated size
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)  # e.g. {"alpha": 0.35}
    freeze_backbone: bool = False  # train only region weights and whitening
    # BatchNorm layers not trained and run in inference mode (their statistics stay fixed,
    # e.g. ImageNet's): per-replica batches of a few dozen images estimate them badly.
    freeze_batch_norm: bool = True


@dataclasses.dataclass
class DataConfig:
    """Training and validation data (see `training.data.load_manifest`)."""

    train: str = ""  # folder of class folders, `path,label` CSV, or GLDv2 train_clean.csv
    validation: str | None = None  # same formats; None: no validation mAP
    # Long side of the training images, aspect kept (random crops of 4:3, 1:1 or 3:4 per
    # batch); export with the same --image-size so serving sees the same geometry.
    image_size: int = 224
    classes_per_batch: int = 8  # P, per replica
    images_per_class: int = 2  # K, per replica
    augment: bool = True
    min_crop_area: float = MIN_CROP_AREA  # crops keep 25-100% of the frame (partial views)
    validation_batch_size: int = 16
    validation_max_images: int = 2000


@dataclasses.dataclass
class OptimizerConfig:
    """Optimiser and learning-rate schedule (linear warm-up, then cosine decay)."""

    name: str = "adam"
    learning_rate: float = 1e-4  # peak, reached at the end of warm-up
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # adamw (decoupled) or sgd/adam (Keras' weight_decay)
    warmup_steps: int = 0
    cosine_decay: bool = True  # decay to min_learning_rate_ratio × peak at the last step
    min_learning_rate_ratio: float = 0.0
    clipnorm: float | None = 1.0  # per-variable gradient norm clipping; None: off


@dataclasses.dataclass
class LossConfig:
    """The loss (`remap_tf.losses.TripletLoss` or `ContrastiveLoss`) and its mining.

    ``margin`` and ``mining`` left null take the kind's defaults (`remap_tf.specs.LOSSES`:
    triplet 0.1 on squared distances and batch_hard; contrastive 0.7 on Euclidean distances
    and batch_all); `resolve` fills them in, and `TrainConfig.validate` calls it, so the
    saved config.yaml records the values the run used. Set ``kind`` before validating: a
    validated config keeps its filled-in margin and mining when ``replace`` changes the kind.
    """

    kind: str = "triplet"  # "triplet" or "contrastive" (cirtorch's)
    margin: float | None = None  # None: the kind's default
    mining: str | None = None  # None: the kind's default
    cross_replica: bool = False  # mine over the global batch (all replicas)
    offline_mining: bool = False  # the paper's per-epoch hard-negative mining
    offline_pool_size: int = 512  # images embedded per epoch as negative candidates
    offline_num_anchors: int = 256  # tuples mined per epoch
    offline_num_negatives: int = 5  # hard negatives per tuple

    def resolve(self) -> LossConfig:
        """Fills a null ``margin`` or ``mining`` with the kind's default; returns self."""
        spec = get_loss_spec(self.kind, "loss.kind")
        if self.margin is None:
            self.margin = spec.margin
        if self.mining is None:
            self.mining = spec.mining
        return self

    def validate(self) -> LossConfig:
        """`resolve`, then checks every field; one-line errors naming the field."""
        self.resolve()
        check_number("loss.margin", self.margin, minimum=0, open_minimum=True)
        check_loss_mining(self.kind, self.mining, "loss.mining")
        check_int("loss.offline_pool_size", self.offline_pool_size, minimum=2)
        check_int("loss.offline_num_anchors", self.offline_num_anchors, minimum=1)
        check_int("loss.offline_num_negatives", self.offline_num_negatives, minimum=1)
        return self


@dataclasses.dataclass
class InitConfig:
    """Initialisation before fitting, on a sample of the training set."""

    region_weights: bool = True  # KL divergence per region (remap pooling only)
    whitening: str = "learned"  # "learned" (matching pairs), "pca" or "none"
    num_images: int = 256  # training images embedded for the initialisation
    max_pairs: int = 2000
    # Regularisation of learned whitening, a fraction of the mean eigenvalue: 0.5 measured
    # best on the multiview benchmark's 460 training images (0.1 overfits so few pairs).
    whitening_shrinkage: float = 0.5
    # Whitening that cannot lose (remap_tf.whitening.select_whitening): hold out
    # `whitening_holdout` of the classes and keep the best of no whitening and `whitening` at
    # several dimensions and shrinkages by held-out mAP. Off until bench.quality measures it.
    whitening_select: bool = False
    whitening_holdout: float = 0.3
    # Set BatchNorm moving statistics from the init sample before initialising, before each
    # evaluation and after fitting (remap_tf.recalibrate_batch_norm). Not with multi_worker.
    recalibrate_batch_norm: bool = False


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run. See the module docstring for resolution and batches."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    epochs: int = 10  # 0: initialise (region weights, whitening) and save, no fine-tuning
    steps_per_epoch: int = 100
    strategy: str = "default"
    devices: list[str] | None = None  # for one_device / mirrored
    tpu: str | None = None  # TPUClusterResolver address
    mixed_precision: bool = False  # "mixed_float16" (GPU) policy
    jit_compile: bool = False  # XLA
    seed: int = 0
    out_dir: str = "remap_train"
    backup_every_steps: int | None = None  # BackupAndRestore save_freq; None: every epoch
    time_limit: float | None = None  # seconds of training before stopping cleanly
    tensorboard: bool = True
    verbose: int = 1  # Keras progbar: 0 silent, 1 bar, 2 one line per epoch

    def per_replica_batch_size(self) -> int:
        return self.data.classes_per_batch * self.data.images_per_class

    def global_batch_size(self, num_replicas: int = 1) -> int:
        return self.per_replica_batch_size() * int(num_replicas)

    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> TrainConfig:
        """Builds a config from a nested mapping; ValueError on unknown keys."""
        return _from_dict(cls, values or {}, "")

    def replace(self, overrides: dict | None) -> TrainConfig:
        """A copy with ``overrides`` applied: ``{"epochs": 3, "model.backbone": "vgg16"}``."""
        values = self.to_dict()
        for key, value in (overrides or {}).items():
            if value is None and key not in _NULLABLE:
                continue  # an unset flag
            parts = key.split(".")
            target = values
            for part in parts[:-1]:
                if not isinstance(target.get(part), dict):
                    raise InvalidInputError(f"Unknown config field {key!r}.{_hint(part, target)}")
                target = target[part]
            if parts[-1] not in target:
                raise InvalidInputError(f"Unknown config field {key!r}.{_hint(parts[-1], target)}")
            target[parts[-1]] = value
        return TrainConfig.from_dict(values)

    def validate(self) -> TrainConfig:
        """Checks every field once; ValueError naming the field and the value received."""
        m, d, o, lo, i = self.model, self.data, self.optimizer, self.loss, self.init
        check_choice("model.pooling", m.pooling, POOLINGS)
        check_choice("model.region_pooling", m.region_pooling, REGION_POOLINGS)
        check_int("model.levels", m.levels, minimum=1)
        if len(m.grid_shape) != 2 or any(int(v) != v or v < 1 for v in m.grid_shape):
            raise InvalidInputError(
                f"model.grid_shape must be two positive ints, got {m.grid_shape!r}"
            )
        if m.dim is not None:
            check_int("model.dim", m.dim, minimum=1)
        if m.weights not in (None, "imagenet") and not os.path.isfile(str(m.weights)):
            raise InvalidInputError(
                f"model.weights must be null, 'imagenet' or an existing file, got {m.weights!r}"
            )
        if not d.train:
            raise InvalidInputError(
                "data.train is empty: give a class folder or a manifest (--data)."
            )
        if not os.path.exists(d.train):
            raise InvalidInputError(f"data.train {d.train!r} does not exist.")
        if d.validation is not None and not os.path.exists(d.validation):
            raise InvalidInputError(f"data.validation {d.validation!r} does not exist.")
        if not isinstance(d.image_size, int) or d.image_size < MIN_IMAGE_SIZE:
            raise InvalidInputError(
                f"data.image_size must be an int >= {MIN_IMAGE_SIZE}, got {d.image_size!r}"
            )
        check_int("data.classes_per_batch", d.classes_per_batch, minimum=2)
        check_int("data.images_per_class", d.images_per_class, minimum=2)
        check_int("data.validation_batch_size", d.validation_batch_size, minimum=1)
        check_int("data.validation_max_images", d.validation_max_images, minimum=2)
        check_choice("optimizer.name", o.name, OPTIMIZERS)
        check_number("optimizer.learning_rate", o.learning_rate, minimum=0, open_minimum=True)
        check_number("optimizer.momentum", o.momentum, minimum=0.0, maximum=1.0)
        check_number("optimizer.weight_decay", o.weight_decay, minimum=0.0, maximum=1.0)
        check_int("optimizer.warmup_steps", o.warmup_steps, minimum=0)
        check_number(
            "optimizer.min_learning_rate_ratio", o.min_learning_rate_ratio, minimum=0.0, maximum=1.0
        )
        if o.clipnorm is not None:
            check_number("optimizer.clipnorm", o.clipnorm, minimum=0, open_minimum=True)
        lo.validate()
        check_choice("init.whitening", i.whitening, WHITENING_INIT)
        check_int("init.num_images", i.num_images, minimum=0)
        check_int("init.max_pairs", i.max_pairs, minimum=1)
        check_number("init.whitening_shrinkage", i.whitening_shrinkage, minimum=0.0, maximum=10.0)
        check_number("init.whitening_holdout", i.whitening_holdout, minimum=0.05, maximum=0.95)
        check_number("data.min_crop_area", d.min_crop_area, minimum=0.01, maximum=1.0)
        check_int("epochs", self.epochs, minimum=0)  # 0: initialise only, no fine-tuning
        check_int("steps_per_epoch", self.steps_per_epoch, minimum=1)
        if o.warmup_steps >= self.total_steps() and o.warmup_steps > 0 and self.epochs:
            raise InvalidInputError(
                f"optimizer.warmup_steps ({o.warmup_steps}) must be below epochs × "
                f"steps_per_epoch ({self.total_steps()})."
            )
        check_choice("strategy", self.strategy, STRATEGIES)
        if self.devices is not None and self.strategy not in ("one_device", "mirrored"):
            raise InvalidInputError(
                f"devices only applies to one_device/mirrored, not {self.strategy!r}"
            )
        check_int("seed", self.seed, minimum=0)
        if not self.out_dir:
            raise InvalidInputError("out_dir is empty.")
        if self.backup_every_steps is not None:
            check_int("backup_every_steps", self.backup_every_steps, minimum=1)
        if self.time_limit is not None:
            check_number("time_limit", self.time_limit, minimum=0, open_minimum=True)
        check_choice("verbose", self.verbose, (0, 1, 2))
        check_choice("model.backbone", m.backbone, tuple(sorted(BACKBONES)))
        if self.time_limit is not None and self.strategy == "multi_worker":
            raise InvalidInputError(
                "time_limit cannot be used with strategy 'multi_worker': workers would stop at "
                "different steps and wait for each other forever."
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path) -> Path:
        """Writes the config as YAML to ``path`` atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_yaml())
        return path


_NULLABLE = {
    "model.weights",
    "model.taps",
    "model.dim",
    "data.validation",
    "optimizer.clipnorm",
    "devices",
    "tpu",
    "backup_every_steps",
    "time_limit",
}


def _hint(name: str, known) -> str:
    return closest(name, known) or f" Known here: {sorted(known)}."


def load_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated.

    Args:
        path: a YAML file with any subset of the fields (nested sections), or None.
        overrides: ``{"dotted.field": value}``; None values are skipped except for
            fields that may be null. Command-line flags arrive here.

    Returns:
        the validated `TrainConfig`.
    """
    config = TrainConfig()
    if path is not None:
        config = TrainConfig.from_dict(read_yaml(path))
    return config.replace(overrides).validate()


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadPathError(f"Config file {str(path)!r} does not exist.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FileFormatError(f"Config file {str(path)!r} is not UTF-8 text.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise InvalidInputError(
            f"Config file {str(path)!r} is not valid YAML: {problem}{where}."
        ) from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidInputError(
            f"Config file {str(path)!r} must hold a mapping, not {type(values)}."
        )
    return values


def _from_dict(cls, values, prefix: str):
    if not isinstance(values, dict):
        raise InvalidInputError(
            f"Config section {prefix.rstrip('.') or '<root>'!r} must be a mapping."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidInputError(
            f"Unknown config field(s) {[prefix + k for k in unknown]}; known: "
            f"{[prefix + k for k in fields]}."
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, hint, value)
    return cls(**kwargs)


def _coerce(name: str, hint, value):
    """Checks ``value`` against the annotation; converts int -> float and tuple -> list."""
    origin = typing.get_origin(hint)
    is_union = origin is typing.Union or origin is types.UnionType
    args = typing.get_args(hint) if is_union else (hint,)
    nullable = type(None) in args
    base = [a for a in args if a is not type(None)]
    if value is None:
        if nullable:
            return None
        raise InvalidInputError(f"{name} must not be null.")
    target = typing.get_origin(base[0]) or base[0]
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is list and isinstance(value, tuple):
        value = list(value)
    if target is bool and not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be true or false, got {value!r}")
    if target is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, target):
        raise InvalidInputError(f"{name} must be a {target.__name__}, got {value!r}")
    return value
