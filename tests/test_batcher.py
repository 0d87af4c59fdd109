"""The service's micro-batcher, in process: who shares a model call, and whose error is whose."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from remap_tf.errors import ImageRejectedError, InvalidInputError, ServerUnavailableError
from remap_tf.serving.service.batcher import EmbedBatcher, embed_each
from remap_tf.serving.service.settings import ServiceSettings


class CountingEmbedder:
    """Descriptor of b"<n>" is n * ones(3); b"bad..." is rejected like the exported graph
    rejects an image (naming its position); records every call's batch."""

    def __init__(self, delay=0.0, down=False):
        self.calls, self.delay, self.down = [], delay, down
        self.lock = threading.Lock()

    def embed(self, images):
        with self.lock:
            self.calls.append(list(images))
        time.sleep(self.delay)
        if self.down:
            raise ServerUnavailableError("TF Serving at 127.0.0.1:1 is unreachable")
        for i, image in enumerate(images):
            if image.startswith(b"bad"):
                reason = f"remap input check failed (not an image): images[{i}] is not JPEG"
                raise ImageRejectedError(f"Image {i} was rejected: {reason}", i, reason)
        return np.stack([float(image) * np.ones(3, np.float32) for image in images])


def test_embed_each_answers_a_rejected_image_alone_and_embeds_the_rest():
    embedder = CountingEmbedder()
    outcomes = embed_each(embedder.embed, [b"1", b"bad", b"3", b"bad2"])
    np.testing.assert_array_equal(outcomes[0], [1, 1, 1])
    np.testing.assert_array_equal(outcomes[2], [3, 3, 3])
    for rejected in (outcomes[1], outcomes[3]):
        assert isinstance(rejected, ImageRejectedError)
        assert rejected.reason == "remap input check failed (not an image): the image is not JPEG"
    assert embedder.calls == [[b"1", b"bad", b"3", b"bad2"], [b"1", b"3", b"bad2"], [b"1", b"3"]]
    down = embed_each(CountingEmbedder(down=True).embed, [b"1", b"2"])
    assert all(isinstance(o, ServerUnavailableError) for o in down)


async def _gather(batcher, images):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.embed(i) for i in images), return_exceptions=True)
    finally:
        await batcher.stop()


def test_images_arriving_together_share_one_call():
    embedder, sizes = CountingEmbedder(), []
    batcher = EmbedBatcher(
        embedder.embed, window_s=0.05, max_batch=8, on_batch=lambda n, s: sizes.append(n)
    )
    results = asyncio.run(_gather(batcher, [str(i).encode() for i in range(5)]))
    assert embedder.calls == [[b"0", b"1", b"2", b"3", b"4"]] and sizes == [5]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.descriptor, [i, i, i])
        assert result.batch_size == 5 and result.embed_s >= 0 and result.queue_s >= 0.04


def test_batches_are_capped_and_errors_stay_with_their_image():
    embedder = CountingEmbedder(delay=0.02)
    batcher = EmbedBatcher(embedder.embed, window_s=0.02, max_batch=3)
    results = asyncio.run(_gather(batcher, [b"1", b"bad", b"3", b"4", b"5", b"6", b"7"]))
    assert max(len(call) for call in embedder.calls) <= 3
    assert isinstance(results[1], ImageRejectedError)
    assert [float(r.descriptor[0]) for i, r in enumerate(results) if i != 1] == [1, 3, 4, 5, 6, 7]


def test_settings_are_validated_once():
    assert ServiceSettings().max_body_bytes == 20 * 1024 * 1024
    with pytest.raises(InvalidInputError, match="max_batch"):
        ServiceSettings(max_batch=0)
    with pytest.raises(InvalidInputError, match="API key is empty"):
        ServiceSettings(api_key="")
    with pytest.raises(InvalidInputError, match="API key is blank"):
        ServiceSettings(api_key="  ")


def test_a_lone_image_does_not_wait_for_company_that_is_not_coming():
    embedder = CountingEmbedder()
    arriving = {"n": 0}
    batcher = EmbedBatcher(embedder.embed, window_s=0.5, arriving=lambda: arriving["n"])
    (alone,) = asyncio.run(_gather(batcher, [b"1"]))
    assert alone.queue_s < 0.25  # no one else was reading a body: no window
    arriving["n"] = 1  # someone is: the window is worth it
    batcher = EmbedBatcher(embedder.embed, window_s=0.5, arriving=lambda: arriving["n"])
    (waited,) = asyncio.run(_gather(batcher, [b"2"]))
    assert waited.queue_s >= 0.45
