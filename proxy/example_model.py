"""The model `coalesce serve` serves with no config: a tiny fixed-weight numpy MLP.

It classifies 4 features into 3 classes, like an iris classifier, so a newcomer
can call a real model within a minute. Weights come from numpy seed 0, so the
answers are the same everywhere.
"""

from __future__ import annotations

import numpy as np
from coalesce.core.request import Tensors, TensorSpec


class ExampleMLP:
    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("probabilities", "FP32", (-1, 3)),)

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.w1 = rng.standard_normal((4, 16), dtype=np.float32)
        self.w2 = rng.standard_normal((16, 3), dtype=np.float32)

    def __call__(self, inputs: Tensors) -> Tensors:
        hidden = np.maximum(inputs["x"] @ self.w1, 0)
        logits = hidden @ self.w2
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return {"probabilities": exp / exp.sum(axis=1, keepdims=True)}


def load() -> ExampleMLP:
    return ExampleMLP()
