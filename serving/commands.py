"""Subcommands of `remap` from this package (see serving/cli.py): index, search, evaluate.

    remap index build --model <export dir | host:port> --images <folder | manifest> --out DIR
    remap search --index DIR --model ... QUERY... [--k 10] [--report out.html]
    remap evaluate --dataset ... --model ... [--json FILE]

The parsers import nothing heavy; each handler imports what it needs and calls one library
function below (``build_index``, ``search_images``, ``evaluate_retrieval``), which take an
embedder object (``.embed(images) -> (n, dim)``, ``.dim``) so they can be used, and tested,
without TensorFlow Serving.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_KAPPAS = (1, 5, 10)


def _embedder(model: str):
    """The embedder for ``--model`` (a SavedModel folder or ``host:port[/name]``)."""
    from serving.client import make_embedder

    return make_embedder(model)


def _write_json_atomic(path, value) -> None:
    from remap_tf.io import atomic_write_json  # lazy: importing remap_tf loads TensorFlow

    atomic_write_json(path, value)


# ---------------------------------------------------------------------------------------
# Library functions
# ---------------------------------------------------------------------------------------


def build_index(
    embedder,
    images,
    out,
    embeddings_dir=None,
    kind: str = "scann",
    scann_config: dict | None = None,
    shard_size: int = 512,
    batch_size: int = 32,
    progress: bool = True,
    model: str | None = None,
) -> dict:
    """Embeds a folder or manifest of images (resumably) and saves an index of them.

    Args:
        embedder: ``.embed(list of paths) -> (n, dim)`` and ``.dim``.
        images: an image folder (recursive) or a manifest (.txt / .csv with a path column).
        out: the index directory (written atomically).
        embeddings_dir: descriptor shards, kept to resume an interrupted run (default
            ``<out>.embeddings`` beside the index).
        kind: "scann" or "exact".
        scann_config: ``serving.index.ScannConfig`` overrides.
        shard_size, batch_size: see ``serving.embedding_store.embed_collection``.
        progress: show a progress bar.
        model: the model's name or path, recorded in the index metadata.

    Returns:
        ``{"index": path, "count", "dim", "skipped": [{"image", "reason"}], "config"}``.
    """
    from serving.embedding_store import embed_collection, list_images
    from serving.index import make_index

    out = Path(out)
    paths, ids = list_images(images)
    embeddings_dir = (
        Path(embeddings_dir) if embeddings_dir else out.parent / f"{out.name}.embeddings"
    )
    collection = embed_collection(
        embedder, paths, embeddings_dir, shard_size=shard_size, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    if not collection.images:
        raise ValueError(f"none of the {len(paths)} images under {images} could be embedded")
    id_of = dict(zip(paths, ids, strict=True))
    index = make_index(kind, int(embedder.dim), **(scann_config or {}))
    index.add([id_of[p] for p in collection.images], collection.descriptors)
    source = Path(images).resolve()
    index.metadata = {
        "images": str(source),
        "image_root": str(source if source.is_dir() else source.parent),
        "model": model,
        "skipped": len(collection.skipped),
    }
    index.save(out)
    return {
        "index": str(out),
        "count": len(index),
        "dim": index.dim,
        "skipped": collection.skipped,
        "resumed_shards": collection.resumed_shards,
        "config": index.config,
    }


def image_path(index, image_id: str) -> str:
    """The file of an indexed image: its id under the index's recorded image root."""
    root = index.metadata.get("image_root")
    if root is None or os.path.isabs(image_id):
        return image_id
    return str(Path(root) / image_id)


def search_images(index, embedder, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Embeds query images and searches the index.

    Args:
        index: a ``serving.index.Index``.
        embedder: the model the index was built with.
        queries: (num_queries,) image paths or encoded bytes.
        k: results per query.

    Returns:
        ``(ids, scores)`` as ``Index.search``: (num_queries, k) each.
    """
    if int(embedder.dim) != index.dim:
        raise ValueError(
            f"the model gives {embedder.dim}-d descriptors but the index holds {index.dim}-d "
            "ones; search with the model the index was built with"
        )
    missing = [q for q in queries if isinstance(q, str | Path) and not os.path.isfile(q)]
    if missing:
        raise FileNotFoundError(f"query image(s) not found: {', '.join(map(str, missing))}")
    descriptors = np.asarray(embedder.embed(list(queries)), dtype=np.float32)
    return index.search(descriptors, k=k)


def evaluate_retrieval(
    embedder,
    dataset,
    kappas=DEFAULT_KAPPAS,
    query_expansion: int = 0,
    qe_alpha: float = 3.0,
    database_augmentation: int = 0,
    dba_alpha: float = 3.0,
    embeddings_dir=None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """mAP and mP@k of a model on a retrieval dataset, per protocol.

    The database is embedded (resumably, into ``embeddings_dir`` when given), queries are
    cropped to their box where the dataset has one, the database is ranked exhaustively by
    dot product, optionally after database-side augmentation (DBA) and α query expansion
    (αQE; Radenović, Tolias & Chum, TPAMI 2018). Database images that cannot be read are
    never retrieved (a positive among them counts as missed); queries that cannot be read
    are left out and counted in ``skipped_queries``.

    Args:
        embedder: ``.embed(images) -> (n, dim)``, ``.dim``.
        dataset: a ``remap_tf.datasets.RetrievalDataset``.
        kappas: k values of mP@k.
        query_expansion: αQE neighbours (0 = off); ``qe_alpha`` its exponent.
        database_augmentation: DBA neighbours (0 = off); ``dba_alpha`` its exponent.
        embeddings_dir: keep the database descriptor shards here (resumable).
        batch_size: images per embed call.
        progress: show progress bars.

    Returns:
        ``{"protocols": {name: {"mAP", "mP@k"..., "num_queries", "num_skipped", "ap"}},
        "rankings": (num_evaluated_queries, num_database) int, "query_index": the dataset
        indices of the evaluated queries, "skipped_database": [...], "skipped_queries": [...]}``.
    """
    from remap_tf import evaluation
    from remap_tf.datasets import query_image
    from serving.embedding_store import embed_collection, embed_skipping

    with tempfile.TemporaryDirectory(prefix="remap-eval-") as scratch:
        collection = embed_collection(
            embedder,
            dataset.database,
            embeddings_dir or scratch,
            batch_size=batch_size,
            progress=progress,
        )
    if not collection.images:
        raise ValueError(f"none of the {len(dataset.database)} database images could be embedded")
    position = {p: i for i, p in enumerate(dataset.database)}
    db_rows = np.array([position[p] for p in collection.images], dtype=np.int64)
    database = collection.descriptors

    query_inputs, query_index, skipped_queries = [], [], []
    for i, query in enumerate(dataset.queries):
        try:
            query_inputs.append(query_image(query))  # cropped to the box where there is one
            query_index.append(i)
        except (OSError, ValueError) as error:
            skipped_queries.append({"query": query.path, "reason": str(error)})
    kept, rows = [], []
    for start in range(0, len(query_inputs), batch_size):
        part = query_inputs[start : start + batch_size]
        part_kept, part_rows, part_skipped = embed_skipping(embedder, part)
        kept.extend(query_index[start + i] for i in part_kept)
        rows.append(part_rows)
        skipped_queries.extend(
            {"query": dataset.queries[query_index[start + i]].path, "reason": reason}
            for i, reason in part_skipped
        )
    if not kept:
        raise ValueError(f"none of the {len(dataset.queries)} query images could be embedded")
    queries = np.concatenate(rows)
    if database_augmentation:
        database = evaluation.database_augmentation(database, database_augmentation, dba_alpha)
    if query_expansion:
        queries = evaluation.alpha_query_expansion(queries, database, query_expansion, qe_alpha)
    rankings = db_rows[evaluation.rank_database(queries, database)]
    protocols = {}
    for protocol in dataset.protocols:
        positives = [dataset.queries[i].groundtruth[protocol][0] for i in kept]
        junk = [dataset.queries[i].groundtruth[protocol][1] for i in kept]
        protocols[protocol] = evaluation.mean_average_precision(rankings, positives, junk, kappas)
    return {
        "protocols": protocols,
        "rankings": rankings,
        "query_index": kept,
        "skipped_database": collection.skipped,
        "skipped_queries": skipped_queries,
    }


def metrics_json(protocols: dict) -> dict:
    """The JSON figures: ``{"mAP", "mP@k"..., "num_queries"}``, nested per protocol if several."""

    def clean(result):
        out = {}
        for key, value in result.items():
            if key == "ap":
                continue
            out[key] = None if isinstance(value, float) and math.isnan(value) else value
        return out

    if list(protocols) == ["default"]:
        return clean(protocols["default"])
    return {name: clean(result) for name, result in protocols.items()}


def metrics_table(protocols: dict, kappas=DEFAULT_KAPPAS) -> str:
    """A plain-text table of mAP and mP@k (in %) per protocol."""
    head = ["protocol", "mAP"] + [f"mP@{k}" for k in kappas] + ["queries"]
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for name, result in protocols.items():
        cells = [name, result["mAP"]] + [result[f"mP@{k}"] for k in kappas]
        text = [f"{name:>9}"] + [
            f"{'n/a':>9}" if math.isnan(v) else f"{100 * v:>9.2f}" for v in cells[1:]
        ]
        text.append(f"{result['num_queries']:>9}")
        lines.append("  ".join(text))
    return "\n".join(lines) + "\n(mAP and mP@k in %)"


# ---------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------


def _scann_overrides(args) -> dict:
    overrides = {}
    for flag, key in (
        ("scann_mode", "mode"),
        ("num_leaves", "num_leaves"),
        ("leaves_to_search", "num_leaves_to_search"),
        ("reorder", "reorder"),
        ("threads", "num_threads"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return overrides


def _cmd_index_build(args) -> int:
    from serving.index import ScannConfig

    images = Path(args.images)
    if not images.exists():
        raise FileNotFoundError(f"--images {images} does not exist")
    out = Path(args.out)
    if out.exists() and not (out / "manifest.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is a non-empty folder that is not an index")
    overrides = _scann_overrides(args)
    if args.kind == "scann":
        ScannConfig(**overrides)  # validate the flags before loading the model
    elif overrides:
        raise ValueError("ScaNN options (--scann-mode, --num-leaves, ...) need --kind scann")
    summary = build_index(
        embedder=_embedder(args.model),
        images=images,
        out=out,
        embeddings_dir=args.embeddings,
        kind=args.kind,
        scann_config=overrides,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=not args.quiet,
        model=args.model,
    )
    config = summary["config"]
    mode = f" ({config['mode']})" if "mode" in config else ""
    print(f"indexed {summary['count']} images ({summary['dim']}-d) into {out}: {args.kind}{mode}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable image(s):")
        for item in summary["skipped"]:
            print(f"  {item['image']}: {item['reason']}")
    return 0


def _cmd_search(args) -> int:
    from serving.index import load_index

    index = load_index(args.index)  # fail on a bad index before loading the model
    for query in args.queries:
        if not os.path.isfile(query):
            raise FileNotFoundError(f"query image {query} does not exist")
    ids, scores = search_images(index, _embedder(args.model), args.queries, k=args.k)
    results = []
    for query, row_ids, row_scores in zip(args.queries, ids, scores, strict=True):
        hits = [
            {"id": i, "score": float(s), "path": image_path(index, i)}
            for i, s in zip(row_ids, row_scores, strict=True)
            if i is not None
        ]
        results.append({"query": query, "results": hits})
        print(query)
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:>3}  {hit['score']:.4f}  {hit['id']}")
    if args.json:
        _write_json_atomic(args.json, results)
    if args.report:
        from serving.report import write_report

        write_report(
            args.report,
            queries=args.queries,
            results=[[h["path"] for h in r["results"]] for r in results],
            scores=[[h["score"] for h in r["results"]] for r in results],
            title=f"remap search: {len(args.queries)} queries in {args.index}",
        )
        print(f"report: {args.report}")
    return 0


def _cmd_evaluate(args) -> int:
    from remap_tf.datasets import load_dataset

    dataset = load_dataset(args.dataset, format=args.format, images=args.images)
    kappas = tuple(args.kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"--kappas must be positive, got {list(kappas)}")
    result = evaluate_retrieval(
        _embedder(args.model),
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
        f"{dataset.name}: {len(dataset.database)} database images, {len(dataset.queries)} queries"
    )
    print(metrics_table(protocols, kappas))
    for kind in ("skipped_database", "skipped_queries"):
        if result[kind]:
            print(f"{kind.replace('_', ' ')}: {len(result[kind])}", file=sys.stderr)
    if args.json:
        _write_json_atomic(args.json, metrics_json(protocols))
        print(f"figures: {args.json}")
    if args.report:
        _evaluation_report(args.report, dataset, result, k=args.report_k)
        print(f"report: {args.report}")
    return 0


def _evaluation_report(path, dataset, result, k: int = 10) -> None:
    """Top-k of each evaluated query, framed by the first 'medium'/'default' ground truth."""
    from serving.report import write_report

    protocol = "medium" if "medium" in dataset.protocols else dataset.protocols[0]
    queries, results, relevance, boxes = [], [], [], []
    for row, qi in enumerate(result["query_index"]):
        query = dataset.queries[qi]
        positives, junk = (set(v) for v in query.groundtruth[protocol])
        top = [int(i) for i in result["rankings"][row][:k]]
        queries.append(query.path)
        boxes.append(query.box)
        results.append([dataset.database[i] for i in top])
        relevance.append([True if i in positives else (None if i in junk else False) for i in top])
    write_report(
        path,
        queries=queries,
        results=results,
        relevance=relevance,
        ap=list(result["protocols"][protocol]["ap"]),
        query_boxes=boxes,
        query_names=[dataset.queries[qi].name for qi in result["query_index"]],
        title=f"remap evaluate: {dataset.name} ({protocol})",
    )


# ---------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------


def add_parsers(subparsers) -> None:
    """Registers ``index``, ``search`` and ``evaluate`` on the `remap` parser."""
    model_help = "an exported model folder (remap export) or a TF Serving 'host:port[/name]'"

    index = subparsers.add_parser("index", help="build a searchable index of image descriptors")
    index_sub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = index_sub.add_parser(
        "build",
        help="embed a folder or manifest of images and save a ScaNN index",
        description="Embeds images with a progress bar into resumable shards (a crash or "
        "Ctrl-C resumes where it stopped), skips and lists unreadable images, then builds "
        "and saves the index atomically.",
    )
    build.add_argument("--model", required=True, help=model_help)
    build.add_argument(
        "--images", required=True, help="an image folder, or a .txt/.csv manifest of paths"
    )
    build.add_argument("--out", required=True, help="the index directory to write")
    build.add_argument(
        "--embeddings", default=None, help="descriptor shard folder (default <out>.embeddings)"
    )
    build.add_argument("--kind", choices=("scann", "exact"), default="scann")
    build.add_argument(
        "--scann-mode",
        choices=("auto", "brute_force", "ah", "tree_ah"),
        default=None,
        help="default auto: brute force <20k, AH+reorder <100k, tree+AH+reorder above",
    )
    build.add_argument("--num-leaves", type=int, default=None, help="tree leaves (~sqrt(n))")
    build.add_argument("--leaves-to-search", type=int, default=None)
    build.add_argument("--reorder", type=int, default=None, help="candidates re-scored exactly")
    build.add_argument("--threads", type=int, default=None, help="0 = all CPUs")
    build.add_argument("--shard-size", type=int, default=512)
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_index_build)

    search = subparsers.add_parser("search", help="search an index with query images")
    search.add_argument("--index", required=True, help="an index directory (remap index build)")
    search.add_argument("--model", required=True, help=model_help)
    search.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    search.add_argument("--k", type=int, default=10, help="results per query")
    search.add_argument("--report", default=None, help="write an HTML (+PNG) report here")
    search.add_argument("--json", default=None, help="write the results as JSON here")
    search.set_defaults(func=_cmd_search)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="mAP and mP@k of a model on a retrieval benchmark or labelled images",
        description="Datasets: gnd_roxford5k.pkl / gnd_rparis6k.pkl (revisited; images in "
        "jpg/ beside it or --images), an Oxford/Paris ground-truth folder (with --images), a "
        "Holidays or UKBench image folder, a folder of class folders, or a groups .json.",
    )
    evaluate.add_argument("--dataset", required=True, help="ground truth (see above)")
    evaluate.add_argument(
        "--format",
        default="auto",
        choices=("auto", "revisited", "oxford", "holidays", "ukbench", "folders", "groups"),
    )
    evaluate.add_argument("--images", default=None, help="image folder (revisited, oxford)")
    evaluate.add_argument("--model", required=True, help=model_help)
    evaluate.add_argument("--json", default=None, help="write the figures as JSON here")
    evaluate.add_argument("--kappas", type=int, nargs="+", default=list(DEFAULT_KAPPAS))
    evaluate.add_argument("--qe", type=int, default=0, help="alpha-QE neighbours (0 = off)")
    evaluate.add_argument("--qe-alpha", type=float, default=3.0)
    evaluate.add_argument("--dba", type=int, default=0, help="DBA neighbours (0 = off)")
    evaluate.add_argument("--dba-alpha", type=float, default=3.0)
    evaluate.add_argument("--embeddings", default=None, help="keep database descriptors here")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--report", default=None, help="write an HTML (+PNG) report here")
    evaluate.add_argument("--report-k", type=int, default=10)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_evaluate)
