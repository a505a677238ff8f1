"""The benchmark model, a small MLP 64 -> 256 -> 256 -> 10 with ReLU between.

The single definition of its weights and maths: benchmarks and tests compute the
expected output in-process (numpy 2), and the Triton models ``bench_mlp`` and
``bench_mlp_dyn`` import this same file by path inside the python-backend stub
(numpy 1), so the two cannot drift apart. Keep it valid for numpy 1 and 2.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


STEP = 32.0
"""Weights are rounded to multiples of 1/STEP: with integer inputs in [-3, 3] every sum
is then exact in float32, so an output's bytes do not depend on which rows shared its
batch (BLAS sums in a different order for different batch sizes) and the load
generator can check every answer byte for byte."""


@lru_cache(maxsize=1)
def weights() -> tuple[Array, Array, Array, Array]:
    """(W1, b1, W2, W3), float32, drawn from seed 0 (fixed order) and rounded to 1/STEP."""
    rng = np.random.default_rng(0)
    draws = [
        rng.standard_normal((64, 256)),
        rng.standard_normal((256, 256)),
        rng.standard_normal((256, 10)),
    ]
    w1, w2, w3 = (np.round(w * 0.1 * STEP).astype(np.float32) / np.float32(STEP) for w in draws)
    return w1, np.zeros(256, dtype=np.float32), w2, w3


def inputs(count: int, seed: int = 1) -> Array:
    """`count` distinct rows of integer-valued features in [-3, 3]."""
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, size=(count, 64)).astype(np.float32)


def forward(x: npt.ArrayLike) -> Array:
    """Rows of 64 float32 features -> rows of 10 outputs."""
    w1, b1, w2, w3 = weights()
    h = np.maximum(np.asarray(x, dtype=np.float32) @ w1 + b1, 0)
    h = np.maximum(h @ w2, 0)
    y: Array = (h @ w3).astype(np.float32)
    return y
