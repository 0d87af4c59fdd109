"""``remap index build|add|delete|info|compact|upgrade``: a searchable index of an image collection.

Handlers call `remap_tf.serving.search` (build_index, add_images, delete_images, index_info)
and `remap_tf.serving.index.changelog.compact_index`.
"""

from __future__ import annotations

import json
from pathlib import Path

from remap_cli import common, paths
from remap_cli.args import (
    MODEL_HELP,
    add_command,
    byte_size,
    non_negative_int,
    pca_dims,
    positive_float,
    positive_int,
    printable,
    quiet_beam_logs,
    recall_target,
)
from remap_tf.errors import InvalidInputError

_SCANN_FLAGS = (
    ("scann_mode", "mode"),
    ("num_leaves", "num_leaves"),
    ("leaves_to_search", "num_leaves_to_search"),
    ("reorder", "reorder"),
    ("threads", "num_threads"),
    ("target_recall", "target_recall"),
    ("tune_budget", "tune_budget"),
    ("pca_dims", "pca_dims"),
)


def add_parser(subparsers) -> None:
    """Registers ``remap index`` and its actions."""
    parser = subparsers.add_parser(
        "index",
        help="build, update and inspect a searchable index of image descriptors",
        description="Build an index of a folder of images, add or delete images, show it.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _add_build(actions)
    add = add_command(
        actions,
        "add",
        "embed image files and add them to an index",
        "Embeds image files under the index's collection root with the index's model and adds "
        "them under their paths relative to that root; the index is saved atomically.",
        run=run_add,
    )
    add.add_argument("--index", required=True, help="an index directory (remap index build)")
    add.add_argument("images", nargs="+", metavar="IMAGE", help="image files to add")
    add.add_argument("--model", default=None, help=MODEL_HELP + " (default: the index's model)")
    delete = add_command(actions, "delete", "remove images from an index by id", run=run_delete)
    delete.add_argument("--index", required=True, help="an index directory (remap index build)")
    delete.add_argument("ids", nargs="+", metavar="ID", help="ids as shown by remap search")
    info = add_command(
        actions, "info", "show an index's size, configuration and model", run=run_info
    )
    info.add_argument("--index", required=True, help="an index directory (remap index build)")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    compact = add_command(
        actions,
        "compact",
        "fold the changes `remap serve` logged into the index",
        "Applies the change log beside the index (<index>.wal, written by `remap serve`) and "
        "saves a new snapshot atomically, then empties the log. Crash-safe at every step; "
        "refused while a service has the index open (the service compacts by itself past "
        "--compact-after changes).",
        run=run_compact,
    )
    compact.add_argument("--index", required=True, help="an index directory (remap index build)")
    upgrade = add_command(
        actions,
        "upgrade",
        "convert a descriptor folder of the retired store.json format",
        "Rewrites, in place, the descriptor shards that `remap index build --images` kept "
        "(<out>.embeddings) before there was one descriptor format, keeping the descriptors; "
        "give the --images and --model it was built with. The next `remap index build` with "
        "them resumes from the folder; `remap index build --from-embeddings` reads it.",
        run=run_upgrade,
    )
    upgrade.add_argument("--embeddings", required=True, help="the retired descriptor folder")
    upgrade.add_argument("--images", required=True, help="the images it was made from")
    upgrade.add_argument("--model", required=True, help="the model it was made with")


def _add_build(actions) -> None:
    build = add_command(
        actions,
        "build",
        "embed a folder or manifest of images (or take remap embed output) and save an index",
        "Embeds images with a progress bar into resumable shards (a crash or Ctrl-C resumes "
        "where it stopped), skips and lists unreadable images, then builds and saves the index "
        "atomically; or, with --from-embeddings, indexes the output of remap embed. --shards "
        "(or --shard-memory) splits the index by id hash, one Beam task per shard (Beam "
        "options after --). The index records the model, so later searches need no --model.",
        run=run_build,
    )
    build.add_argument("--model", default=None, help=MODEL_HELP + " (with --images)")
    build.add_argument("--images", help="an image folder, or a .txt/.csv manifest of paths")
    build.add_argument(
        "--from-embeddings",
        nargs="+",
        metavar="DIR",
        default=None,
        help="index the output of remap embed (one or more folders) instead of --images",
    )
    build.add_argument(
        "--shards", type=positive_int, default=None, help="split the index into N shards by id"
    )
    build.add_argument(
        "--shard-memory",
        type=byte_size,
        default=None,
        help="as many shards as needed for each build to fit this memory (e.g. 8GiB)",
    )
    build.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="local worker processes building shards (with --from-embeddings and --shards)",
    )
    build.add_argument("--out", required=True, help="the index directory to write")
    build.add_argument(
        "--embeddings", default=None, help="descriptor shard folder (default <out>.embeddings)"
    )
    build.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out (or descriptor) folder that holds other files: they are "
        "kept, and a file of a name remap writes is never replaced (move it away)",
    )
    _add_index_flags(build)
    build.add_argument(
        "--shard-size", type=positive_int, default=512, help="images per resumable shard"
    )
    build.add_argument("--batch-size", type=positive_int, default=32, help="images per call")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument(
        "beam_args", nargs="*", metavar="-- BEAM_OPTION", help="Beam pipeline options, after --"
    )


def _add_index_flags(build) -> None:
    """The index kind and the ScaNN options of ``index build``."""
    build.add_argument(
        "--kind", choices=("scann", "exact"), default="scann", help="index kind (default scann)"
    )
    build.add_argument(
        "--scann-mode",
        choices=("auto", "brute_force", "ah", "tree_ah"),
        default=None,
        help="default auto: brute force <20k, AH+reorder <100k, tree+AH+reorder above",
    )
    build.add_argument("--num-leaves", type=positive_int, help="tree leaves (default ~sqrt(n))")
    build.add_argument(
        "--leaves-to-search", type=positive_int, help="tree leaves searched per query"
    )
    build.add_argument("--reorder", type=int, help="candidates re-scored exactly")
    build.add_argument("--threads", type=non_negative_int, help="search threads (0 = all CPUs)")
    build.add_argument(
        "--target-recall",
        type=recall_target,
        default=None,
        help="ScaNN: tune leaves-to-search and reorder to this recall@10 on held-out vectors "
        "(default 0.95; 0: no tuning, the fixed defaults); with a tree whose --num-leaves is "
        "not given, also the PCA projection (rows of 256+ dims), leaf count and AH settings",
    )
    build.add_argument(
        "--tune-budget",
        type=positive_float,
        default=None,
        help="ScaNN: the tuning's extra builds (PCA projection, leaf counts, AH settings) may "
        "take this many times the first build's time (default 1)",
    )
    build.add_argument(
        "--pca-dims",
        type=pca_dims,
        default=None,
        help="ScaNN: PCA projection before the tree and AH codes (re-ordering scores the full "
        "rows): off, auto (ScaNN chooses the dimensions) or a number (default: off, or tuned)",
    )


def _scann_overrides(args) -> dict:
    overrides = {
        key: getattr(args, flag)
        for flag, key in _SCANN_FLAGS
        if getattr(args, flag, None) is not None
    }
    if overrides.get("target_recall") == 0:
        overrides["target_recall"] = None  # no tuning: the fixed defaults
    return overrides


def _check_sources(args) -> None:
    """--images and --model, or --from-embeddings; the shard flags that go with each."""
    from remap_tf.serving.collection import list_images

    if args.from_embeddings:
        if args.images or args.model:
            raise InvalidInputError("--from-embeddings replaces --images and --model")
        for folder in args.from_embeddings:
            paths.input_dir("--from-embeddings", folder)
    else:
        if not args.images or not args.model:
            raise InvalidInputError("give --images and --model, or --from-embeddings")
        paths.exported_model("--model", args.model)
        paths.input_path("--images", args.images)
        with paths.naming("--images"):
            list_images(args.images)
        if args.shard_memory is not None:
            raise InvalidInputError("--shard-memory needs --from-embeddings (use --shards)")
    if args.shards is not None and args.shard_memory is not None:
        raise InvalidInputError("give --shards or --shard-memory, not both")
    if args.beam_args and not args.from_embeddings:
        raise InvalidInputError("Beam options (after --) need --from-embeddings")


def _check_outputs(args) -> None:
    """--out: absent, empty or an index remap wrote (else --overwrite, which keeps the other
    files); never a descriptor folder. The descriptor folder --images writes (--embeddings,
    default <out>.embeddings): absent, empty or index build's own (else --overwrite)."""
    from remap_tf.serving.index.files import INDEX_COMMAND, check_index_output
    from remap_tf.serving.search import check_outputs, default_embeddings_dir

    written = []
    if not args.from_embeddings:
        written = [args.embeddings or default_embeddings_dir(args.out)]
    check_outputs(args.out, embeddings_dirs=written, sources=args.from_embeddings or ())
    with paths.naming("--out"):
        check_index_output(args.out, args.overwrite)
    paths.output_dir("--out", args.out, "an index", lambda folder: True)  # writable
    for folder in written:
        common.embeddings_output("--embeddings", folder, INDEX_COMMAND, args.overwrite)


def _check_shards(args) -> None:
    """--shards from 1 to `beam_index.MAX_SHARDS` and at most one per vector (the images
    listed, or the descriptors of --from-embeddings), before any work."""
    if args.shards is None:
        return
    from remap_tf.serving import embeddings
    from remap_tf.serving.beam_index import check_num_shards
    from remap_tf.serving.collection import list_images

    if args.from_embeddings:
        with paths.naming("--from-embeddings"):
            count = sum(embeddings.read_manifest(f)["count"] for f in args.from_embeddings)
    else:
        count = len(list_images(args.images)[0])
    check_num_shards(args.shards, count)


def _check_build(args) -> dict:
    """Every argument of ``index build`` before the model is loaded; the ScaNN overrides."""
    from remap_tf.serving.index import ScannConfig

    _check_sources(args)
    _check_outputs(args)
    _check_shards(args)
    overrides = _scann_overrides(args)
    if args.kind == "scann":
        for flag, key in _SCANN_FLAGS:
            if key in overrides:
                with paths.naming("--" + flag.replace("_", "-")):
                    ScannConfig(**{key: overrides[key]})
    elif overrides:
        raise InvalidInputError("ScaNN options (--scann-mode, --num-leaves, ...) need --kind scann")
    return overrides


def run_build(args) -> int:
    overrides = _check_build(args)
    from remap_tf.serving.search import build_index, build_index_from_embeddings

    if args.from_embeddings or args.shards:
        quiet_beam_logs(args.debug)  # a sharded build runs on Beam
    if args.from_embeddings:
        summary = build_index_from_embeddings(
            folders=args.from_embeddings,
            out=args.out,
            kind=args.kind,
            scann_config=overrides,
            shards=args.shards,
            memory_budget=args.shard_memory,
            workers=args.workers,
            beam_args=args.beam_args,
            overwrite=args.overwrite,
        )
    else:
        summary = build_index(
            embedder=common.embedder_for(args.model),
            images=Path(args.images),
            out=Path(args.out),
            embeddings_dir=args.embeddings,
            kind=args.kind,
            scann_config=overrides,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            progress=not args.quiet,
            model=args.model,
            shards=args.shards,
            overwrite=args.overwrite,
        )
    config = summary["config"]
    mode = f" ({config['mode']})" if "mode" in config else ""
    shards = summary.get("num_shards") or args.shards
    layout = f", {shards} shard(s)" if shards else ""
    print(
        f"indexed {summary['count']} images ({summary['dim']}-d) into {printable(args.out)}: "
        f"{args.kind}{mode}{layout}"
    )
    if args.kind == "scann" and not shards:
        from remap_tf.serving.index.scann import tuning_summary

        line = tuning_summary(config)
        if line:
            print(line)
    _print_skipped(summary.get("skipped", []))
    return 0


def _print_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s):")
        for item in skipped:
            print(f"  {printable(str(item['image']))}: {printable(str(item['reason']))}")


def run_add(args) -> int:
    paths.index_dir("--index", args.index)
    for image in args.images:
        paths.image_file("image", image)
    if args.model is not None:
        paths.exported_model("--model", args.model)
    from remap_tf.serving.index import load_index

    with paths.naming("--index"):
        model = common.model_for_index(args.model, load_index(args.index))
    from remap_tf.serving.search import add_images

    result = add_images(args.index, common.embedder_for(model), args.images)
    print(
        f"added {len(result['added'])} image(s) to {printable(args.index)}: "
        f"{result['count']} in all"
    )
    _print_skipped(result["skipped"])
    return 0


def run_delete(args) -> int:
    paths.index_dir("--index", args.index)
    from remap_tf.serving.search import delete_images

    with paths.naming("--index"):
        result = delete_images(args.index, args.ids)
    print(
        f"deleted {len(result['deleted'])} id(s) from {printable(args.index)}: "
        f"{result['count']} left"
    )
    return 0


def run_info(args) -> int:
    paths.index_dir("--index", args.index)
    from remap_tf.serving.search import index_info

    with paths.naming("--index"):
        info = index_info(args.index)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    metadata = info["metadata"]
    print(f"index       {printable(info['index'])}")
    config = info["config"]
    detail = config.get("mode", "exhaustive")
    if info["kind"] == "sharded":
        detail = f"{config['num_shards']} shards by id hash {config['hash']}"
    print(f"kind        {info['kind']} ({detail})")
    print(f"images      {info['count']} ({info['dim']}-d descriptors)")
    print(f"model       {printable(str(metadata.get('model') or 'not recorded'))}")
    print(f"image root  {printable(str(metadata.get('image_root') or 'not recorded'))}")
    print(f"size        {info['bytes'] / 1e6:.1f} MB on disk")
    if info["pending_changes"]:
        print(f"log         {info['pending_changes']} change(s) not compacted yet")
    return 0


def run_compact(args) -> int:
    from remap_tf.serving.index.changelog import compact_index

    result = compact_index(args.index)
    if result["folded"]:
        print(
            f"compacted {printable(args.index)}: {result['folded']} change(s) folded, "
            f"{result['count']} images"
        )
    else:
        print(f"{printable(args.index)}: nothing to compact ({result['count']} images)")
    return 0


def run_upgrade(args) -> int:
    paths.input_dir("--embeddings", args.embeddings)
    paths.input_path("--images", args.images)
    from remap_tf.serving.collection import list_images

    with paths.naming("--images"):
        list_images(args.images)
    paths.exported_model("--model", args.model)
    from remap_tf.serving.search import upgrade_embeddings

    with paths.naming("--embeddings"):
        result = upgrade_embeddings(args.embeddings, args.images, args.model)
    state = "finished" if result["manifest"] else "unfinished: `remap index build` embeds the rest"
    print(
        f"upgraded {printable(args.embeddings)}: {result['converted']} of "
        f"{result['num_shards']} shard(s) "
        f"converted ({state})"
    )
    return 0
