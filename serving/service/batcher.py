"""Micro-batching: images that arrive together are embedded in one model call.

A request awaits `EmbedBatcher.embed(image)`. The first image of a batch waits up to
``window_s`` for others, but only while other requests are on their way (``arriving``: still
reading their bodies) and the batch is not full, so a lone query does not wait for nobody;
then the batch goes to the model in a worker thread. While ``workers`` batches are in flight,
new images queue up and leave together as the next batch, so batches grow with the load by
themselves.

One bad image does not fail its batch: the embedders raise `ImageRejectedError` naming the
image's position, which is answered alone, and the others are embedded again without it.
An error that is not about one image (TF Serving down) fails every image of the batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from remap_tf.errors import ImageRejectedError

_IMAGE_IN_BATCH = re.compile(r"images\[\d+\]")


@dataclasses.dataclass(frozen=True)
class Embedded:
    """One image's descriptor (float32 (dim,)) and where its time went."""

    descriptor: np.ndarray
    queue_s: float  # waiting for its batch to start
    embed_s: float  # its batch's model call
    batch_size: int


@dataclasses.dataclass
class _Item:
    image: bytes
    future: asyncio.Future
    queued: float


def _alone(error: ImageRejectedError) -> ImageRejectedError:
    """The error as the image's own request should read it (no position in a batch)."""
    reason = _IMAGE_IN_BATCH.sub("the image", error.reason).strip()
    return ImageRejectedError(reason, index=0, reason=reason)


def embed_each(embed: Callable[[list], np.ndarray], images: list) -> list:
    """Embeds ``images`` in one call where possible: a descriptor or an exception for each.

    A rejected image (`ImageRejectedError`, which names its position) gets its error and
    the others are embedded again without it; any other error is every image's.
    """
    outcomes: list = [None] * len(images)
    todo = list(range(len(images)))
    while todo:
        try:
            rows = np.asarray(embed([images[i] for i in todo]), dtype=np.float32)
        except ImageRejectedError as error:
            if not 0 <= error.index < len(todo):
                raise
            outcomes[todo.pop(error.index)] = _alone(error)
            continue
        except Exception as error:  # handed to every waiting request
            for i in todo:
                outcomes[i] = error
            break
        for i, row in zip(todo, rows, strict=True):
            outcomes[i] = row
        break
    return outcomes


class EmbedBatcher:
    """Embeds images from concurrent requests in shared batches.

    Args:
        embed: ``embed(list of encoded images) -> (n, dim)`` (an embedder's ``embed``).
        window_s: how long a batch's first image waits for company.
        max_batch: most images per call.
        workers: calls in flight at once.
        on_batch: called with ``(batch size, seconds)`` after each call (metrics).
        arriving: how many requests are on their way to `embed` (None: assume some are, and
            always wait the window).

    Use `start` and `stop` inside the running event loop (the app's lifespan).
    """

    def __init__(
        self,
        embed: Callable[[list], np.ndarray],
        window_s: float = 0.005,
        max_batch: int = 32,
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
        arriving: Callable[[], int] | None = None,
    ):
        self._embed = embed
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.workers = int(workers)
        self._on_batch = on_batch
        self._arriving = arriving
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="remap-embed")
        self._queue: asyncio.Queue | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.workers)
        self._collector = asyncio.create_task(self._collect(), name="remap-batcher")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, *self._running, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def embed(self, image: bytes) -> Embedded:
        """The descriptor of one encoded image, embedded with whatever arrived with it.

        Raises:
            ImageRejectedError: the model refused this image.
            RemapError: the model could not be used (e.g. ServerUnavailableError).
        """
        if self._queue is None:
            raise RuntimeError("EmbedBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(image, future, time.perf_counter()))
        return await future

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()
            batch = [await self._queue.get()]
            if self._worth_waiting():
                await asyncio.sleep(self.window_s)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _worth_waiting(self) -> bool:
        if self.window_s <= 0 or self._queue.qsize() + 1 >= self.max_batch:
            return False
        return self._arriving is None or self._arriving() > 0

    async def _run(self, batch: list[_Item]) -> None:
        try:
            live = [item for item in batch if not item.future.done()]  # clients still there
            if not live:
                return
            started = time.perf_counter()
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._pool, embed_each, self._embed, [item.image for item in live]
            )
            elapsed = time.perf_counter() - started
            if self._on_batch is not None:
                self._on_batch(len(live), elapsed)
            for item, outcome in zip(live, outcomes, strict=True):
                if item.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    queued = started - item.queued
                    item.future.set_result(Embedded(outcome, queued, elapsed, len(live)))
        except BaseException as error:  # never leave a request waiting forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            if not isinstance(error, Exception):
                raise
        finally:
            self._slots.release()
