"""A stand-in for TensorFlow Serving's gRPC API, for tests and benchmarks (not the real server).

No ``tensorflow_model_server`` binary can run on this project's machines, so the client tests
and ``bench.serving_latency`` talk to this: a gRPC server on 127.0.0.1 built on
tensorflow-serving-api's generated ``PredictionServiceServicer`` (Predict, GetModelMetadata)
and ``ModelServiceServicer`` (GetModelStatus), serving the highest version of an exported base
folder with ``tf.saved_model.load``. Apart from the version-folder rule it shares with TF
Serving (`remap_tf.contract.latest_version_dir`) it uses only TensorFlow and
tensorflow-serving-api, and answers errors the way TF Serving does:

- unknown model name: NOT_FOUND, "Servable not found for request: Latest(<name>)";
- unknown signature: INVALID_ARGUMENT, 'Serving signature key "<key>" not found.';
- a TensorFlow error while running the signature: the same status code (TF and gRPC share
  the numbering; an assertion in the graph is INVALID_ARGUMENT) with TF's message.

What it does not imitate: batching, version policies, warm-up replay, REST, model reloads.
"""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from remap_tf.contract import BYTES_SIGNATURE, SAVED_MODEL_FILE, latest_version_dir


class _Servable:
    def __init__(self, name: str, base_dir):
        self.name = name
        self.path = latest_version_dir(Path(base_dir))
        self.version = int(self.path.name)
        self.loaded = tf.saved_model.load(str(self.path))
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((self.path / SAVED_MODEL_FILE).read_bytes())
        self.signature_defs = proto.meta_graphs[0].signature_def


def _find(servable: _Servable, request, context):
    if request.model_spec.name != servable.name:
        context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: Latest({request.model_spec.name})",
        )
    wanted = request.model_spec.version.value
    if request.model_spec.HasField("version") and wanted != servable.version:
        context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: Specific({request.model_spec.name}, {wanted})",
        )


class FakePredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over one SavedModel (a stand-in for TF Serving)."""

    def __init__(self, servable: _Servable):
        self.servable = servable
        self.calls = 0
        self.delay_s = 0.0  # a test sets it to make the server slower than a deadline

    def Predict(self, request, context):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        _find(self.servable, request, context)
        key = request.model_spec.signature_name or BYTES_SIGNATURE
        if key not in self.servable.loaded.signatures:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{key}" not found.'
            )
        function = self.servable.loaded.signatures[key]
        try:
            inputs = {name: tf.constant(tf.make_ndarray(t)) for name, t in request.inputs.items()}
            outputs = function(**inputs)
        except tf.errors.OpError as error:
            context.abort(_GRPC_CODES[error.error_code], error.message)
        except (TypeError, ValueError) as error:  # wrong input names or dtypes
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.servable.name
        response.model_spec.version.value = self.servable.version
        response.model_spec.signature_name = key
        for name, value in outputs.items():
            if not request.output_filter or name in request.output_filter:
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response

    def GetModelMetadata(self, request, context):
        _find(self.servable, request, context)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Metadata field signature_def is the only one supported",
            )
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in self.servable.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.servable.name
        response.model_spec.version.value = self.servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response


class FakeModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus: the one loaded version is AVAILABLE."""

    def __init__(self, servable: _Servable):
        self.servable = servable

    def GetModelStatus(self, request, context):
        _find(self.servable, request, context)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = self.servable.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


# TensorFlow error codes and gRPC status codes share the same numbers.
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class FakeTFServing:
    """Starts the stand-in server on a free 127.0.0.1 port; ``.target`` is "127.0.0.1:port".

    Example:
        >>> with FakeTFServing("models/remap", "remap") as server:
        ...     RemapClient(server.target, "remap").embed([...])
    """

    def __init__(self, base_dir, model_name: str, workers: int = 4, servable=None):
        # ``servable``: another FakeTFServing's, to skip loading the SavedModel again.
        self.servable = servable or _Servable(model_name, base_dir)
        self.predictions = FakePredictionService(self.servable)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            self.predictions, self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            FakeModelService(self.servable), self._server
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"

    def start(self) -> FakeTFServing:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
