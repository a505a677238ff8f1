"""The Open Inference Protocol (KServe v2) gRPC front end, as Triton serves it.

Thin on purpose: decode the wire message into an InferRequest, hand it to the
router's backend, encode the answer. Raw contents stay numpy views of the
request bytes; outputs go back in raw_output_contents.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import grpc

from . import __version__, access, wire
from .errors import CoalesceError, abort, grpc_status
from .kserve_codec import decode, encode, requested_outputs
from .kserve_stream import StreamSession
from .request import InferRequest
from .router import Backend, Router
from .tracing import carrier_of


class Call(NamedTuple):
    """A decoded, routed request and what its answer must carry."""

    backend: Backend
    request: InferRequest
    names: list[str]  # requested outputs; empty for all
    version: str


def _tensor_metadata(specs):
    Tensor = wire.ModelMetadataResponse.TensorMetadata
    return [Tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


class KServeService:
    """inference.GRPCInferenceService over the router."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._time = asyncio.get_running_loop().time

    def prepare(self, request, context: grpc.aio.ServicerContext) -> Call:
        """Route and decode one ModelInferRequest (raising a CoalesceError if it is bad)."""
        backend = self.router.get(request.model_name, request.model_version)
        metadata: tuple = ()
        if request.model_version or request.model_name not in self.router.plain:
            route = access.route_of(self.router, request.model_name, request.model_version)
            caller = access.GrpcCaller(context)
            metadata = access.admit(self.router, route, caller, access.request_bytes())
        info = backend.info()
        names = requested_outputs(request, info) if request.outputs else []
        left = context.time_remaining()
        deadline = None if left is None else self._time() + left
        version = request.model_version or info.versions[0]
        decoded = decode(request, deadline)
        decoded.metadata = metadata
        if self.router.tracer is not None:
            decoded.trace = carrier_of(context.invocation_metadata() or ())
        return Call(backend, decoded, names, version)

    async def ModelInfer(self, request, context: grpc.aio.ServicerContext) -> bytes:
        # grpc_status's wrapping inlined: this is the hottest coroutine of all
        try:
            if isinstance(request, CoalesceError):  # bytes that were no message (wire.parser)
                raise request
            call = self.prepare(request, context)
            outputs = await call.backend.infer(call.request)
            return encode(request, call.version, outputs, call.names)
        except Exception as exc:
            await abort(context, exc, "ModelInfer")
            raise AssertionError("unreachable: abort() raises") from exc

    async def ModelStreamInfer(self, requests, context: grpc.aio.ServicerContext):
        async for response in StreamSession(self, context).run(requests):
            yield response

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
        route = access.route_of(self.router, request.name, request.version)
        access.admit(self.router, route, access.GrpcCaller(context), None)
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
                request_deserializer=access.sized(wire.parser(request)),
                # ModelInfer answers are serialized by encode() already
                response_serializer=None if method == "ModelInfer" else response.SerializeToString,
            )
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer,
            request_deserializer=access.sized(wire.parser(wire.ModelInferRequest)),
        )
        return grpc.method_handlers_generic_handler(wire.KSERVE, methods)
