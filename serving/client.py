"""Descriptors from an exported REMAP model, over gRPC (TF Serving) or in process.

Both embedders share one interface, so indexing, search and the demo run with or without a
server::

    embedder = make_embedder("localhost:8500/remap")   # RemapClient: TF Serving over gRPC
    embedder = make_embedder("models/remap")            # LocalEmbedder: the SavedModel here
    descriptors = embedder.embed(["a.jpg", b"...png bytes..."])   # (num_images, dim) float32
    embedder.dim, embedder.metadata()

``embed`` takes encoded images (bytes) or paths for the ``serving_default`` signature, and
uint8 RGB arrays ``(height, width, 3)`` (or one ``(n, h, w, 3)`` array) for
``embed_pixels``. Images go in chunks of ``chunk_size``; descriptors are rows, in input order.

Errors (all `remap_tf.errors.ServingError`, printed by ``remap`` as one line):
`ServerUnavailableError` names the address, `ModelNotFoundError` the model,
`ImageRejectedError` the image's index (and path) with the server's reason.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from remap_tf.contract import (
    BYTES_SIGNATURE,
    DEFAULT_MODEL_NAME,
    INPUT_KEY,
    OUTPUT_KEY,
    PIXELS_SIGNATURE,
    SAVED_MODEL_FILE,
    parse_serving_address,
    read_export_metadata,
    resolve_saved_model,
)
from remap_tf.errors import (
    BadPathError,
    FileFormatError,
    ImageRejectedError,
    InvalidInputError,
    ModelNotFoundError,
    ServerUnavailableError,
    ServingError,
    clean_tf_message,
)
from remap_tf.imageheaders import check_gif

_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
PROBE_COMPONENTS = 32  # leading components of the probe's descriptor that name a model
_INDEX_IN_MESSAGE = re.compile(r"images\[(\d+)\]")


def probe_pixels() -> np.ndarray:
    """The fixed synthetic image whose descriptor tells models apart: uint8 ``(72, 96, 3)``,
    gradients and a pattern, so that every layer of a model sees structure."""
    y, x = np.mgrid[0:72, 0:96]
    red = x * 255 // 95
    green = y * 255 // 71
    blue = ((x // 8 + y // 8) % 2) * 160 + (x * y) % 64
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def probe_png() -> bytes:
    """`probe_pixels` as a PNG file (lossless: every embedder decodes the same pixels)."""
    return tf.io.encode_png(probe_pixels()).numpy()


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fspath(image))
    if isinstance(image, bytes):
        return f"{len(image)} bytes"
    return f"array {getattr(image, 'shape', '?')}"


class _Embedder:
    """The shared ``embed`` loop: input checks, chunking, locating a rejected image."""

    signature: str
    chunk_size: int
    _where: str

    def run_batch(self, batch) -> np.ndarray:
        """One call of the signature on prepared inputs (no chunking, no checks):
        ``(len(batch), dim)``. An empty batch still makes the call (a transport probe)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the connection (nothing to release in process)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def version(self) -> int | None:
        """The model version this embedder uses now (None: a SavedModel outside a base
        folder's versions)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The model as a user names it: the base folder, or ``host:port/name``."""
        raise NotImplementedError

    def identity(self) -> tuple[int | None, list[float]]:
        """``(version, probe)``: the version used now and the leading `PROBE_COMPONENTS`
        components of the descriptor of `probe_pixels`, rounded to 5 decimals, which differ
        between models that give different descriptors (and agree for a re-export of the
        same weights and options). One model call."""
        image = probe_pixels() if self.signature == PIXELS_SIGNATURE else probe_png()
        descriptor = np.asarray(self.embed([image]), np.float32)[0]
        return self.version, [round(float(v), 5) for v in descriptor[:PROBE_COMPONENTS]]

    def _prepare(self, images) -> list:
        if isinstance(images, (bytes, str, os.PathLike)):
            images = [images]
        if self.signature == PIXELS_SIGNATURE:
            if isinstance(images, np.ndarray) and images.ndim == 4:
                images = list(images)
            prepared = []
            for i, image in enumerate(images):
                array = np.asarray(image)
                if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
                    raise InvalidInputError(
                        f"{self.signature} takes uint8 (height, width, 3) RGB arrays; image {i} "
                        f"is {array.dtype} {array.shape}."
                    )
                prepared.append(array)
            return prepared
        prepared = []
        for i, image in enumerate(images):
            if isinstance(image, (bytes, bytearray)):
                prepared.append(bytes(image))
            elif isinstance(image, (str, os.PathLike)):
                path = Path(image)
                if not path.is_file():
                    raise BadPathError(f"Image {i} {str(path)!r} is not a file.")
                prepared.append(path.read_bytes())
            else:
                raise InvalidInputError(
                    f"{self.signature} takes encoded images (bytes) or paths; image {i} is a "
                    f"{type(image).__name__} (use signature='{PIXELS_SIGNATURE}' for arrays)."
                )
        return prepared

    def embed(self, images) -> np.ndarray:
        """Descriptors of ``images``, float32 ``(num_images, dim)``, L2-normalised, in order.

        Args:
            images: for ``serving_default``, a sequence of encoded images (bytes) or paths
                (one bytes/path is also accepted); for ``embed_pixels``, uint8 RGB arrays
                ``(h, w, 3)`` or one ``(n, h, w, 3)`` array.

        Raises:
            ImageRejectedError: an image failed a check (its index and the reason).
            FileNotFoundError: a path is not a file.
            ServerUnavailableError, ModelNotFoundError: see `RemapClient`.
        """
        originals = [images] if isinstance(images, (bytes, str, os.PathLike)) else images
        if isinstance(originals, np.ndarray) and originals.ndim == 4:
            originals = list(originals)
        originals = list(originals)
        prepared = self._prepare(originals)
        rows = []
        for start in range(0, len(prepared), self.chunk_size):
            chunk = prepared[start : start + self.chunk_size]
            for group_start, group in self._groups(chunk):
                offset = start + group_start
                try:
                    rows.append(self.run_batch(group))
                except _Rejected as rejected:
                    index, reason = self._locate(group, rejected.reason)
                    index += offset
                    # The graph numbers images within the request; name the input's index.
                    reason = _INDEX_IN_MESSAGE.sub(f"images[{index}]", reason, count=1)
                    raise ImageRejectedError(
                        f"Image {index} ({_describe(originals[index])}) was rejected by "
                        f"{self._where}: {reason}",
                        index=index,
                        reason=reason,
                    ) from None
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(rows).astype(np.float32, copy=False)

    def _groups(self, chunk):
        """Consecutive runs of equal-shaped arrays (embed_pixels needs one shape per call)."""
        if self.signature != PIXELS_SIGNATURE:
            return [(0, chunk)]
        groups, start = [], 0
        for i in range(1, len(chunk) + 1):
            if i == len(chunk) or chunk[i].shape != chunk[start].shape:
                groups.append((start, chunk[start:i]))
                start = i
        return groups

    def _locate(self, group, reason: str) -> tuple[int, str]:
        """(index in group, reason) of the rejected image: from the message, else one by one."""
        match = _INDEX_IN_MESSAGE.search(reason)
        if match and int(match.group(1)) < len(group):
            index = int(match.group(1))
            return index, reason
        if len(group) > 1:
            for i, image in enumerate(group):
                try:
                    self.run_batch([image])
                except _Rejected as rejected:
                    return i, rejected.reason
        return 0, reason


class _Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_batch(signature: str, group):
    """The request tensor: uint8 (n, h, w, 3) for embed_pixels, else bytes (n,)."""
    if signature == PIXELS_SIGNATURE:
        return np.stack(group) if group else np.zeros((0, 1, 1, 3), np.uint8)
    return np.array(group, dtype=object)


def _tf_dtype(signature: str):
    return tf.uint8 if signature == PIXELS_SIGNATURE else tf.string


def _signature_info(inputs, outputs) -> dict:
    return {"inputs": inputs, "outputs": outputs}


def _signature_names(path: Path):
    """Signature names from saved_model.pb, without loading the model (None if unreadable)."""
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / SAVED_MODEL_FILE).read_bytes())
    except Exception:  # left to tf.saved_model.load, which gives the full reason
        return None
    names = set()
    for graph in proto.meta_graphs:
        names.update(name for name in graph.signature_def if not name.startswith("__"))
    return names


class LocalEmbedder(_Embedder):
    """The `RemapClient` interface over an exported SavedModel, in this process.

    Args:
        path: a base folder (``models/remap``: its highest version is used, as TF Serving
            does) or a version folder (``models/remap/1``).
        signature: ``"serving_default"`` (encoded bytes) or ``"embed_pixels"`` (uint8 RGB).
        chunk_size: images per call.

    Example:
        >>> embedder = LocalEmbedder("models/remap")
        >>> embedder.embed(["query.jpg"]).shape
        (1, 2048)
    """

    def __init__(self, path, signature: str = BYTES_SIGNATURE, chunk_size: int = 16):
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise InvalidInputError(
                f"`chunk_size` must be a positive integer, received {chunk_size!r}."
            )
        self.path = resolve_saved_model(path)
        self.chunk_size = int(chunk_size)
        self.signature = signature
        self._where = f"the SavedModel {str(self.path)!r}"
        names = _signature_names(self.path)
        if names is not None and signature not in names:  # before the (slow) load
            raise ModelNotFoundError(
                f"Signature {signature!r} is not in {str(self.path)!r}; it has {sorted(names)}."
            )
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as error:  # TF raises several types for an unreadable SavedModel.
            raise FileFormatError(
                f"Could not load the SavedModel {str(self.path)!r}: {error}"
            ) from None
        if signature not in self._loaded.signatures:
            raise ModelNotFoundError(
                f"Signature {signature!r} is not in {str(self.path)!r}; it has "
                f"{sorted(self._loaded.signatures)}."
            )
        self.function = self._loaded.signatures[signature]  # the concrete signature
        self.config = read_export_metadata(self.path)
        self._dim = int(self.function.structured_outputs[OUTPUT_KEY].shape[-1])

    @property
    def dim(self) -> int:
        """Descriptor size."""
        return self._dim

    @property
    def version(self) -> int | None:
        """The version folder's number (None for a SavedModel not named by a version)."""
        return int(self.path.name) if self.path.name.isdigit() else None

    def describe(self) -> str:
        return str(self.path.parent if self.version is not None else self.path)

    def run_batch(self, group) -> np.ndarray:
        if self.signature == BYTES_SIGNATURE and self.config.get("max_pixels"):
            # What the graph checks, before TF's GIF decoder sees every frame (exports made
            # before the graph walked GIF frames decode them whatever their size).
            for i, data in enumerate(group):
                reason = check_gif(data, i, self.config["max_pixels"])
                if reason is not None:
                    raise _Rejected(reason)
        batch = _to_batch(self.signature, group)
        try:
            out = self.function(**{INPUT_KEY: tf.constant(batch, _tf_dtype(self.signature))})
        except tf.errors.InvalidArgumentError as error:
            raise _Rejected(clean_tf_message(error.message)) from None
        return out[OUTPUT_KEY].numpy()

    def metadata(self) -> dict:
        """``{"model", "version", "signatures": {name: {"inputs", "outputs"}}, "descriptor_dim"}``.

        Each input/output is ``{"dtype": "string", "shape": [None]}`` (None: any size).
        """
        signatures = {}
        for name, function in self._loaded.signatures.items():
            inputs = {
                spec.name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                for spec in function.structured_input_signature[1].values()
            }
            outputs = {
                key: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                for key, spec in function.structured_outputs.items()
            }
            signatures[name] = _signature_info(inputs, outputs)
        name = self.config.get("model_name", self.path.parent.name)
        return {
            "model": name,
            "version": self.version,
            "signatures": signatures,
            "descriptor_dim": self.dim,
        }


class RemapClient(_Embedder):
    """Descriptors from a REMAP model served by TensorFlow Serving, over gRPC.

    Every call carries a deadline (``timeout`` seconds). UNAVAILABLE and DEADLINE_EXCEEDED
    are retried ``retries`` times with exponential back-off (0.1 s, 0.2 s, 0.4 s, ...); other
    errors are not retried.

    Args:
        target: ``"host:port"`` of the server's gRPC port (8500 by default in TF Serving).
        model_name: the served model name (``models.config``'s ``name``).
        signature: ``"serving_default"`` (encoded bytes) or ``"embed_pixels"`` (uint8 RGB).
        timeout: deadline of each call, seconds.
        retries: retries after the first attempt, on UNAVAILABLE / DEADLINE_EXCEEDED only.
        chunk_size: images per request (keep it at or below the server's max_batch_size).
        backoff: first retry delay in seconds, doubled at each retry.

    Example:
        >>> with RemapClient("localhost:8500", "remap") as client:
        ...     descriptors = client.embed(["query.jpg"])   # (1, dim) float32
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        signature: str = BYTES_SIGNATURE,
        timeout: float = 10.0,
        retries: int = 3,
        chunk_size: int = 16,
        backoff: float = 0.1,
    ):
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise InvalidInputError(
                f"`chunk_size` must be a positive integer, received {chunk_size!r}."
            )
        if not timeout or timeout <= 0:
            raise InvalidInputError(
                f"`timeout` must be a positive number of seconds, got {timeout!r}."
            )
        if int(retries) != retries or retries < 0:
            raise InvalidInputError(f"`retries` must be an integer >= 0, received {retries!r}.")
        self.target = target
        self.model_name = model_name
        self.signature = signature
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.chunk_size = int(chunk_size)
        self.backoff = float(backoff)
        self._where = f"model {model_name!r} at {target}"
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                # Reconnect soon after a failure, so a retry can reach a restarted server.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._dim = None

    def close(self) -> None:
        """Closes the gRPC channel."""
        self._channel.close()

    def _call(self, method, request):
        retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                if code in retryable and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                attempts = f"{attempt + 1} attempt{'s' if attempt else ''}"
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise ServerUnavailableError(
                        f"TF Serving at {self.target} is unreachable ({attempts}, "
                        f"{self.timeout:g} s deadline each): {details}"
                    ) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise ServerUnavailableError(
                        f"TF Serving at {self.target} did not answer within {self.timeout:g} s "
                        f"({attempts})."
                    ) from None
                if code == grpc.StatusCode.NOT_FOUND:
                    raise ModelNotFoundError(
                        f"Model {self.model_name!r} is not served at {self.target}: {details}"
                    ) from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    if "signature" in details.lower() and "not found" in details.lower():
                        raise ModelNotFoundError(
                            f"Signature {self.signature!r} of model {self.model_name!r} at "
                            f"{self.target}: {details}"
                        ) from None
                    raise _Rejected(clean_tf_message(details)) from None
                raise ServingError(
                    f"TF Serving at {self.target} answered {code.name} for model "
                    f"{self.model_name!r}: {details}"
                ) from None
        raise AssertionError("unreachable")

    def run_batch(self, group) -> np.ndarray:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=self.model_name, signature_name=self.signature),
            output_filter=[OUTPUT_KEY],
        )
        batch = _to_batch(self.signature, group)
        request.inputs[INPUT_KEY].CopyFrom(
            tf.make_tensor_proto(batch, dtype=_tf_dtype(self.signature))
        )
        response = self._call(self._stub.Predict, request)
        if OUTPUT_KEY not in response.outputs:
            raise ServingError(
                f"Model {self.model_name!r} at {self.target} returned no {OUTPUT_KEY!r} output "
                f"(outputs: {sorted(response.outputs)}); is it a REMAP export?"
            )
        return tf.make_ndarray(response.outputs[OUTPUT_KEY])

    @property
    def version(self) -> int:
        """The version the server serves now (GetModelMetadata)."""
        return self.metadata()["version"]

    def describe(self) -> str:
        return f"{self.target}/{self.model_name}"

    @property
    def dim(self) -> int:
        """Descriptor size (asked from the server once)."""
        if self._dim is None:
            self._dim = self.metadata()["descriptor_dim"]
        return self._dim

    def metadata(self) -> dict:
        """GetModelMetadata, as ``{"model", "version", "signatures", "descriptor_dim"}``.

        ``signatures`` maps each name to ``{"inputs": {key: {"dtype", "shape"}}, "outputs":
        ...}`` (shape None: any size), as `LocalEmbedder.metadata`.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_pb2.ModelSpec(name=self.model_name),
            metadata_field=["signature_def"],
        )
        response = self._call(self._stub.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def describe(infos):
            return {
                key: {
                    "dtype": tf.dtypes.as_dtype(info.dtype).name,
                    "shape": [None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim],
                }
                for key, info in infos.items()
            }

        signatures = {
            name: _signature_info(describe(sig.inputs), describe(sig.outputs))
            for name, sig in signature_map.signature_def.items()
            if not name.startswith("__")
        }
        chosen = signatures.get(self.signature)
        if chosen is None or OUTPUT_KEY not in chosen["outputs"]:
            raise ModelNotFoundError(
                f"Model {self.model_name!r} at {self.target} has no signature {self.signature!r} "
                f"with a {OUTPUT_KEY!r} output; signatures: {sorted(signatures)}."
            )
        return {
            "model": response.model_spec.name,
            "version": int(response.model_spec.version.value),
            "signatures": signatures,
            "descriptor_dim": chosen["outputs"][OUTPUT_KEY]["shape"][-1],
        }


def make_embedder(model: str, **kwargs):
    """A `LocalEmbedder` for a SavedModel path, or a `RemapClient` for ``"host:port[/name]"``.

    Args:
        model: an existing folder (a base dir or a version dir), or ``"host:port"`` /
            ``"host:port/model_name"`` of TF Serving's gRPC port (model name default
            ``"remap"``, or ``model_name=`` in ``kwargs``).
        **kwargs: passed to the embedder (``signature``, ``chunk_size``; for the client also
            ``timeout``, ``retries``, ``model_name``).

    Example:
        >>> make_embedder("models/remap").embed(["a.jpg"]).shape
        (1, 2048)
    """
    text = os.fspath(model)
    if os.path.exists(text):
        kwargs.pop("model_name", None)
        return LocalEmbedder(text, **kwargs)
    address = parse_serving_address(text)
    if address is not None:
        target, served = address
        name = kwargs.pop("model_name", None) or served or DEFAULT_MODEL_NAME
        return RemapClient(target, name, **kwargs)
    raise BadPathError(
        f"Model {text!r} is neither an existing SavedModel folder nor a 'host:port[/name]' "
        "TF Serving address."
    )
