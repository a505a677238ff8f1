"""A model for a managed runtime (config/python_runtime.yaml): it runs in a virtual
environment Coalesce builds from its `requirements`, with a numpy unlike the sidecar's.

Pure numpy, no Coalesce: the workers import it under the environment's interpreter,
from the `code:` directory. Answers softmax(x @ W + b) and the numpy it ran under.
"""

from __future__ import annotations

import numpy as np

WEIGHTS = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
BIAS = np.array([0.1, 0.0, -0.1], dtype=np.float32)


class PinnedModel:
    inputs = [("x", "FP32", [-1, 4])]
    outputs = [("probabilities", "FP32", [-1, 3]), ("numpy_version", "BYTES", [-1, 1])]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = inputs["x"] @ WEIGHTS + BIAS
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        version = np.full((len(logits), 1), np.__version__.encode(), dtype=object)
        return {"probabilities": exp / exp.sum(axis=1, keepdims=True), "numpy_version": version}


def load() -> PinnedModel:
    return PinnedModel()
