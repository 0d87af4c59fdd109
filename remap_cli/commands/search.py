"""``remap search``: query an index with images (`remap_tf.serving.search.search_images`)."""

from __future__ import annotations

import os

from remap_cli import common
from remap_cli.args import MODEL_HELP, add_command, positive_int
from remap_tf.errors import BadPathError


def add_parser(subparsers) -> None:
    """Registers ``remap search``."""
    parser = add_command(
        subparsers,
        "search",
        "search an index with query images",
        "Embeds each query image with the index's model (or --model) and prints its nearest "
        "images; optionally writes them as JSON and as an HTML (+PNG) report.",
        run=run,
    )
    parser.add_argument("--index", required=True, help="an index directory (remap index build)")
    parser.add_argument("--model", default=None, help=MODEL_HELP + " (default: the index's model)")
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="query image files")
    parser.add_argument("--k", type=positive_int, default=10, help="results per query")
    parser.add_argument("--report", default=None, help="write an HTML (+PNG) report here")
    parser.add_argument("--json", default=None, help="write the results as JSON here")


def run(args) -> int:
    from remap_tf.io import atomic_write_json
    from remap_tf.serving.changelog import load_current
    from remap_tf.serving.report import write_report
    from remap_tf.serving.search import image_path, search_images

    # The snapshot plus the changes a `remap serve` logged beside it; a bad index fails here,
    # before the model is loaded.
    index = load_current(args.index)
    for query in args.queries:
        if not os.path.isfile(query):
            what = "is a folder, not an image file" if os.path.isdir(query) else "does not exist"
            raise BadPathError(f"query image {query} {what}")
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
        print(query)
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:>3}  {hit['score']:.4f}  {hit['id']}")
    if args.json:
        atomic_write_json(args.json, results)
    if args.report:
        write_report(
            args.report,
            queries=args.queries,
            results=[[h["path"] for h in r["results"]] for r in results],
            scores=[[h["score"] for h in r["results"]] for r in results],
            result_names=[[h["id"] for h in r["results"]] for r in results],
            title=f"remap search: {len(args.queries)} queries in {args.index}",
        )
        print(f"report: {args.report}")
    return 0
