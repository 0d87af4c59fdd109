"""Subcommands of `remap` from this package (see serving/cli.py): ``remap export``."""

from __future__ import annotations

import argparse


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--scales takes numbers like '1.0,1.25', received {text!r}"
        ) from None


def add_parsers(subparsers) -> None:
    """Registers this package's subcommands on the `remap` parser."""
    parser = subparsers.add_parser(
        "export",
        help="export a model for TensorFlow Serving",
        description=(
            "Writes OUT/<version>/ (a SavedModel with the serving_default and embed_pixels "
            "signatures, the remap.json asset and TF Serving warm-up requests) and, when "
            "absent, OUT/models.config, OUT/batching_parameters.txt and OUT/docker-compose.yml."
        ),
    )
    parser.add_argument("--model", required=True, help=".keras file or checkpoint folder")
    parser.add_argument("--out", required=True, help="model base folder, e.g. models/remap")
    parser.add_argument(
        "--version", type=int, default=None, help="integer version (default: next free one)"
    )
    parser.add_argument(
        "--image-size", type=int, default=512, help="long side images are resized to (px)"
    )
    parser.add_argument(
        "--scales",
        type=_scales,
        default=None,
        help="multi-scale factors of --image-size, e.g. '1.0,1.25' (descriptors summed)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=50_000_000,
        help="largest width*height accepted (decompression-bomb guard)",
    )
    parser.add_argument(
        "--name", default=None, help="served model name (default: the --out folder's name)"
    )
    parser.add_argument(
        "--warmup-images", nargs="+", default=None, help="images for the warm-up requests"
    )
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from export.saved_model import export_model, load_keras_model

    model, config = load_keras_model(args.model)
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
    print(f"Exported {args.model} to {path}")
    return 0
