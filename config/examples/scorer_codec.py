"""An example codec: puts the team service `scorer.v1.Scorer` (scorer.proto, which
knows nothing of Coalesce) behind Coalesce as a `type: grpc` backend.

    backends:
      scorer:
        type: grpc
        target: 127.0.0.1:50052
        codec: config.examples.scorer_codec:ScorerCodec

Clients then send `x` (FP32, [-1, 4]) by any front-end protocol and get `score`
(FP32, [-1, 1]) and `label` (BYTES, [-1, 1]); Coalesce merges their rows into one
ScoreRequest per batch.
"""

from __future__ import annotations

import numpy as np
from coalesce import Tensors, TensorSpec

from config.examples import scorer_pb2


class ScorerCodec:
    """A batch of `x` rows <-> one ScoreRequest / ScoreResponse."""

    method = "/scorer.v1.Scorer/Score"
    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("score", "FP32", (-1, 1)), TensorSpec("label", "BYTES", (-1, 1)))
    max_batch_size = 256

    def __init__(self) -> None:
        self.request_serializer = scorer_pb2.ScoreRequest.SerializeToString
        self.response_deserializer = scorer_pb2.ScoreResponse.FromString

    def encode(self, inputs: Tensors) -> scorer_pb2.ScoreRequest:
        examples = [scorer_pb2.Example(features=row) for row in inputs["x"].tolist()]
        return scorer_pb2.ScoreRequest(examples=examples)

    def decode(self, response: scorer_pb2.ScoreResponse) -> Tensors:
        labels = np.array([label.encode() for label in response.labels], dtype=object)
        return {
            "score": np.array(response.scores, dtype=np.float32).reshape(-1, 1),
            "label": labels.reshape(-1, 1),
        }
