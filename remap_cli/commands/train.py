"""``remap train``: fine-tune REMAP with a triplet or contrastive loss
(`remap_tf.training.fit.train`); ``--epochs 0`` initialises only (KL region weights, whitening).

The parser only declares flags; the handler resolves a `remap_tf.training.config.TrainConfig`
(defaults < ``--config`` YAML < flags < ``--set``), validates it, and calls
`remap_tf.training.fit.train` with it.

``--out`` is claimed for the run (`remap_tf.outputs`): absent, empty, or an earlier run's
(its ``.remap-output.json`` says so, and a rerun resumes from ``backup/``). A folder holding a
user's files, a stray ``config.yaml`` included, is refused unless ``--overwrite``; the files
the run writes (`remap_tf.training.fit.RUN_FILES`) are listed before training starts.
"""

from __future__ import annotations

import argparse

import yaml

from remap_cli import paths
from remap_cli.args import (
    add_command,
    float_above,
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from remap_tf.contract import MIN_IMAGE_SIZE
from remap_tf.errors import InvalidInputError, RemapError
from remap_tf.outputs import claim, record
from remap_tf.specs import BACKBONES, LOSSES, POOLINGS, REGION_POOLINGS
from remap_tf.training.config import (
    OPTIMIZERS,
    STRATEGIES,
    TrainConfig,
    read_yaml,
)
from remap_tf.training.data import load_manifest

COMMAND, OUTPUT = "train", "training run"

# flag dest -> config field (None values mean "flag not given").
_FLAG_FIELDS = {
    "data": "data.train",
    "validation": "data.validation",
    "out": "out_dir",
    "backbone": "model.backbone",
    "weights": "model.weights",
    "pooling": "model.pooling",
    "region_pooling": "model.region_pooling",
    "dim": "model.dim",
    "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch",
    "images_per_class": "data.images_per_class",
    "image_size": "data.image_size",
    "strategy": "strategy",
    "optimizer": "optimizer.name",
    "learning_rate": "optimizer.learning_rate",
    "warmup_steps": "optimizer.warmup_steps",
    "loss": "loss.kind",
    "margin": "loss.margin",
    "mining": "loss.mining",
    "seed": "seed",
    "time_limit": "time_limit",
    "verbose": "verbose",
}
_SWITCH_HELP = {
    "cross_replica": "mine triplets over the global batch (all replicas)",
    "offline_mining": "the paper's per-epoch offline hard-negative mining",
    "mixed_precision": "mixed_float16 policy (GPUs)",
    "jit_compile": "compile the training step with XLA",
    "freeze_backbone": "train only the region weights and the whitening",
    "select_whitening": "choose the whitening (or none) by held-out mAP",
}
_SWITCHES = {
    "cross_replica": "loss.cross_replica",
    "offline_mining": "loss.offline_mining",
    "mixed_precision": "mixed_precision",
    "jit_compile": "jit_compile",
    "freeze_backbone": "model.freeze_backbone",
    "select_whitening": "init.whitening_select",
}


def add_parser(subparsers) -> None:
    """Registers ``remap train``."""
    parser = add_command(
        subparsers,
        "train",
        "fine-tune a REMAP model with a triplet or contrastive loss (model.fit, any "
        "tf.distribute strategy)",
        "Fine-tunes a REMAP model on labelled images and writes OUT/model.keras and "
        "OUT/config.yaml. Batch sizes are per replica: the global batch is --batch-size "
        "times the number of replicas. Re-running the same command after a kill resumes "
        "from OUT/backup.",
        run=run,
    )
    parser.add_argument(
        "--data",
        help="training images: a folder of class folders, a path,label CSV, or GLDv2 "
        "train_clean.csv",
    )
    parser.add_argument("--out", help="output folder (default remap_train)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train into an --out folder that holds other files (they are kept; a config.yaml "
        "or model.keras there is replaced)",
    )
    parser.add_argument("--config", help="YAML file with any TrainConfig fields")
    parser.add_argument("--validation", help="validation images (same formats) for val_map")
    parser.add_argument("--backbone", help=f"one of {', '.join(BACKBONES)}")
    parser.add_argument("--weights", help="backbone weights: imagenet or a local weights file")
    parser.add_argument("--pooling", help=f"one of {', '.join(POOLINGS)} (default remap)")
    parser.add_argument(
        "--region-pooling",
        help=f"per-region pooling of remap/rmac: one of {', '.join(REGION_POOLINGS)} (default "
        "max, the paper's; gem learns an exponent per tap)",
    )
    parser.add_argument("--dim", type=positive_int, help="descriptor size after whitening")
    parser.add_argument("--steps-per-epoch", type=positive_int, help="training steps per epoch")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help="images per replica per step (= classes × --images-per-class); global batch = "
        "this × replicas",
    )
    parser.add_argument(
        "--images-per-class", type=int_at_least(2), help="K images per class in a batch"
    )
    parser.add_argument(
        "--image-size",
        type=int_at_least(MIN_IMAGE_SIZE),
        help="long side of the training images, px (aspect kept; export with the same size)",
    )
    parser.add_argument("--strategy", help=f"one of {', '.join(STRATEGIES)}")
    parser.add_argument("--devices", help="comma-separated devices for one_device/mirrored")
    parser.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--learning-rate", type=positive_float, help="peak learning rate")
    parser.add_argument(
        "--warmup-steps", type=non_negative_int, help="linear warm-up steps before cosine decay"
    )
    _add_objective_flags(parser)
    parser.add_argument("--seed", type=non_negative_int, help="random seed")
    parser.add_argument(
        "--time-limit", type=positive_float, help="stop cleanly after this many seconds"
    )
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), help="Keras progbar: 0 silent, 1 bar, 2 lines"
    )
    for flag, help_text in _SWITCH_HELP.items():
        parser.add_argument(
            "--" + flag.replace("_", "-"), action="store_true", default=None, dest=flag,
            help=help_text,
        )  # fmt: skip
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other config field, e.g. --set optimizer.clipnorm=5 (value parsed as YAML)",
    )


def _add_objective_flags(parser) -> None:
    """``--epochs`` (0: initialise only), ``--loss``, ``--margin`` and ``--mining`` (their
    defaults read from `LOSSES`)."""
    parser.add_argument(
        "--epochs",
        type=non_negative_int,
        help="epochs to train; 0: initialise only (KL region weights and whitening), no "
        "fine-tuning, and save the model as a trained one",
    )
    parser.add_argument(
        "--loss",
        help=f"one of {', '.join(LOSSES)} (default triplet; contrastive is cirtorch's)",
    )
    parser.add_argument(
        "--margin",
        type=float_above(0.0, inclusive=True),
        help="loss margin (default: "
        + ", ".join(f"{kind} {spec.margin:g}" for kind, spec in LOSSES.items())
        + ")",
    )
    parser.add_argument(
        "--mining",
        help="online mining: "
        + "; ".join(
            f"{kind}: {', '.join(spec.minings)} (default {spec.mining})"
            for kind, spec in LOSSES.items()
        ),
    )


def resolve_config(args: argparse.Namespace):
    """The validated `TrainConfig` of the parsed flags."""
    _check_flag_paths(args)
    with paths.naming("--config"):
        base = TrainConfig.from_dict(read_yaml(args.config)) if args.config else TrainConfig()
    overrides = {field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items()}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    for dest, field in _SWITCHES.items():
        if getattr(args, dest):
            overrides[field] = True
    if args.devices:
        overrides["devices"] = [d.strip() for d in args.devices.split(",") if d.strip()]
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--set expects FIELD=VALUE, received {item!r}.")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InvalidInputError(
                f"--set {item!r}: value is not valid YAML ({error})."
            ) from error
    config = base.replace(overrides)
    if args.batch_size is not None:
        per_class = config.data.images_per_class
        if args.batch_size < 2 * per_class or args.batch_size % per_class:
            raise InvalidInputError(
                f"--batch-size {args.batch_size} must be a multiple of images_per_class "
                f"({per_class}) covering at least 2 classes."
            )
        config = config.replace({"data.classes_per_batch": args.batch_size // per_class})
    if not config.data.train:
        raise InvalidInputError("--data is required (or data.train in --config).")
    return config.validate()


def _check_flag_paths(args) -> None:
    """The paths given as flags, named by their flags (values from --config are checked by
    `_check_data`, named by their config fields)."""
    if args.config is not None:
        paths.input_file("--config", args.config, (".yaml", ".yml"))
    for flag, value in (("--data", args.data), ("--validation", args.validation)):
        if value is not None:
            _check_manifest(flag, value)
    if args.weights not in (None, "imagenet"):
        paths.weights_file("--weights", args.weights)


def _check_manifest(name: str, source) -> None:
    """A training manifest is readable and lists images (none is opened)."""
    paths.input_path(name, source)
    try:
        load_manifest(source)
    except RemapError as error:
        raise type(error)(f"{name}: {error}") from None


def _check_data(config, overwrite: bool = False) -> None:
    """Reads the manifests (no image is opened) and the weights file's signature."""
    for field, source in (
        ("data.train", config.data.train),
        ("data.validation", config.data.validation),
    ):
        if source is not None:
            _check_manifest(field, source)
    if config.model.weights not in (None, "imagenet"):
        paths.weights_file("model.weights", config.model.weights)
    paths.output_folder("--out", config.out_dir, COMMAND, OUTPUT, overwrite)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    _check_data(config, args.overwrite)
    print("Loading TensorFlow and building the model...", flush=True)
    # imports TensorFlow: after the flags are checked
    from remap_tf.training.fit import RUN_FILES, train

    with paths.naming("--out"):
        out = claim(config.out_dir, COMMAND, OUTPUT, args.overwrite)
        record(out, RUN_FILES, overwrite=args.overwrite)  # before anything is written
    result = train(config, log=lambda line: print(f"  {line}", flush=True))
    print(
        f"Trained {result.epochs_run} epoch(s) from epoch {result.initial_epoch} on "
        f"{result.num_replicas} replica(s) in {result.seconds:.0f} s"
        + (" (stopped by the time limit)" if result.stopped_early else "")
    )
    if result.initial_val_map is not None and result.val_map is not None:
        print(f"Validation mAP: {result.initial_val_map:.4f} -> {result.val_map:.4f}")
    elif result.initial_val_map is not None and config.epochs == 0:
        print(f"Validation mAP of the initialised model: {result.initial_val_map:.4f}")
    if result.bad_files:
        print(f"{len(result.bad_files)} bad image file(s) skipped (listed above).")
    print(f"Model: {result.model_path}\nConfig: {result.config_path}")
    return 0
