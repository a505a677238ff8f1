"""Backends that note the metadata of every call they get, over plaintext or TLS.

`RecordingBatchService` is the example batch-protocol service (config/examples); the
KServe one is a minimal Triton look-alike (ModelReady, ModelConfig, ModelMetadata and
an affine ModelInfer) built on tritonclient's own stubs, for the triton adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from config.examples import batch_server

Call = tuple[int, dict[str, str]]
"""(rows in the batch, the call's metadata)."""


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata() or ()}


class RecordingBatchService(batch_server.BatchService):
    """The example batch service; `calls` holds (rows, metadata) of each Infer."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    async def Infer(self, request, context: grpc.aio.ServicerContext):
        response = await super().Infer(request, context)
        self.calls.append((self.batches[-1], _metadata(context)))
        return response


class RecordingKServe(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Model `affine` (x FP32 [-1, 4] -> y = 2x + 1), as Triton describes and serves it."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.requests: list = []  # every ModelInferRequest, as received

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name == "affine")

    async def ModelConfig(self, request, context):
        config = model_config_pb2.ModelConfig(name="affine", max_batch_size=64)
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelMetadata(self, request, context):
        Tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name="affine",
            versions=["1"],
            platform="recording",
            inputs=[Tensor(name="x", datatype="FP32", shape=[-1, 4])],
            outputs=[Tensor(name="y", datatype="FP32", shape=[-1, 4])],
        )

    async def ModelInfer(self, request, context):
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(-1, 4)
        self.calls.append((len(x), _metadata(context)))
        self.requests.append(request)
        response = service_pb2.ModelInferResponse(model_name="affine", model_version="1")
        response.outputs.add(name="y", datatype="FP32", shape=list(x.shape))
        response.raw_output_contents.append((2 * x + 1).tobytes())
        return response


@contextlib.asynccontextmanager
async def serving(
    service: object, credentials: grpc.ServerCredentials | None = None
) -> AsyncIterator[str]:
    """Serve `service` on a free loopback port (TLS with `credentials`); yields host:port."""
    server = grpc.aio.server()
    if isinstance(service, RecordingKServe):
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    else:
        server.add_generic_rpc_handlers([service.handler()])  # type: ignore[attr-defined]
    address = "127.0.0.1:0"
    port = (
        server.add_secure_port(address, credentials)
        if credentials
        else server.add_insecure_port(address)
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
