"""TF Serving warm-up requests: ``<version>/assets.extra/tf_serving_warmup_requests``.

TF Serving replays these `PredictionLog` records (a TFRecord file, up to 1000 records) when
it loads a version, before the version takes traffic, so the first user request does not
pay for graph initialisation and memory allocation. The records here cover both
signatures and a batch of images of two sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from remap_tf.contract import BYTES_SIGNATURE, INPUT_KEY, PIXELS_SIGNATURE
from remap_tf.errors import BadPathError, InvalidInputError

MAX_RECORDS = 1000  # TF Serving reads at most this many


def _synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour gradient with noise: compresses like a photo, decodes everywhere."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height)[:, None, None]
    x = np.linspace(0, 255, width)[None, :, None]
    base = np.concatenate(
        [np.broadcast_to(y, (height, width, 1)), np.broadcast_to(x, (height, width, 1)),
         np.full((height, width, 1), 128.0)], axis=-1
    )  # fmt: skip
    noisy = base + rng.normal(0, 12, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def default_images(image_size: int) -> list[bytes]:
    """Two encoded images of different sizes and formats: a landscape JPEG and a portrait PNG."""
    a = _synthetic_image(max(image_size * 3 // 4, 8), image_size, seed=0)
    b = _synthetic_image(image_size, max(image_size // 2, 8), seed=1)
    return [
        tf.io.encode_jpeg(a, quality=90).numpy(),
        tf.io.encode_png(b).numpy(),
    ]


def _read(image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise BadPathError(f"Warm-up image {str(path)!r} is not a file.")
        return path.read_bytes()
    raise InvalidInputError(
        f"Warm-up images must be bytes or paths, received {type(image).__name__}."
    )


def _record(model_name: str, signature: str, tensor) -> prediction_log_pb2.PredictionLog:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
    )
    request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(tensor))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )


def warmup_records(model_name: str, images=None, image_size: int = 512):
    """The warm-up `PredictionLog` records.

    Args:
        model_name: the served model name (the records' ``model_spec.name``).
        images: encoded images (bytes or paths); default `default_images`.
        image_size: the export's long side (size of the synthetic images).

    Returns:
        a list of ``PredictionLog``: ``serving_default`` with the first image alone and
        with all images in one batch; ``embed_pixels`` with the first image decoded.
    """
    encoded = [_read(image) for image in (images or default_images(image_size))]
    if not encoded:
        raise InvalidInputError("`warmup_images` must hold at least one image.")
    pixels = tf.io.decode_image(encoded[0], channels=3, expand_animations=False).numpy()
    records = [
        _record(model_name, BYTES_SIGNATURE, np.array(encoded[:1], dtype=object)),
        _record(model_name, BYTES_SIGNATURE, np.array(encoded, dtype=object)),
        _record(model_name, PIXELS_SIGNATURE, pixels[np.newaxis]),
    ]
    return records[:MAX_RECORDS]


def write_warmup_requests(path, model_name: str, images=None, image_size: int = 512) -> Path:
    """Writes the warm-up TFRecord file at ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in warmup_records(model_name, images, image_size):
            writer.write(record.SerializeToString())
    return path


def read_warmup_requests(path) -> list[prediction_log_pb2.PredictionLog]:
    """Parses a warm-up file back into `PredictionLog` records."""
    records = []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw.numpy())
        records.append(log)
    return records
