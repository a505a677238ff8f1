"""Models for `type: python` backends, loaded inside worker processes.

They import numpy and the standard library only, never Coalesce: a worker may run
another interpreter (a venv with numpy 1) where Coalesce is not installed. Each
answers with the worker's pid per row, so tests can see which process served them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np

POISON = -1.0
"""A row whose first value is this makes `exiting` exit and `hanging` hang."""

INPUTS = [("x", "FP32", [-1, 4])]
OUTPUTS = [("y", "FP32", [-1, 4]), ("s", "FP32", [-1, 1]), ("pid", "INT64", [-1, 1])]


class Affine:
    """y = 2x + 1, s = row sums (tests.client.affine_expected), plus the worker's pid."""

    inputs = INPUTS
    outputs = OUTPUTS

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay = delay_ms / 1000

    def __call__(self, inputs: dict) -> dict:
        x = inputs["x"]
        if np.isnan(x).any():
            raise ValueError("x contains NaN")
        self.poisoned(x)
        if self.delay:
            time.sleep(self.delay)
        pid = np.full((len(x), 1), os.getpid(), dtype=np.int64)
        return {"y": 2 * x + 1, "s": x.sum(axis=1, keepdims=True), "pid": pid}

    def poisoned(self, x: np.ndarray) -> None:
        """What the model does with a poison row: nothing here."""


class Exiting(Affine):
    def poisoned(self, x: np.ndarray) -> None:
        if (x[:, 0] == POISON).any():
            os._exit(3)


class Hanging(Affine):
    def poisoned(self, x: np.ndarray) -> None:
        if (x[:, 0] == POISON).any():
            time.sleep(3600)


class Versions:
    """Says which numpy and interpreter run it: a BYTES output, one row per input row."""

    def __call__(self, inputs: dict) -> dict:
        rows = len(inputs["x"])
        text = f"{np.__version__} {sys.executable}".encode()
        out = np.empty((rows, 1), dtype=object)
        out[:] = text
        return {"version": out, "y": 2 * inputs["x"] + 1}


class Environment:
    """Answers `name` from the worker's environment (empty when unset), once per row."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, inputs: dict) -> dict:
        out = np.empty((len(inputs["x"]), 1), dtype=object)
        out[:] = os.environ.get(self.name, "").encode()
        return {"value": out}


def environment(name: str) -> Environment:
    return Environment(name)


def affine(delay_ms: float = 0.0) -> Affine:
    return Affine(delay_ms)


def exiting() -> Exiting:
    return Exiting()


def hanging() -> Hanging:
    return Hanging()


def versions() -> Versions:
    return Versions()


def missing_dependency() -> Affine:
    import coalesce_no_such_package  # noqa: F401  (the start-up failure under test)

    return Affine()


def echo() -> Callable[[dict], dict]:
    """Returns every input unchanged: every datatype through the shared region and back."""
    return lambda inputs: {name: np.array(a) for name, a in inputs.items()}
