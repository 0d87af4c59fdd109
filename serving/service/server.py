"""`serve`: the one function behind ``remap serve``.

It opens the index with its change log (replaying what a previous run logged; a corrupt
index or log, or an index another process holds, fails here with a one-line error), makes
the embedder (an exported SavedModel in process, or TF Serving over gRPC), and runs the app
under uvicorn, one process: the index lives in its memory and its change log has one
writer. The model is warmed up in the background and retried until it answers, so the
service may start before TF Serving does (``/readyz`` says 503 until then).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket

import uvicorn

from remap_tf.checks import check_int
from remap_tf.errors import InvalidInputError
from remap_tf.serving.client import make_embedder
from remap_tf.serving.index.changelog import DurableIndex
from remap_tf.serving.search import IMAGE_ROOT, check_embedder, recorded_model
from remap_tf.serving.service.app import create_app
from remap_tf.serving.service.settings import API_KEY_ENV, ServiceSettings
from remap_tf.serving.service.state import SearchService

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("remap_tf.serving.service")


def _configure_logging(level: str) -> None:
    package = logging.getLogger("remap_tf")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        package.addHandler(handler)
    package.setLevel(level.upper())


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one), not yet listening.

    Raises:
        InvalidInputError: the port is not 0-65535 (the resolver would take 99999 modulo
            65536), or the address cannot be bound (in use, not local, no permission).
    """
    check_int("port", port, minimum=0, maximum=65535)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as error:
        raise InvalidInputError(f"cannot listen on {host}:{port}: {error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise InvalidInputError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_exposure(host: str, settings: ServiceSettings, recorded_root) -> None:
    """Says at start whether the write endpoints need a key and which files are served."""
    if settings.api_key is not None:
        logger.info("POST /v1/images and DELETE /v1/images/{id} require the API key")
    elif _is_loopback(host):
        logger.info(
            "POST /v1/images and DELETE /v1/images/{id} are open to every local user: no API "
            "key (set --api-key or %s)",
            API_KEY_ENV,
        )
    else:
        logger.warning(
            "listening on %s without an API key: anyone who reaches it can add and delete "
            "images (set --api-key or %s)",
            host,
            API_KEY_ENV,
        )
    if settings.image_root is not None:
        logger.info("GET /v1/images/{id} serves files from %s only", settings.image_root)
    else:
        hint = f" (the index records {recorded_root})" if recorded_root else ""
        logger.info(
            "no --image-root: GET /v1/images/{id} serves no files and added images are not "
            "stored%s",
            hint,
        )


def serve(
    index_dir,
    model: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    settings: ServiceSettings | None = None,
    log_level: str = "info",
    access_log: bool = False,
) -> int:
    """Runs the search service until SIGINT or SIGTERM; returns 0 after a clean shutdown.

    Args:
        index_dir: an index directory (`remap index build`); its change log is beside it.
        model: an export folder or ``host:port[/name]`` of TF Serving (default: the model
            the index recorded).
        host, port: where to listen (127.0.0.1 by default; port 0 picks a free one).
        settings: batching, limits, API key, CORS, compaction (`ServiceSettings`).
        log_level: the service's and uvicorn's log level.
        access_log: log every request (uvicorn's access log).

    Raises:
        RemapError: a bad index or log, no model, an address that cannot be bound.
    """
    settings = settings or ServiceSettings()
    _configure_logging(log_level)
    sock = bind_socket(host, port)
    try:
        store = DurableIndex.open(index_dir, compact_after=settings.compact_after)
    except BaseException:
        sock.close()
        raise
    try:
        model = model or recorded_model(store.index)
        if not model:
            raise InvalidInputError(
                "--model is required: this index does not record the model it was built with"
            )
        embedder = make_embedder(model, chunk_size=settings.max_batch)
        if hasattr(embedder, "path"):  # in process: the dimension is known without a call
            check_embedder(store.index, embedder)
        service = SearchService(store, embedder, settings, model=str(model))
        app = create_app(service)
    except BaseException:
        store.close()
        sock.close()
        raise
    _log_exposure(host, settings, store.metadata.get(IMAGE_ROOT))
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"remap serve: http://{shown}:{bound_port}/ ({len(store)} images in {index_dir}, "
        f"{store.replayed} logged change(s) replayed; model {model})",
        flush=True,
    )
    config = uvicorn.Config(
        app, log_level=log_level.lower(), access_log=access_log, timeout_graceful_shutdown=10
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    print("remap serve: stopped", flush=True)
    return 0
