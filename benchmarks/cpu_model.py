"""A CPU-bound model in pure numpy, for benchmarks/python_workers.py.

Many small numpy operations per batch: the GIL is held most of the time, as in
real feature-engineering or tree-walking Python models, so threads do not scale
and processes do. Every operation is correctly rounded (multiply, add, sqrt), so a
row's output bytes do not depend on which rows shared its batch and the load
generator can check each answer exactly. Numpy only: it runs inside workers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ITERATIONS = 900
"""About 2 ms per batch of a few rows on the development machine (printed by the benchmark)."""


def forward(x: np.ndarray, iterations: int = ITERATIONS) -> np.ndarray:
    h = np.asarray(x, dtype=np.float32)
    for _ in range(iterations):
        h = np.sqrt(h * h + np.float32(1.0)) * np.float32(0.5)
    return h


def load(iterations: int = ITERATIONS) -> Callable[[dict], dict]:
    return lambda inputs: {"y": forward(inputs["x"], iterations)}
