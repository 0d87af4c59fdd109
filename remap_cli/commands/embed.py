"""``remap embed``: embed an image collection on Apache Beam (`remap_tf.serving.beam_embed`)."""

from __future__ import annotations

import argparse

from remap_cli import common, paths
from remap_cli.args import MODEL_HELP, add_command, positive_int, printable, quiet_beam_logs

# The marker (`remap_tf.outputs`) of a local --out: the embeddings of remap embed.
COMMAND = "embed"

EPILOG = """\
Beam options go after `--`. Without --runner the pipeline runs here on Beam's in-process
runner (FnApiRunner; --workers processes). For example, on Dataflow:

  remap embed --images gs://bucket/photos --model gs://bucket/models/remap \\
      --out gs://bucket/photos.emb -- --runner=DataflowRunner --project=PROJECT \\
      --region=us-central1 --temp_location=gs://bucket/tmp \\
      --sdk_container_image=IMAGE_WITH_REMAP_TF

See docs/search.md for Flink and Spark.
"""


def add_parser(subparsers) -> None:
    """Registers ``remap embed``."""
    parser = add_command(
        subparsers,
        "embed",
        "embed a collection of images on Apache Beam into descriptor shards",
        "Reads images (a folder, a glob or a .txt/.csv list; local or any filesystem Beam "
        "supports), runs the exported model through Beam's RunInference, and writes per-shard "
        "float32 descriptors (.npy) and ids with a checksummed manifest. Unreadable images go "
        "to dead_letter.jsonl with the reason; a rerun skips finished shards.",
        run=run,
    )
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--images", required=True, help="a folder, a glob ('photos/**.jpg') or a .txt/.csv list"
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--out", required=True, help="the output folder (reused to resume)")
    parser.add_argument(
        "--shard-size", type=positive_int, default=1000, help="images per output shard (1000)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per inference call (16)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="worker processes of the local runner (1: in process; ignored with --runner)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="TensorFlow threads per worker"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds other files: they are kept, and a file "
        "of a name remap writes (shard-00000.npy, ...) is never replaced (move it away)",
    )
    parser.add_argument(
        "beam_args",
        nargs="*",
        metavar="-- BEAM_OPTION",
        help="Beam pipeline options, after `--` (e.g. --runner=DataflowRunner --project=...)",
    )


def check(args) -> None:
    """Local --images, --model and --out before Beam or TensorFlow starts (remote ones and
    globs are resolved by Beam's filesystems, which name them in their own errors)."""
    from remap_tf.serving.collection import is_glob, list_images
    from remap_tf.serving.embeddings import is_remote

    if not is_remote(args.images) and not is_glob(args.images):
        paths.input_path("--images", args.images)
        with paths.naming("--images"):
            list_images(args.images)
    if not is_remote(args.model):
        paths.exported_model("--model", args.model)
    if not is_remote(args.out):
        common.embeddings_output("--out", args.out, COMMAND, args.overwrite)


def run(args) -> int:
    check(args)
    quiet_beam_logs(args.debug)
    from remap_tf.serving.beam_embed import embed_images
    from remap_tf.serving.embeddings import DEAD_LETTER

    summary = embed_images(
        source=args.images,
        model=args.model,
        out=args.out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        beam_args=args.beam_args,
        command=COMMAND,
        overwrite=args.overwrite,
    )
    print(
        f"embedded {summary['count']} images"
        + (f" ({summary['dim']}-d)" if summary["dim"] else "")
        + f" into {printable(args.out)}: "
        f"{summary['shards']} shard(s), {len(summary['embedded_shards'])} run now, "
        f"{len(summary['skipped_shards'])} already finished; {len(summary['dead'])} unreadable"
    )
    for item in summary["dead"][:20]:
        print(f"  {printable(str(item['image']))}: {printable(str(item['reason']))}")
    if len(summary["dead"]) > 20:
        more = printable(f"{args.out}/{DEAD_LETTER}")
        print(f"  ... {len(summary['dead']) - 20} more in {more}")
    return 0
