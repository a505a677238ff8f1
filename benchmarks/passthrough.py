"""The floor for one Python gRPC hop: a grpc.aio + uvloop server that forwards every
ModelInfer's bytes, unparsed and unbatched, to a target and returns the answer's bytes.

A latency reference for the batching-gain scenario at c=1: whatever Coalesce adds over
this is its own; what this adds over calling the target directly is grpc.aio's.

    python -m benchmarks.passthrough PORT TARGET
"""

from __future__ import annotations

import sys

import grpc
import uvloop

from benchmarks.empty_server import serve_model_infer

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def serve(port: int, target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    forward = channel.unary_unary(METHOD)  # no (de)serializers: bytes in, bytes out

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await forward(request)

    await serve_model_infer(port, model_infer)


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
