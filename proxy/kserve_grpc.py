"""The Open Inference Protocol (KServe v2) gRPC front end, as Triton serves it.

Thin on purpose: decode the wire message into an InferRequest, hand it to the
router's backend, encode the answer. Raw contents stay numpy views of the
request bytes; outputs go back in raw_output_contents.
"""

from __future__ import annotations

import asyncio

import grpc

from . import __version__, wire
from .errors import InvalidArgument, grpc_status
from .request import InferRequest, ModelInfo, Tensors
from .router import Router
from .tensors import CONTENTS_FIELD, check_shape, from_contents, from_raw, to_raw


def decode(request, deadline: float | None) -> InferRequest:
    """A ModelInferRequest as named arrays; every problem names the tensor."""
    raw = request.raw_input_contents
    if not request.inputs:
        raise InvalidArgument("inputs: the request has no input tensors")
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors: Tensors = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in tensors:
            raise InvalidArgument(f"tensor '{name}': sent twice")
        shape = check_shape(tensor.shape, name)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"tensor '{name}': both contents and raw_input_contents")
            tensors[name] = from_raw(raw[i], tensor.datatype, shape, name)
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else ()
            tensors[name] = from_contents(values, tensor.datatype, shape, name)
    rows = {len(a) for a in tensors.values()}
    if len(rows) > 1:
        sizes = ", ".join(f"{n}: {len(a)}" for n, a in tensors.items())
        raise InvalidArgument(f"inputs disagree on the batch dimension ({sizes})")
    count = rows.pop()
    if count == 0:
        raise InvalidArgument(f"tensor '{next(iter(tensors))}': batch dimension is 0")
    return InferRequest(tensors, count, deadline, request.id)


def requested_outputs(request, info: ModelInfo) -> list[str]:
    """Output names asked for, checked against the model's declared outputs when known."""
    names = [o.name for o in request.outputs]
    known = {spec.name for spec in info.outputs}
    for name in names:
        if known and name not in known:
            raise InvalidArgument(
                f"outputs: '{name}' is not an output of model '{request.model_name}' "
                f"(it has {', '.join(sorted(known))})"
            )
    return names


def encode(request, version: str, outputs: Tensors, names: list[str]):
    response = wire.ModelInferResponse(
        model_name=request.model_name, model_version=version, id=request.id
    )
    for name in names or outputs:
        array = outputs.get(name)
        if array is None:
            raise InvalidArgument(f"outputs: model '{request.model_name}' has no output '{name}'")
        datatype, raw = to_raw(array, name)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)
    return response


def _tensor_metadata(specs):
    Tensor = wire.ModelMetadataResponse.TensorMetadata
    return [Tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


class KServeService:
    """inference.GRPCInferenceService over the router."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._time = asyncio.get_running_loop().time

    @grpc_status
    async def ModelInfer(self, request, context: grpc.aio.ServicerContext):
        backend = self.router.get(request.model_name, request.model_version)
        info = backend.info()
        names = requested_outputs(request, info) if request.outputs else []
        left = context.time_remaining()
        deadline = None if left is None else self._time() + left
        outputs = await backend.infer(decode(request, deadline))
        return encode(request, request.model_version or info.versions[0], outputs, names)

    @grpc_status
    async def ServerLive(self, request, context):
        return wire.ServerLiveResponse(live=True)

    @grpc_status
    async def ServerReady(self, request, context):
        return wire.ServerReadyResponse(ready=self.router.ready)

    @grpc_status
    async def ModelReady(self, request, context):
        backend = self.router.get(request.name, request.version)
        return wire.ModelReadyResponse(ready=await backend.adapter.ready())

    @grpc_status
    async def ServerMetadata(self, request, context):
        return wire.ServerMetadataResponse(name="coalesce", version=__version__, extensions=[])

    @grpc_status
    async def ModelMetadata(self, request, context):
        info = self.router.get(request.name, request.version).info()
        return wire.ModelMetadataResponse(
            name=request.name,
            versions=list(info.versions),
            platform=info.platform,
            inputs=_tensor_metadata(info.inputs),
            outputs=_tensor_metadata(info.outputs),
        )

    def handler(self) -> grpc.GenericRpcHandler:
        """Unary methods, each (de)serialised by the upb messages from protos/."""
        methods = {}
        for method in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        ):
            request = getattr(wire, f"{method}Request")
            response = getattr(wire, f"{method}Response")
            methods[method] = grpc.unary_unary_rpc_method_handler(
                getattr(self, method),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(wire.KSERVE, methods)
