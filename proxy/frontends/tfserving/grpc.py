"""TF Serving's gRPC API: tensorflow.serving.PredictionService and ModelService.

Thin like the KServe front end: decode the PredictRequest into an InferRequest,
hand it to the routed backend, encode the answer, so a TF Serving client reaches
any backend (local, Triton, TF Serving, ...). The messages are Coalesce's own
(protos/tensorflow*.proto), byte-compatible with TF Serving's, so the official
tensorflow-serving-api stubs work unchanged and TensorFlow is not needed here.

As TF Serving does: ModelSpec's version or version_label picks the route (see
coalesce.core.routing), an empty signature_name means "serving_default" and an unknown
one is FAILED_PRECONDITION, Predict answers in the typed `*_val` fields (clients
read `float_val` directly), GetModelMetadata packs a SignatureDefMap in an Any.
Classify, Regress and MultiInference answer UNIMPLEMENTED: Coalesce serves
tensors, not tf.Examples.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from coalesce.codecs import wire
from coalesce.codecs.tf_tensors import fill_proto, kserve_to_tf, to_array
from coalesce.config import Route
from coalesce.core import access
from coalesce.core.request import InferRequest, ModelInfo, Tensors, TensorSpec
from coalesce.core.router import Backend, Router
from coalesce.core.tensors import request_of
from coalesce.errors import CoalesceError, InvalidArgument, NotFound, grpc_status
from coalesce.telemetry.tracing import carrier_of

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
UNIMPLEMENTED = {
    wire.TF_PREDICTION: ("Classify", "Regress", "MultiInference"),
    wire.TF_MODEL: ("HandleReloadConfigRequest",),
}
_INSTEAD = {
    "HandleReloadConfigRequest": "its models are the routes of its own config; edit it and "
    "reload it (SIGHUP, or POST /admin/reload on the admin port)",
}
_AVAILABLE = wire.ModelVersionStatus.State.Value("AVAILABLE")
_LOADING = wire.ModelVersionStatus.State.Value("LOADING")
_UNAVAILABLE = 14  # tensorflow.error.Code, the same numbers as gRPC's


@dataclass(frozen=True, slots=True)
class Target:
    """What a ModelSpec resolved to, and the version reported back to the client."""

    route: Route
    backend: Backend
    version: int


def served_version(route: Route, backend: Backend) -> int:
    """A route's version number: its pinned one, else the backend's highest numeric one."""
    if route.version is not None:
        return route.version
    numeric = [int(v) for v in backend.info().versions if v.isdigit()]
    return max(numeric, default=1)


def resolve(router: Router, spec: Any, *, check_signature: bool = True) -> Target:
    """The route a ModelSpec names; NOT_FOUND or FAILED_PRECONDITION naming what is wrong."""
    name = spec.name
    if not name:
        raise InvalidArgument("model_spec.name: the request names no model")
    choice = spec.WhichOneof("version_choice")
    version = str(spec.version.value) if choice == "version" else ""
    label = spec.version_label if choice == "version_label" else ""
    backend = router.get(name, version, label)
    route = router.table.find(name, version, label)
    assert route is not None  # router.get found it
    signature = spec.signature_name or DEFAULT_SIGNATURE
    if check_signature and signature != route.signature:
        raise CoalesceError(
            f"Serving signature key \"{signature}\" not found: model '{name}' serves "
            f'"{route.signature}"',
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    return Target(route, backend, int(version) if version else served_version(route, backend))


def model_spec(spec: Any, name: str, target: Target, signature: bool = True) -> None:
    spec.name = name
    spec.version.value = target.version
    if signature:
        spec.signature_name = target.route.signature


def decode(inputs: Any, deadline: float | None) -> InferRequest:
    """PredictRequest.inputs as named arrays, batch dimension first."""
    if not inputs:
        raise InvalidArgument("inputs: the request has no input tensors")
    tensors: Tensors = {name: to_array(proto, name) for name, proto in inputs.items()}
    return request_of(tensors, deadline)


def output_names(output_filter: Any, info: ModelInfo, model: str) -> list[str]:
    """The aliases in output_filter, checked against the model's declared outputs."""
    known = [spec.name for spec in info.outputs]
    names: list[str] = []
    for alias in output_filter:
        if known and alias not in known:
            raise InvalidArgument(
                f"output_filter: '{alias}' is not an output of model '{model}' "
                f"(it has {', '.join(sorted(known))})"
            )
        if alias in names:
            raise InvalidArgument(f"output_filter: '{alias}' is asked for twice")
        names.append(alias)
    return names


def encode(response: Any, outputs: Tensors, names: list[str], model: str) -> None:
    for name in names or outputs:
        array = outputs.get(name)
        if array is None:
            raise InvalidArgument(f"output_filter: model '{model}' gave no output '{name}'")
        fill_proto(response.outputs[name], array, name, content=False)


def _tensor_info(info: Any, spec: TensorSpec) -> None:
    info.name = spec.name
    info.dtype = kserve_to_tf(spec.datatype)
    for size in spec.shape:
        info.tensor_shape.dim.add(size=size)


def signature_def_map(route: Route, info: ModelInfo) -> Any:
    """The route's one signature, with the backend's tensors."""
    signatures = wire.SignatureDefMap()
    signature = signatures.signature_def[route.signature]
    signature.method_name = PREDICT_METHOD
    for spec in info.inputs:
        _tensor_info(signature.inputs[spec.name], spec)
    for spec in info.outputs:
        _tensor_info(signature.outputs[spec.name], spec)
    return signatures


class TFServingService:
    """tensorflow.serving.PredictionService and ModelService over the router."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._time = asyncio.get_running_loop().time

    @grpc_status
    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        target = resolve(self.router, spec)
        caller = access.GrpcCaller(context)
        metadata = access.admit(self.router, target.route, caller, access.request_bytes())
        names = output_names(request.output_filter, target.backend.info(), spec.name)
        left = context.time_remaining()
        deadline = None if left is None else self._time() + left
        decoded = decode(request.inputs, deadline)
        decoded.metadata, decoded.route = metadata, spec.name
        if self.router.tracer is not None:
            decoded.trace = carrier_of(context.invocation_metadata() or ())
        outputs = await target.backend.infer(decoded)
        response = wire.PredictResponse()
        model_spec(response.model_spec, spec.name, target)
        encode(response, outputs, names, spec.name)
        return response

    @grpc_status
    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument(
                "metadata_field: GetModelMetadataRequest must specify at least one "
                "metadata_field (signature_def)"
            )
        for field in fields:
            if field != "signature_def":
                raise InvalidArgument(
                    f"metadata_field: '{field}' is not supported (only signature_def)"
                )
        spec = request.model_spec
        target = resolve(self.router, spec)
        access.admit(self.router, target.route, access.GrpcCaller(context), None)
        response = wire.GetModelMetadataResponse()
        model_spec(response.model_spec, spec.name, target, signature=False)
        packed = response.metadata["signature_def"]
        packed.type_url = SIGNATURE_DEF_MAP_URL
        packed.value = signature_def_map(target.route, target.backend.info()).SerializeToString()
        return response

    @grpc_status
    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        if spec.WhichOneof("version_choice"):
            targets = [resolve(self.router, spec, check_signature=False)]
        else:
            routes = self.router.table.routes_of(spec.name)
            if not routes:
                raise NotFound(f"model '{spec.name}' is not routed by this server")
            backends = self.router.backends
            targets = [Target(r, backends[r.backend], 0) for r in routes]
        response = wire.GetModelStatusResponse()
        seen: set[int] = set()
        for target in targets:
            version = target.version or served_version(target.route, target.backend)
            if version in seen:
                continue
            seen.add(version)
            status = response.model_version_status.add(version=version)
            if target.backend.ready:
                status.state = _AVAILABLE
            else:
                status.state = _LOADING
                status.status.error_code = _UNAVAILABLE
                status.status.error_message = f"backend '{target.backend.name}' is not ready"
        return response

    @staticmethod
    def _unimplemented(method: str) -> Any:
        message = _INSTEAD.get(method, "use Predict with tensors")

        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{method} is not supported by Coalesce: {message}"
            )

        return answer

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """One generic handler per service, (de)serialised by the messages from protos/."""
        unary = grpc.unary_unary_rpc_method_handler
        served = {
            wire.TF_PREDICTION: {
                "Predict": unary(
                    self.Predict,
                    request_deserializer=access.sized(wire.parser(wire.PredictRequest)),
                    response_serializer=wire.PredictResponse.SerializeToString,
                ),
                "GetModelMetadata": unary(
                    self.GetModelMetadata,
                    request_deserializer=wire.parser(wire.GetModelMetadataRequest),
                    response_serializer=wire.GetModelMetadataResponse.SerializeToString,
                ),
            },
            wire.TF_MODEL: {
                "GetModelStatus": unary(
                    self.GetModelStatus,
                    request_deserializer=wire.parser(wire.GetModelStatusRequest),
                    response_serializer=wire.GetModelStatusResponse.SerializeToString,
                ),
            },
        }
        for service, methods in UNIMPLEMENTED.items():
            for method in methods:
                served[service][method] = unary(self._unimplemented(method))
        return [grpc.method_handlers_generic_handler(s, m) for s, m in served.items()]
