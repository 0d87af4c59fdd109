"""``remap evaluate``: mAP and mP@k of a model (`remap_tf.serving.evaluate`)."""

from __future__ import annotations

import sys

from remap_cli import common, paths
from remap_cli.args import (
    MODEL_HELP,
    add_command,
    add_overwrite,
    int_between,
    non_negative_int,
    number_list,
    positive_float,
    positive_int,
    printable,
)
from remap_tf.contract import DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from remap_tf.evaluation import DEFAULT_KAPPAS
from remap_tf.export.options import ExportOptions
from remap_tf.outputs import publish_report

# The marker (`remap_tf.outputs`) of --embeddings: the embeddings of remap evaluate.
COMMAND = "evaluate"
FORMATS = ("auto", "revisited", "oxford", "holidays", "ukbench", "folders", "groups")


def add_parser(subparsers) -> None:
    """Registers ``remap evaluate``."""
    parser = add_command(
        subparsers,
        "evaluate",
        "mAP and mP@k of a model on a retrieval benchmark or labelled images",
        "Datasets: gnd_roxford5k.pkl / gnd_rparis6k.pkl (revisited; images in jpg/ beside it "
        "or --images), an Oxford/Paris ground-truth folder (with --images), a Holidays or "
        "UKBench image folder, a folder of class folders, or a groups .json.",
        run=run,
    )
    parser.add_argument("--dataset", required=True, help="ground truth (see above)")
    parser.add_argument(
        "--format", default="auto", choices=FORMATS, help="dataset format (default: detected)"
    )
    parser.add_argument("--images", default=None, help="image folder (revisited, oxford)")
    parser.add_argument(
        "--model",
        required=True,
        help=MODEL_HELP + "; with --scales or --image-size, a .keras file or training folder",
    )
    parser.add_argument(
        "--scales",
        type=number_list,
        nargs="+",
        default=None,
        help="multi-scale factors of --image-size, e.g. '1 0.707 1.414' (descriptors summed "
        "and re-normalised, the rule of remap export --scales); --model is then a Keras model",
    )
    parser.add_argument(
        "--image-size",
        type=int_between(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
        default=None,
        help=f"long side at scale 1, px (Keras model only; default {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument("--json", default=None, help="write the figures as JSON here (.json)")
    parser.add_argument(
        "--kappas",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_KAPPAS),
        help="k values of mP@k (default 1 5 10)",
    )
    parser.add_argument(
        "--qe", type=non_negative_int, default=0, help="alpha-QE neighbours (0 = off)"
    )
    parser.add_argument(
        "--qe-alpha", type=positive_float, default=3.0, help="alpha-QE exponent (default 3)"
    )
    parser.add_argument("--dba", type=non_negative_int, default=0, help="DBA neighbours (0 = off)")
    parser.add_argument(
        "--dba-alpha", type=positive_float, default=3.0, help="DBA exponent (default 3)"
    )
    parser.add_argument(
        "--embeddings",
        default=None,
        help="keep database descriptors here (reused to resume; a folder holding other files "
        "needs --overwrite, which keeps them)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per call")
    parser.add_argument("--report", default=None, help="write an HTML report here (.html)")
    parser.add_argument(
        "--report-k", type=positive_int, default=10, help="results per query in the report"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(parser)


def _check(args) -> None:
    """Every argument, before the model is loaded (the dataset is read here too)."""
    paths.input_path("--dataset", args.dataset)
    if args.images is not None:
        paths.input_dir("--images", args.images)
    if _keras_input(args):
        paths.keras_model("--model", args.model)
        with paths.naming("--scales" if args.scales else "--image-size"):
            _export_options(args)
    else:
        paths.exported_model("--model", args.model)
    if args.json:
        paths.output_file("--json", args.json, "evaluation JSON", args.overwrite)
    if args.report:
        paths.output_file("--report", args.report, "HTML report", args.overwrite)
        paths.report_files("--report", args.report, args.overwrite)
    if args.embeddings is not None:
        common.embeddings_output("--embeddings", args.embeddings, COMMAND, args.overwrite)


def _keras_input(args) -> bool:
    """--scales or --image-size: the model is a Keras model, embedded at those scales."""
    return args.scales is not None or args.image_size is not None


def _export_options(args) -> ExportOptions:
    scales = tuple(s for group in args.scales or [(1.0,)] for s in group)
    return ExportOptions(image_size=args.image_size or DEFAULT_IMAGE_SIZE, scales=scales)


def _scaled_embedder(args, folder: str):
    """The Keras model exported into ``folder`` with the scales asked for, and its embedder.

    An export fixes its scales (``remap export --scales``), so the one multi-scale rule, the
    exported graph's, is reused by exporting to a scratch folder rather than restated here.
    """
    from remap_tf.export.saved_model import export_model, load_keras_model

    options = _export_options(args)
    model, config = load_keras_model(args.model)
    with paths.naming("--scales"):  # a model with a fixed input size takes one scale only
        version = export_model(
            model,
            folder,
            image_size=options.image_size,
            scales=options.scales,
            config=config,
            verify=False,
        )
    return common.embedder_for(str(version))


def run(args) -> int:
    _check(args)
    from remap_tf.datasets import load_dataset

    with paths.naming("--dataset"):  # reads the ground truth; no TensorFlow yet
        dataset = load_dataset(args.dataset, format=args.format, images=args.images)
    if not _keras_input(args):
        return _evaluate(args, dataset, common.embedder_for(args.model))
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="remap-evaluate-") as folder:
        return _evaluate(args, dataset, _scaled_embedder(args, os.path.join(folder, "model")))


def _evaluate(args, dataset, embedder) -> int:
    from remap_tf.io import atomic_write_json
    from remap_tf.serving.evaluate import (
        evaluate_retrieval,
        metrics_json,
        metrics_table,
        write_evaluation_report,
    )

    if args.embeddings is not None:
        from remap_tf.serving.embeddings import claim_output

        with paths.naming("--embeddings"):  # the run's files are listed in it as written
            claim_output(args.embeddings, COMMAND, args.overwrite)
    kappas = tuple(args.kappas)
    result = evaluate_retrieval(
        embedder,
        dataset,
        kappas=kappas,
        query_expansion=args.qe,
        qe_alpha=args.qe_alpha,
        database_augmentation=args.dba,
        dba_alpha=args.dba_alpha,
        embeddings_dir=args.embeddings,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    protocols = result["protocols"]
    print(
        f"{printable(dataset.name)}: {len(dataset.database)} database images, "
        f"{len(dataset.queries)} queries"
    )
    print(metrics_table(protocols, kappas))
    for kind in ("skipped_database", "skipped_queries"):
        if result[kind]:
            print(f"{kind.replace('_', ' ')}: {len(result[kind])}", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, metrics_json(protocols))
        print(f"figures: {printable(args.json)}")
    if args.report:
        publish_report(
            args.report,
            lambda page: write_evaluation_report(page, dataset, result, k=args.report_k),
            overwrite=args.overwrite,
        )
        print(f"report: {printable(args.report)}")
    return 0
