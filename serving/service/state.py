"""The search service's state and operations, independent of HTTP.

`SearchService` holds the index (a `DurableIndex`: changes logged before they apply,
replayed on start, compacted past a size), the embedder behind an `EmbedBatcher`, the
readiness of the model, and the image root (``--image-root``, never the index's) the
images are served from. Its ``search``,
``add_image`` and ``delete_image`` coroutines are what the HTTP routes call; failures the
client caused or can act on are `ServiceError`s (or `remap_tf.errors` types), mapped to
status codes by `remap_tf.serving.service.app`.

Threads: the event loop never blocks. Model calls run in the batcher's worker threads,
searches in a pool of ``search_threads`` (they share the index's read lock), changes in one
writer thread (each holds the write lock only while it applies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from remap_tf import evaluation
from remap_tf.contract import image_format
from remap_tf.errors import InvalidInputError, RemapError
from remap_tf.io import atomic_write_bytes
from remap_tf.serving.collection import id_problem
from remap_tf.serving.index.changelog import DurableIndex
from remap_tf.serving.search import check_embedder
from remap_tf.serving.service.batcher import EmbedBatcher
from remap_tf.serving.service.metrics import Metrics
from remap_tf.serving.service.settings import ServiceSettings

logger = logging.getLogger("remap_tf.serving.service")

MAX_ID_LENGTH = 1024  # a bound on the request, beside the collection's rule for ids
# A change log write failing with these means the disk (or a quota, or a size limit) is full:
# 507 Insufficient Storage. Any other OSError is 503.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class ServiceError(Exception):
    """A request the service answers with ``status`` and ``{"error", "detail"}``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


def check_image_bytes(data: bytes) -> None:
    """ServiceError unless ``data`` starts like a JPEG, PNG, GIF or BMP file."""
    if not data:
        raise ServiceError(400, "empty image", "the request carried no image bytes")
    if image_format(data) is None:
        raise ServiceError(
            400,
            "not an image",
            f"the {len(data)} bytes sent are not JPEG, PNG, GIF or BMP data "
            f"(they start with {data[:8]!r})",
        )


def check_new_id(item: str) -> str:
    """An id for a new image: one a rebuild of the index from its folder finds again
    (`remap_tf.serving.collection.id_problem`: ``folder/name.jpg``, no hidden or extensionless
    names), at most ``MAX_ID_LENGTH`` characters; ServiceError otherwise."""
    problem = id_problem(item)
    if problem is not None:
        problem += " (a rebuild of the index from its folder would drop it)"
    elif len(item) > MAX_ID_LENGTH:
        problem = f"an id has at most {MAX_ID_LENGTH} characters"
    if problem is not None:
        raise ServiceError(
            400, "bad id", f"id {item[:80]!r} cannot name an image of the collection: {problem}"
        )
    return item


def image_url(item: str) -> str:
    """The service URL of an indexed image."""
    return "/v1/images/" + quote(item, safe="/")


def _warmup_png() -> bytes:
    gradient = np.linspace(0, 255, 96, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(gradient[:, None], gradient[None, :], 128), -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[:72], dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class _DescriptorCache:
    """Descriptors of indexed images (for query expansion), least recently used dropped."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, item: str) -> np.ndarray | None:
        with self._lock:
            vector = self._items.get(item)
            if vector is not None:
                self._items.move_to_end(item)
            return vector

    def put(self, item: str, vector: np.ndarray) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._items[item] = vector
            self._items.move_to_end(item)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, item: str) -> None:
        with self._lock:
            self._items.pop(item, None)


class SearchService:
    """The index, the model and the operations of ``remap serve``.

    Args:
        store: the open index with its change log.
        embedder: ``.embed(list of encoded images) -> (n, dim)`` (TF Serving or in process).
        settings: the service's knobs.
        model: how the model was named (shown by ``/readyz``).
    """

    def __init__(self, store: DurableIndex, embedder, settings: ServiceSettings, model: str = ""):
        self.store = store
        self.embedder = embedder
        self.settings = settings
        self.model = model
        self.metrics = Metrics()
        # Only the operator's root: the one an index records came with the index, and a
        # received index could name "/" (docs/serving.md, "Safe to load").
        root = settings.image_root
        self.image_root = Path(root).resolve() if root else None
        self.writes_problem = ""  # set when the change log could not be written
        self.arriving = 0  # requests reading their bodies: they may join a batch soon
        self.batcher = EmbedBatcher(
            embedder.embed,
            window_s=settings.batch_window_ms / 1000.0,
            max_batch=settings.max_batch,
            workers=settings.embed_workers,
            on_batch=self.metrics.observe_batch,
            arriving=lambda: self.arriving,
        )
        self._search_pool = ThreadPoolExecutor(settings.search_threads, "remap-search")
        self._write_pool = ThreadPoolExecutor(1, "remap-write")
        self._writes = threading.Lock()
        self._cache = _DescriptorCache(settings.descriptor_cache)
        self.model_ready = False
        self.model_problem = "the model has not answered its warm-up request yet"
        self._model_broken = False  # a problem retrying cannot fix (wrong dimension)
        self._stop = threading.Event()
        self._warmup: threading.Thread | None = None
        self.refresh_gauges()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the batcher and the model warm-up (retried until the model answers)."""
        await self.batcher.start()
        self._warmup = threading.Thread(target=self._warm_up, name="remap-warmup", daemon=True)
        self._warmup.start()

    async def stop(self) -> None:
        self._stop.set()
        await self.batcher.stop()
        self._search_pool.shutdown(wait=False, cancel_futures=True)
        self._write_pool.shutdown(wait=True)
        self.store.close()
        close = getattr(self.embedder, "close", None)
        if close is not None:
            close()

    def _warm_up(self) -> None:
        image, attempts = _warmup_png(), 0
        while not self._stop.is_set():
            attempts += 1
            try:
                dim = np.asarray(self.embedder.embed([image])).shape[-1]
                problem = self._wrong_model(dim)
            except RemapError as error:
                self.model_problem = f"the model did not answer its warm-up request: {error}"
            except Exception as error:  # a bug or an unexpected library error: keep trying
                logger.exception("model warm-up failed")
                self.model_problem = f"model warm-up failed: {type(error).__name__}: {error}"
            else:
                if problem:
                    self.model_problem, self._model_broken = problem, True
                    logger.error("%s", self.model_problem)
                    return
                self.model_ready, self.model_problem = True, ""
                self.metrics.ready.set(1)
                logger.info("model ready after %d warm-up attempt(s)", attempts)
                return
            if attempts == 1 or attempts % 30 == 0:
                logger.warning(
                    "%s (retrying every %g s)", self.model_problem, self.settings.warmup_retry_s
                )
            self._stop.wait(self.settings.warmup_retry_s)

    def _wrong_model(self, dim: int) -> str:
        """Why the model that answered cannot serve this index ("" if it can): descriptors
        of another size, or of another model than the index recorded (a later export that
        TF Serving now serves: `remap_tf.serving.search.check_embedder`)."""
        if dim != self.store.dim:
            return (
                f"the model gives {dim}-d descriptors but the index holds "
                f"{self.store.dim}-d ones; serve the model the index was built with"
            )
        try:
            check_embedder(self.store.index, self.embedder)
        except InvalidInputError as error:
            return str(error)
        return ""

    def readiness(self) -> tuple[bool, dict]:
        """``(ready, details)`` for ``/readyz``: the index is loaded and the model answered."""
        details = {
            "ready": self.model_ready,
            "index_size": len(self.store),
            "model": self.model,
        }
        if not self.model_ready:
            details["detail"] = self.model_problem
        return self.model_ready, details

    def refresh_gauges(self) -> None:
        self.metrics.index_size.set(len(self.store))
        self.metrics.log_records.set(self.store.log.records)

    # -- operations --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def receiving(self):
        """Counts a request as on its way to the model while it reads its body (the event
        loop's thread only, so no lock)."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def _embed(self, image: bytes):
        if self._model_broken:
            raise ServiceError(503, "model unusable", self.model_problem)
        embedded = await self.batcher.embed(image)
        self.metrics.stage_seconds.labels("queue").observe(embedded.queue_s)
        self.metrics.stage_seconds.labels("embed").observe(embedded.embed_s)
        return embedded

    async def _in(self, pool, function, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    async def search(self, image: bytes, k: int, qe: int = 0) -> dict:
        """Embeds ``image`` (with whatever arrives with it) and returns its ``k`` best matches.

        Args:
            image: encoded JPEG, PNG, GIF or BMP bytes.
            k: results wanted (1 to ``max_k``).
            qe: alpha query expansion with this many neighbours (0: off).
        """
        started = time.perf_counter()
        check_image_bytes(image)
        embedded = await self._embed(image)
        query = embedded.descriptor
        t = time.perf_counter()
        ids, scores = await self._in(self._search_pool, self.store.search, query[None], k)
        search_s = time.perf_counter() - t
        self.metrics.stage_seconds.labels("search").observe(search_s)
        qe_s, used = 0.0, 0
        if qe:
            t = time.perf_counter()
            ids, scores, used = await self._expand(query, ids[0], ids, scores, qe, k)
            qe_s = time.perf_counter() - t
            self.metrics.stage_seconds.labels("qe").observe(qe_s)
        results = [
            {"id": item, "score": round(float(score), 6), "url": image_url(item)}
            for item, score in zip(ids[0], scores[0], strict=True)
            if item is not None
        ]
        return {
            "results": results,
            "k": k,
            "qe": used,
            "timing_ms": {
                "queue": 1000 * embedded.queue_s,
                "embed": 1000 * embedded.embed_s,
                "search": 1000 * search_s,
                "qe": 1000 * qe_s,
                "total": 1000 * (time.perf_counter() - started),
            },
            "batch_size": embedded.batch_size,
            "index_size": len(self.store),
        }

    async def _expand(self, query, first, ids, scores, qe: int, k: int):
        """Alpha query expansion (as ``remap evaluate --qe``) over the first ``qe`` results.

        Their descriptors come from a cache (filled by additions and earlier expansions), else
        from embedding their files again; results whose file cannot be read are left out.
        """
        neighbours = [item for item in first[:qe] if item is not None]
        vectors = await asyncio.gather(*(self._descriptor_of(item) for item in neighbours))
        found = [v for v in vectors if v is not None]
        if not found:
            return ids, scores, 0
        database = np.stack(found)
        rankings = np.arange(len(found))[None, :]
        expanded = evaluation.alpha_query_expansion(
            query[None], database, k=len(found), alpha=self.settings.qe_alpha, rankings=rankings
        )
        ids, scores = await self._in(self._search_pool, self.store.search, expanded, k)
        return ids, scores, len(found)

    async def _descriptor_of(self, item: str) -> np.ndarray | None:
        cached = self._cache.get(item)
        if cached is not None:
            return cached
        try:
            path = self.image_file(item)
            data = await self._in(self._search_pool, path.read_bytes)
            vector = (await self.batcher.embed(data)).descriptor
        except (ServiceError, OSError, RemapError) as error:
            logger.info("query expansion skips %r: %s", item, error)
            return None
        self._cache.put(item, vector)
        return vector

    async def add_image(self, item: str, image: bytes) -> dict:
        """Embeds ``image``, stores it at ``<image root>/<item>`` (unless that file
        holds it already), logs the addition and applies it. Durable when this returns."""
        check_new_id(item)
        if item in self.store:
            raise ServiceError(409, "duplicate id", f"{item!r} is already in the index")
        check_image_bytes(image)
        embedded = await self._embed(image)
        t = time.perf_counter()
        size = await self._in(self._write_pool, self._add, item, image, embedded.descriptor)
        self.metrics.stage_seconds.labels("log").observe(time.perf_counter() - t)
        self._cache.put(item, embedded.descriptor)
        self.refresh_gauges()
        return {"id": item, "url": image_url(item), "index_size": size}

    def _add(self, item: str, image: bytes, descriptor: np.ndarray) -> int:
        with self._writes:
            self._check_writable()
            if item in self.store:
                raise ServiceError(409, "duplicate id", f"{item!r} is already in the index")
            if self.image_root is not None:
                self._store_file(item, image)
            with self._logging(f"{item!r} was not added"):
                return self.store.add(item, descriptor)

    def _check_writable(self) -> None:
        if self.writes_problem:
            raise ServiceError(503, "writes disabled", self.writes_problem)

    @contextlib.contextmanager
    def _logging(self, outcome: str):
        """Turns a failed change-log write into 507 (disk full) or 503. The log cuts a failed
        record back (`remap_tf.serving.index.changelog.ChangeLog.append`), so later changes
        are taken again once there is room; only when that cut failed too (the log is
        ``broken``) does the service stop taking changes until it is restarted."""
        try:
            yield
        except OSError as error:
            reason = error.strerror or str(error)
            broken = self.store.log.broken
            if broken:
                self.writes_problem = (
                    f"the change log could not be written ({reason}); {broken}; the service "
                    "takes no more changes until it is restarted (free space first); searches "
                    "go on"
                )
                logger.error("change log write failed: %s; changes are disabled", reason)
                detail = self.writes_problem
            else:
                detail = f"the change log could not be written ({reason}); free space, then retry"
                logger.error("change log write failed: %s; nothing of it was kept", reason)
            status, name = (
                (507, "insufficient storage") if error.errno in _FULL else (503, "log unwritable")
            )
            raise ServiceError(status, name, f"{outcome}: {detail}") from None

    def _store_file(self, item: str, image: bytes) -> None:
        path = self.image_root / item
        if not path.resolve().is_relative_to(self.image_root):
            raise ServiceError(400, "bad id", f"id {item!r} leads outside the collection root")
        if path.is_file():
            if path.read_bytes() != image:
                raise ServiceError(
                    409,
                    "file exists",
                    f"a different file is already at {item!r} in the collection root; add "
                    "the image under another id",
                )
            return
        try:
            atomic_write_bytes(path, image)
        except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
            raise ServiceError(
                409, "file exists", f"cannot store {item!r} in the collection root: {error}"
            ) from None
        except OSError as error:  # a full disk, no permission: the operator must act
            logger.error("cannot store %r under %s: %s", item, self.image_root, error)
            status, name = (
                (507, "insufficient storage") if error.errno in _FULL else (503, "storage error")
            )
            raise ServiceError(
                status, name, f"cannot store {item!r}: {error.strerror or error}"
            ) from None

    async def delete_image(self, item: str) -> dict:
        """Logs the deletion of ``item`` and applies it (the file stays in the collection)."""
        t = time.perf_counter()
        size = await self._in(self._write_pool, self._delete, item)
        self.metrics.stage_seconds.labels("log").observe(time.perf_counter() - t)
        self.refresh_gauges()
        return {"id": item, "deleted": True, "index_size": size}

    def _delete(self, item: str) -> int:
        with self._writes:
            self._check_writable()
            with self._logging(f"{item!r} was not deleted"):
                size = self.store.delete(item)  # UnknownIdError when absent
            self._cache.drop(item)
            return size

    def image_file(self, item: str) -> Path:
        """The file of an indexed image, inside the operator's root (``--image-root``).

        Raises:
            ServiceError: 404 when the id is unknown, the service has no root, or the file is
                missing or unreadable; 403 when the path leads outside the root (``..``, an
                absolute id, a symbolic link).
        """
        if item not in self.store:
            raise ServiceError(404, "unknown id", f"{item!r} is not in the index")
        if self.image_root is None:
            raise ServiceError(
                404,
                "no image root",
                "this service serves no image files (it was started without --image-root)",
            )
        try:
            path = (self.image_root / item).resolve()  # symbolic links and '..' resolved
            inside = not os.path.isabs(item) and path.is_relative_to(self.image_root)
            found = inside and path.is_file()
        except (OSError, ValueError):  # a name too long, a NUL byte: no such file
            inside, found = True, False
        if not inside:
            raise ServiceError(403, "outside root", f"{item!r} leads outside the image root")
        if not found:
            raise ServiceError(
                404, "file missing", f"the file of {item!r} is not in the collection"
            )
        return path
