"""``remap demo``: the whole path on the photos inside scikit-image (`remap_cli.demo`).

``--out`` is claimed for the demo (`remap_tf.outputs`): a folder that is absent, empty or an
earlier demo's (its ``.remap-output.json`` says so); anything else, such as a user's folder
with a ``data/`` of photos, only with ``--overwrite``, and even then remap removes only the
photo-set files its markers list.
"""

from __future__ import annotations

from pathlib import Path

from remap_cli import paths
from remap_cli.args import (
    add_command,
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from remap_cli.demo.config import DEFAULT_BACKBONE, DEFAULT_OUT, DemoConfig
from remap_tf.contract import MIN_IMAGE_SIZE
from remap_tf.outputs import claim
from remap_tf.specs import get_spec

COMMAND, OUTPUT = "demo", "demo output"


def add_parser(subparsers) -> None:
    """Registers ``remap demo`` (no TensorFlow import here)."""
    parser = add_command(
        subparsers,
        "demo",
        "train, export, index and search REMAP on the photos inside scikit-image",
        "Builds a retrieval set from the photographs bundled with scikit-image (query crops "
        "of photos never seen in training), compares off-the-shelf SPoC, MAC, GeM, R-MAC and "
        "REMAP (KL weights, learned whitening) on the bundled ImageNet MobileNet, fine-tunes "
        "R-MAC, GeM and REMAP with the same budget, exports REMAP for TF Serving, indexes the "
        "test photos with ScaNN, prints the mAP table and writes OUT/report.html. Offline; "
        "under 10 minutes on 2 CPU cores.",
        run=run,
    )
    defaults = DemoConfig()
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="output folder; reruns reuse it (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds other files (they are kept; files of the "
        "same names as the demo's are replaced)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=defaults.seed,
        help="random seed (default: %(default)s)",
    )
    parser.add_argument(
        "--minutes",
        type=positive_float,
        default=defaults.minutes,
        help="fine-tuning time limit per model, minutes (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="fine-tuning steps per model, if the time limit allows (default: %(default)s)",
    )
    parser.add_argument(
        "--backbone", default=DEFAULT_BACKBONE, help="backbone name (default: %(default)s)"
    )
    parser.add_argument(
        "--alpha",
        type=positive_float,
        default=None,
        help="MobileNet width multiplier (default: 0.75 for mobilenet, the bundled weights; "
        "0.35 for mobilenet_v2)",
    )
    parser.add_argument(
        "--weights",
        default=defaults.weights,
        help="backbone weights: 'imagenet' (bundled for mobilenet alpha 0.75, else downloaded "
        "by Keras), 'none' (random initialisation) or a weights file (default: %(default)s)",
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
        type=int_at_least(MIN_IMAGE_SIZE),
        default=defaults.image_size,
        help="long side of the views, px; 288 or more keeps all 40 regions distinct "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--views-per-photo",
        type=int_at_least(3),
        default=defaults.views_per_photo,
        help="views made of each photo (default: %(default)s)",
    )


def _claim(out: Path, overwrite: bool) -> None:
    """Claims ``out`` for the demo; with ``overwrite``, its photo-set folder too (a user's
    ``data/`` is then written beside, never cleared)."""
    from remap_cli.demo.photoset import DATA_DIR, claim_photo_set  # Pillow: not at --help

    with paths.naming("--out"):
        claim(out, COMMAND, OUTPUT, overwrite)
        if overwrite:
            claim_photo_set(out / DATA_DIR, overwrite=True)


def run(args) -> int:
    with paths.naming("--backbone"):
        get_spec(args.backbone)
    paths.output_folder("--out", args.out, COMMAND, OUTPUT, args.overwrite)
    weights = None if args.weights in (None, "none") else args.weights
    if weights not in (None, "imagenet"):
        paths.weights_file("--weights", weights)
    config = DemoConfig(
        out_dir=args.out,
        seed=args.seed,
        minutes=args.minutes,
        steps=args.steps,
        backbone=args.backbone,
        alpha=args.alpha,
        weights=weights,
        serving=args.serving,
        image_size=args.image_size,
        views_per_photo=args.views_per_photo,
        images_per_class=min(DemoConfig.images_per_class, args.views_per_photo),
    )
    config.validate()
    _claim(Path(args.out), args.overwrite)
    from remap_cli.demo.pipeline import run_demo  # imports TensorFlow: after the checks

    result = run_demo(config)
    return 0 if result.table else 1
