"""The floor for Python gRPC here: a grpc.aio + uvloop server that answers every
ModelInfer with the same pre-serialized bytes, without parsing the request.

    python -m benchmarks.empty_server PORT RESPONSE_FILE
"""

from __future__ import annotations

import sys

import grpc
import uvloop


async def serve(port: int, response: bytes) -> None:
    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    await serve_model_infer(port, model_infer)


async def serve_model_infer(port: int, model_infer) -> None:
    """A grpc.aio + uvloop server with ModelInfer alone, bytes in and out, until killed."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},
    )
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    from pathlib import Path

    uvloop.run(serve(int(sys.argv[1]), Path(sys.argv[2]).read_bytes()))
