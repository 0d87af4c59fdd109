"""``remap search``: query an index with images (`remap_tf.serving.search.search_images`)."""

from __future__ import annotations

from remap_cli import common, paths
from remap_cli.args import MODEL_HELP, add_command, add_overwrite, positive_int, printable
from remap_tf.outputs import publish_report


def add_parser(subparsers) -> None:
    """Registers ``remap search``."""
    parser = add_command(
        subparsers,
        "search",
        "search an index with query images",
        "Embeds each query image with the index's model (or --model) and prints its nearest "
        "images; optionally writes them as JSON and as an HTML report (side files in "
        "<report>_files/).",
        run=run,
    )
    parser.add_argument("--index", required=True, help="an index directory (remap index build)")
    parser.add_argument("--model", default=None, help=MODEL_HELP + " (default: the index's model)")
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    parser.add_argument("--k", type=positive_int, default=10, help="results per query")
    parser.add_argument("--report", default=None, help="write an HTML report here (.html)")
    parser.add_argument("--json", default=None, help="write the results as JSON here (.json)")
    add_overwrite(parser)


def _check(args) -> None:
    """Every argument, before the model is loaded."""
    paths.index_dir("--index", args.index)
    for query in args.queries:
        paths.image_file("query", query)
    if args.model is not None:
        paths.exported_model("--model", args.model)
    if args.report:
        paths.output_file("--report", args.report, "HTML report", args.overwrite)
        paths.report_files("--report", args.report, args.overwrite)
    if args.json:
        paths.output_file("--json", args.json, "search results JSON", args.overwrite)


def run(args) -> int:
    _check(args)
    from remap_tf.serving.index.changelog import load_current

    # The snapshot plus the changes a `remap serve` logged beside it; a bad index fails here,
    # before the model is loaded.
    with paths.naming("--index"):
        index = load_current(args.index)
    from remap_tf.io import atomic_write_json
    from remap_tf.serving.report import format_scores, write_report
    from remap_tf.serving.search import image_path, search_images

    embedder = common.embedder_for(common.model_for_index(args.model, index))
    ids, scores = search_images(index, embedder, args.queries, k=args.k)
    results = []
    for query, row_ids, row_scores in zip(args.queries, ids, scores, strict=True):
        hits = [
            {"id": i, "score": float(s), "path": image_path(index, i)}
            for i, s in zip(row_ids, row_scores, strict=True)
            if i is not None
        ]
        results.append({"query": query, "results": hits})
        print(printable(query))  # a name holding a newline must not split the result lines
        texts = format_scores([hit["score"] for hit in hits])
        for rank, (hit, text) in enumerate(zip(hits, texts, strict=True), 1):
            print(f"  {rank:>3}  {text}  {printable(hit['id'])}")
    if args.json:
        atomic_write_json(args.json, results)
    if args.report:
        # Side files only into remap's own <name>_files/ (a user's folder needs --overwrite).
        publish_report(
            args.report,
            lambda page: write_report(
                page,
                queries=args.queries,
                results=[[h["path"] for h in r["results"]] for r in results],
                scores=[[h["score"] for h in r["results"]] for r in results],
                result_names=[[h["id"] for h in r["results"]] for r in results],
                title=f"remap search: {len(args.queries)} queries in {args.index}",
            ),
            overwrite=args.overwrite,
        )
        print(f"report: {printable(args.report)}")
    return 0
