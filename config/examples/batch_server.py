"""An example model service for `type: grpc` backends: Coalesce's batch protocol
(protos/coalesce_batch.proto) served with plain grpc.aio.

Coalesce has already merged its callers' requests, so each Infer call is one whole
batch: run the model once and answer one row per input row. Two models:
`affine` (x FP32 [-1, 4] -> y = 2x + 1, s = row sums; NaN is refused) and `echo` (every input back
unchanged, any datatype). A service in another language generates its stubs from
protos/coalesce_batch.proto; this one borrows the message classes from `coalesce.codecs.wire`.

    python config/examples/batch_server.py --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc
import numpy as np
from coalesce import CoalesceError
from coalesce.codecs import wire
from coalesce.core.tensors import from_raw, to_raw

log = logging.getLogger("batch_server")
AFFINE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "s", "datatype": "FP32", "shape": [-1, 1]},
    ],
}


def affine(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    if np.isnan(x).any():
        raise ValueError("x contains NaN")
    return {"y": 2 * x + 1, "s": x.sum(axis=1, keepdims=True)}


def echo(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(inputs)


MODELS = {"affine": (affine, AFFINE), "echo": (echo, {})}


class BatchService:
    """coalesce.batch.v1.BatchInference; `batches` records the rows of every call, and
    `ready` is what Metadata reports (a real service would say False while loading)."""

    def __init__(self, max_batch_size: int = 0) -> None:
        self.max_batch_size = max_batch_size
        self.batches: list[int] = []
        self.ready = True

    async def Infer(self, request, context: grpc.aio.ServicerContext):
        model, _ = self._model(request.model)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.model}'")
        try:
            inputs = {
                t.name: from_raw(t.raw, t.datatype, tuple(t.shape), t.name) for t in request.inputs
            }
            outputs = model(inputs)
        except (CoalesceError, KeyError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad batch: {exc}")
        self.batches.append(len(next(iter(inputs.values()))))
        response = wire.BatchResponse()
        for name, array in outputs.items():
            datatype, raw = to_raw(array, name)
            response.outputs.add(name=name, datatype=datatype, shape=array.shape, raw=raw)
        return response

    async def Metadata(self, request, context: grpc.aio.ServicerContext):
        model, tensors = self._model(request.model)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.model}'")
        return wire.BatchMetadataResponse(
            ready=self.ready, max_batch_size=self.max_batch_size, platform="example", **tensors
        )

    @staticmethod
    def _model(name: str):
        return MODELS.get(name or "affine", (None, None))

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Infer": (wire.BatchRequest, wire.BatchResponse),
            "Metadata": (wire.BatchMetadataRequest, wire.BatchMetadataResponse),
        }
        return grpc.method_handlers_generic_handler(
            wire.BATCH,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    getattr(self, name),
                    request_deserializer=request.FromString,
                    response_serializer=response.SerializeToString,
                )
                for name, (request, response) in methods.items()
            },
        )


async def serve(address: str, service: BatchService) -> tuple[grpc.aio.Server, int]:
    """Start a server for `service` on `address` ("host:0" picks a free port)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([service.handler()])
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--max-batch-size", type=int, default=0, help="0: no limit")
    args = parser.parse_args()
    server, port = await serve(f"{args.host}:{args.port}", BatchService(args.max_batch_size))
    log.info("batch protocol server on %s:%d", args.host, port)
    await server.wait_for_termination()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
