"""A TF-Serving-protocol server for tests, executing real TensorFlow SavedModels.

TF Serving's server binary cannot be installed here (it ships as a Docker image
or a Debian package outside the registries we reach), so the backend-side tests
run this instead: a gRPC server built on the official `tensorflow-serving-api`
servicer stubs (PredictionService: Predict, GetModelMetadata; ModelService:
GetModelStatus) that loads SavedModels written by `tf.saved_model.save` and runs
their signatures with TensorFlow, answering as TF Serving does (typed *_val
fields, SignatureDefMap packed in an Any, FAILED_PRECONDITION for an unknown
signature, the TF error's status for a failing op). It records the rows of each
Predict call so that tests can prove batching from the server's side.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.support.coalesce import free_port

DEFAULT_SIGNATURE = "serving_default"


class _Affine(tf.Module):
    """y = scale * x + 1, s = row sums; a NaN or Inf in x fails the op (INVALID_ARGUMENT)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        x = tf.debugging.check_numerics(x, "x contains NaN or Inf")
        return {"y": self.scale * x + 1, "s": tf.reduce_sum(x, axis=1, keepdims=True)}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def doubled(self, x):
        return {"y": 2 * x}


class _Strings(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, text):
        return {"upper": tf.strings.upper(text), "length": tf.strings.length(text)}


class _Half(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float16, name="h")])
    def serve(self, h):
        return {"twice": h * 2}


def build_models(root: Path) -> Path:
    """SavedModels in TF Serving's layout: root/<model>/<version>/saved_model.pb."""
    affine1, affine2 = _Affine(2.0), _Affine(3.0)
    models = {
        ("affine", 1): (affine1, {DEFAULT_SIGNATURE: affine1.serve, "doubled": affine1.doubled}),
        ("affine", 2): (affine2, {DEFAULT_SIGNATURE: affine2.serve}),
        ("strings", 1): (strings := _Strings(), {DEFAULT_SIGNATURE: strings.serve}),
        ("half", 1): (half := _Half(), {DEFAULT_SIGNATURE: half.serve}),
    }
    for (name, version), (module, signatures) in models.items():
        tf.saved_model.save(module, str(root / name / str(version)), signatures=signatures)
    return root


class _Model:
    """One loaded version: its signatures to call and its SignatureDefs to describe."""

    def __init__(self, path: Path) -> None:
        self.loaded = tf.saved_model.load(str(path))
        saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = saved.meta_graphs[0].signature_def


class _Servicer(
    prediction_service_pb2_grpc.PredictionServiceServicer,
    model_service_pb2_grpc.ModelServiceServicer,
):
    def __init__(self, root: Path, labels: dict[str, dict[str, int]]) -> None:
        self.models = {
            (model.name, int(version.name)): _Model(version)
            for model in root.iterdir()
            for version in model.iterdir()
        }
        self.labels = labels
        self.calls: list[tuple[str, int]] = []  # (model, rows) per Predict
        self._lock = threading.Lock()

    def _version(self, spec, context) -> int:
        versions = sorted(v for n, v in self.models if n == spec.name)
        if not versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {spec}")
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            label = self.labels.get(spec.name, {}).get(spec.version_label)
            if label is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Unknown label {spec.version_label}")
            return label
        if choice == "version":
            if spec.version.value not in versions:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {spec}")
            return spec.version.value
        return versions[-1]

    def Predict(self, request, context):
        spec = request.model_spec
        version = self._version(spec, context)
        model = self.models[spec.name, version]
        name = spec.signature_name or DEFAULT_SIGNATURE
        if name not in model.loaded.signatures:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
            )
        inputs = {key: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()}
        function = model.loaded.signatures[name]
        try:
            outputs = function(**{k: tf.constant(v) for k, v in inputs.items()})
        except (TypeError, ValueError, tf.errors.InvalidArgumentError) as exc:
            message = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.strip())
        with self._lock:
            self.calls.append((spec.name, len(next(iter(inputs.values())))))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = name
        for key in request.output_filter or outputs:
            response.outputs[key].CopyFrom(_as_proto_field(outputs[key].numpy()))
        return response

    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        version = self._version(spec, context)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in self.models[spec.name, version].signature_defs.items():
            signatures.signature_def[key].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(signatures)
        return response

    def GetModelStatus(self, request, context):
        spec = request.model_spec
        versions = [self._version(spec, context)] if spec.WhichOneof("version_choice") else None
        response = get_model_status_pb2.GetModelStatusResponse()
        for name, version in sorted(self.models):
            if name == spec.name and (versions is None or version in versions):
                response.model_version_status.add(
                    version=version, state=get_model_status_pb2.ModelVersionStatus.AVAILABLE
                )
        if not response.model_version_status:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of {spec.name}")
        return response


def _as_proto_field(array: np.ndarray):
    """As TF Serving's Tensor::AsProtoField: values in the typed field, not tensor_content."""
    proto = tf.make_tensor_proto(array)
    if proto.tensor_content and array.dtype == np.float32:
        proto.ClearField("tensor_content")
        proto.float_val.extend(array.reshape(-1).tolist())
    return proto


class TFServingServer:
    """The servicer above on a free loopback port, in threads of this process."""

    def __init__(self, root: Path, labels: dict[str, dict[str, int]] | None = None) -> None:
        self.servicer = _Servicer(root, labels or {})
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            self.servicer, self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.servicer, self._server)
        self._server.add_insecure_port(self.url)

    def __enter__(self) -> TFServingServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=1).wait()

    def calls_of(self, model: str) -> list[int]:
        """The rows of each Predict call the model received, in order."""
        return [rows for name, rows in self.servicer.calls if name == model]
