"""The service's settings: one validated dataclass, filled from ``remap serve``'s flags."""

from __future__ import annotations

import dataclasses
import os

from remap_tf.errors import InvalidInputError

API_KEY_ENV = "REMAP_API_KEY"
API_KEY_FLAG = "--api-key"


def check_api_key(key: str | None, name: str = "the API key") -> str | None:
    """``key`` unless it is empty or blank, which would turn authentication off in silence
    (``--api-key "$KEY"`` with ``KEY`` unset passes ``""``); None stays None (no key).

    Raises:
        InvalidInputError: ``<name> is empty ...``, naming where the key came from.
    """
    if key is not None and not key.strip():
        raise InvalidInputError(
            f"{name} is {'empty' if not key else 'blank'}: give a token, or leave it unset to "
            "serve without one (anyone who reaches the service can then add and delete images)"
        )
    return key


def resolve_api_key(flag_value: str | None, environ=os.environ) -> str | None:
    """The write endpoints' key: ``--api-key``, else ``$REMAP_API_KEY``, else None.

    Raises:
        InvalidInputError: the one given is empty or blank (`check_api_key`).
    """
    if flag_value is not None:
        return check_api_key(flag_value, API_KEY_FLAG)
    return check_api_key(environ.get(API_KEY_ENV), f"${API_KEY_ENV}")


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """Every knob of the search service.

    Attributes:
        batch_window_ms: how long the first query of a batch waits for others to join it.
        max_batch: most images per model call.
        embed_workers: model calls in flight at once (1 suits an in-process model, which
            uses every core; more can help against a remote TF Serving).
        search_threads: threads running index searches (and changes) concurrently.
        max_body_bytes: largest request body accepted (413 above).
        max_k: largest ``k`` a search may ask for.
        max_qe: largest ``qe`` (alpha query expansion neighbours).
        qe_alpha: the expansion's similarity exponent (as ``remap evaluate --qe``).
        compact_after: fold the change log into a new snapshot once it holds this many
            changes (0: only with ``remap index compact``).
        api_key: bearer token required by the write endpoints (None: no check).
        cors_origins: origins allowed to call the API from a browser (empty: CORS off).
        image_root: the folder ``GET /v1/images/{id}`` serves files from and ``POST
            /v1/images`` stores them in, given by the operator (``--image-root``); None: no
            files are served or stored. Never the root an index records: a received index
            could name ``/`` and publish every file the service can read.
        warmup_retry_s: seconds between warm-up attempts while the model does not answer.
        descriptor_cache: descriptors of indexed images kept for query expansion.
    """

    batch_window_ms: float = 5.0
    max_batch: int = 32
    embed_workers: int = 1
    search_threads: int = 4
    max_body_bytes: int = 20 * 1024 * 1024
    max_k: int = 100
    max_qe: int = 10
    qe_alpha: float = 3.0
    compact_after: int = 10_000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    image_root: str | None = None
    warmup_retry_s: float = 2.0
    descriptor_cache: int = 10_000

    def __post_init__(self):
        checks = {
            "batch_window_ms": self.batch_window_ms >= 0,
            "max_batch": self.max_batch >= 1,
            "embed_workers": self.embed_workers >= 1,
            "search_threads": self.search_threads >= 1,
            "max_body_bytes": self.max_body_bytes >= 1,
            "max_k": self.max_k >= 1,
            "max_qe": self.max_qe >= 0,
            "qe_alpha": self.qe_alpha >= 0,
            "compact_after": self.compact_after >= 0,
            "warmup_retry_s": self.warmup_retry_s > 0,
            "descriptor_cache": self.descriptor_cache >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidInputError(
                    f"service setting {name} is out of range: {getattr(self, name)!r}"
                )
        check_api_key(self.api_key)
