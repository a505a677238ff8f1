"""The example team service behind the codec example: `scorer.v1.Scorer` from
config/examples/scorer.proto, with its generated stubs and plain grpc.aio.

Each example's score is the dot product of its features with WEIGHTS; its label is
"high" from THRESHOLD up, else "low". From the repository root:

    python -m config.examples.scorer_server --port 50052
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc

from config.examples import scorer_pb2, scorer_pb2_grpc

WEIGHTS = (0.5, 1.0, 1.5, 2.0)
THRESHOLD = 20.0


class Scorer(scorer_pb2_grpc.ScorerServicer):
    """Scores every example of a request; `batches` records the examples per call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def Score(self, request, context: grpc.aio.ServicerContext):
        scores = []
        for i, example in enumerate(request.examples):
            if len(example.features) != len(WEIGHTS):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"example {i}: {len(example.features)} features, expected {len(WEIGHTS)}",
                )
            scores.append(sum(w * f for w, f in zip(WEIGHTS, example.features, strict=True)))
        self.batches.append(len(scores))
        labels = ["high" if s >= THRESHOLD else "low" for s in scores]
        return scorer_pb2.ScoreResponse(scores=scores, labels=labels)


async def serve(address: str, scorer: Scorer) -> tuple[grpc.aio.Server, int]:
    """Start a server for `scorer` on `address` ("host:0" picks a free port)."""
    server = grpc.aio.server()
    scorer_pb2_grpc.add_ScorerServicer_to_server(scorer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052)
    args = parser.parse_args()
    server, port = await serve(f"{args.host}:{args.port}", Scorer())
    logging.info("scorer on %s:%d", args.host, port)
    await server.wait_for_termination()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
