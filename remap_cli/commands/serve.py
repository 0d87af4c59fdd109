"""``remap serve``: the search service and its page (`remap_tf.serving.service.server.serve`)."""

from __future__ import annotations

from remap_cli import paths
from remap_cli.args import MODEL_HELP, add_command, float_above, int_at_least, positive_int
from remap_tf.serving.service.settings import API_KEY_ENV, API_KEY_FLAG  # standard library only


def add_parser(subparsers) -> None:
    """Registers ``remap serve``."""
    parser = add_command(
        subparsers,
        "serve",
        "serve searches over an index over HTTP, with a web page",
        "Keeps the index in memory and answers POST /v1/search (multipart 'image' or the raw "
        "image), POST /v1/images and DELETE /v1/images/{id} (logged before they are "
        "acknowledged, replayed after a restart), GET /v1/images/{id}, /healthz, /readyz and "
        "/metrics, and the search page at /. Queries arriving together are embedded in one "
        "batch. Binds 127.0.0.1 unless --host says otherwise.",
        run=run,
    )
    parser.add_argument("--index", required=True, help="an index directory (remap index build)")
    parser.add_argument("--model", default=None, help=MODEL_HELP + " (default: the index's model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int_at_least(0),
        default=8080,
        help="port 0-65535 (default 8080; 0 = any free one)",
    )
    parser.add_argument(
        API_KEY_FLAG,
        default=None,
        help=f"bearer token the write endpoints require (default: ${API_KEY_ENV}; unset: none; "
        "an empty or blank key is refused)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float_above(0.0, inclusive=True),
        default=5.0,
        help="how long a query waits for others to share its model call (default 5)",
    )
    parser.add_argument("--max-batch", type=positive_int, default=32, help="images per model call")
    parser.add_argument(
        "--embed-workers", type=positive_int, default=1, help="model calls in flight (default 1)"
    )
    parser.add_argument(
        "--search-threads", type=positive_int, default=4, help="concurrent index searches"
    )
    parser.add_argument(
        "--max-body-mb",
        type=float_above(0.0),
        default=20.0,
        help="largest request body in MB (default 20; larger ones get 413)",
    )
    parser.add_argument("--max-k", type=positive_int, default=100, help="largest k (default 100)")
    parser.add_argument(
        "--compact-after",
        type=int_at_least(0),
        default=10_000,
        help="fold the change log into a new snapshot past this many changes (0: never)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from this origin (repeatable; default: CORS off)",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="serve GET /v1/images/{id} from this folder and store added images in it "
        "(default: no image files are served or stored; the root an index records is never used)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    # SIGTERM/Ctrl-C is how a server is stopped: once serving, a signal ends it with a graceful
    # shutdown and exit 0, not as "interrupted" (130). A signal during start-up still is one.
    parser.set_defaults(signal_stops_cleanly=True)


def run(args) -> int:
    if args.image_root is not None:  # a typo must not serve nothing and store added images
        paths.input_dir("--image-root", args.image_root)
    from remap_tf.serving.service.server import serve
    from remap_tf.serving.service.settings import ServiceSettings, resolve_api_key

    settings = ServiceSettings(
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        embed_workers=args.embed_workers,
        search_threads=args.search_threads,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_k=args.max_k,
        compact_after=args.compact_after,
        api_key=resolve_api_key(args.api_key),
        cors_origins=tuple(args.cors_origin),
        image_root=args.image_root,
    )
    return serve(
        index_dir=args.index,
        model=args.model,
        host=args.host,
        port=args.port,
        settings=settings,
        log_level=args.log_level,
        access_log=args.access_log,
    )
