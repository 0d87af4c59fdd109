"""``remap export``: a Keras model as a TF Serving SavedModel (`remap_tf.export`)."""

from __future__ import annotations

from pathlib import Path

from remap_cli import paths
from remap_cli.args import add_command, int_between, number_list, positive_int, printable
from remap_tf.contract import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    MAX_IMAGE_SIZE,
    MAX_PIXELS_LIMIT,
    MIN_IMAGE_SIZE,
    check_model_name,
)
from remap_tf.errors import OutputExistsError
from remap_tf.export.options import ExportOptions
from remap_tf.export.server_files import MODELS_CONFIG


def add_parser(subparsers) -> None:
    """Registers ``remap export``."""
    parser = add_command(
        subparsers,
        "export",
        "export a model for TensorFlow Serving",
        "Writes OUT/<version>/ (a SavedModel with the serving_default and embed_pixels "
        "signatures, the remap.json asset and TF Serving warm-up requests) and, when absent, "
        "OUT/models.config, OUT/batching_parameters.txt and OUT/docker-compose.yml.",
        run=run,
    )
    parser.add_argument("--model", required=True, help=".keras file or checkpoint folder")
    parser.add_argument("--out", required=True, help="model base folder, e.g. models/remap")
    parser.add_argument(
        "--version", type=positive_int, default=None, help="integer version (default: next free)"
    )
    parser.add_argument(
        "--image-size",
        type=int_between(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
        default=DEFAULT_IMAGE_SIZE,
        help=f"long side images are resized to, px, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
        f"(default {DEFAULT_IMAGE_SIZE}; memory grows with its square)",
    )
    parser.add_argument(
        "--scales",
        type=number_list,
        default=None,
        help="multi-scale factors of --image-size, e.g. '1.0,1.25' (descriptors summed; each "
        f"scaled side {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int_between(1, MAX_PIXELS_LIMIT),
        default=DEFAULT_MAX_PIXELS,
        help=f"largest width*height accepted (decompression-bomb guard; default "
        f"{DEFAULT_MAX_PIXELS}, at most {MAX_PIXELS_LIMIT})",
    )
    parser.add_argument(
        "--name", default=None, help="served model name (default: the --out folder's name)"
    )
    parser.add_argument(
        "--warmup-images", nargs="+", default=None, help="images for the warm-up requests"
    )


def _is_export_base(folder: Path) -> bool:
    """A folder ``remap export`` wrote: server files or integer version folders in it."""
    return (folder / MODELS_CONFIG).is_file() or any(p.name.isdigit() for p in folder.iterdir())


def _check(args) -> None:
    """Every argument, before TensorFlow is loaded."""
    paths.keras_model("--model", args.model)
    paths.output_dir("--out", args.out, "a model base folder", _is_export_base)
    if args.version is not None and (Path(args.out) / str(args.version)).exists():
        raise OutputExistsError(
            f"--version {args.version}: {str(Path(args.out) / str(args.version))!r} exists; "
            "exports never overwrite a version (omit --version for the next free one)"
        )
    if args.name is not None:
        with paths.naming("--name"):
            check_model_name(args.name)
    with paths.naming("--scales" if args.scales else "--image-size"):
        ExportOptions(
            image_size=args.image_size, scales=args.scales or (1.0,), max_pixels=args.max_pixels
        )
    for image in args.warmup_images or ():
        paths.image_file("--warmup-images", image)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def run(args) -> int:
    _check(args)
    from remap_tf.export.saved_model import export_model, load_keras_model

    model, config = load_keras_model(args.model)
    created = _missing_folders(Path(args.out))
    try:
        path = export_model(
            model,
            args.out,
            version=args.version,
            image_size=args.image_size,
            scales=args.scales,
            max_pixels=args.max_pixels,
            config=config,
            warmup_images=args.warmup_images,
            model_name=args.name,
        )
    except BaseException:  # a failed export (a full disk) leaves no empty --out behind
        for folder in created:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        raise
    print(f"Exported {printable(args.model)} to {printable(str(path))}")
    return 0
