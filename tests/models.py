"""Purpose-built models for tests (loaded by dotted path from test configs).

Each records the batch sizes it saw so that tests can prove coalescing from the
model's side, not from Coalesce's own counters.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
from coalesce import TensorSpec


class Affine:
    """Same math as the Triton test model `affine`: y = 2x + 1, s = row sums."""

    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("y", "FP32", (-1, 4)), TensorSpec("s", "FP32", (-1, 1)))

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay = delay_ms / 1000
        self.batches: list[int] = []

    def __call__(self, inputs):
        x = inputs["x"]
        if np.isnan(x).any():
            raise ValueError("x contains NaN")
        self.batches.append(len(x))
        if self.delay:
            time.sleep(self.delay)
        return {"y": 2 * x + 1, "s": x.sum(axis=1, keepdims=True)}


class Echo:
    """Returns every input unchanged: exercises every datatype through the wire."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, inputs):
        self.batches.append(len(next(iter(inputs.values()))))
        return {name: np.array(a) for name, a in inputs.items()}


class Gated:
    """An async model that holds each batch until the test opens the gate."""

    inputs = Affine.inputs
    outputs = Affine.outputs

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.batches: list[int] = []
        self.seen: list[np.ndarray] = []

    async def __call__(self, inputs):
        x = inputs["x"]
        self.batches.append(len(x))
        self.seen.append(np.array(x))
        self.entered.set()
        await self.gate.wait()
        if np.isnan(x).any():
            raise ValueError("x contains NaN")
        return {"y": 2 * x + 1, "s": x.sum(axis=1, keepdims=True)}


class GatedEcho(Gated):
    """Like Gated, for inputs of any shape: answers `y` = `x` once the gate opens."""

    inputs = ()
    outputs = ()

    async def __call__(self, inputs):
        self.batches.append(len(inputs["x"]))
        self.entered.set()
        await self.gate.wait()
        return {"y": inputs["x"]}


class FailingLimit(Gated):
    """Like Gated, with a batch limit that raises while `failing` is set: a fault in
    user code that the batcher's scheduler itself runs."""

    failing = False

    @property
    def max_batch_size(self) -> int:
        if self.failing:
            raise RuntimeError("limit lookup failed")
        return 64


class WrongRows:
    """A broken model: returns one row too few."""

    def __call__(self, inputs):
        return {"y": inputs["x"][:-1]}


class Exiting:
    """Crashes the whole process; used only where a test wants a dead backend."""

    def __call__(self, inputs):
        os._exit(3)


def affine(delay_ms: float = 0.0) -> Affine:
    return Affine(delay_ms)


def echo() -> Echo:
    return Echo()


def gated() -> Gated:
    return Gated()


def gated_echo() -> GatedEcho:
    return GatedEcho()


def failing_limit() -> FailingLimit:
    return FailingLimit()


def wrong_rows() -> WrongRows:
    return WrongRows()


class Slowable(Affine):
    """Affine whose delay becomes `factor` times longer while a flag file exists."""

    def __init__(self, delay_ms: float, flag: str, factor: float = 50) -> None:
        super().__init__(delay_ms)
        self.flag = flag
        self.factor = factor

    def __call__(self, inputs):
        import pathlib

        slow = pathlib.Path(self.flag).exists()
        self.delay = self.base * (self.factor if slow else 1)
        return super().__call__(inputs)

    @property
    def base(self) -> float:
        return self._base

    @base.setter
    def base(self, value: float) -> None:
        self._base = value


def slowable(delay_ms: float, flag: str, factor: float = 50) -> Slowable:
    model = Slowable(delay_ms, flag, factor)
    model.base = delay_ms / 1000
    return model


def blas_threads():
    """Answers each row with the BLAS thread count its model thread sees (and a product,
    so that BLAS runs): how `serve` set up the process for its models."""
    from coalesce.ops import blas

    def call(inputs):
        x = inputs["x"]
        count = blas.threads() or 0
        return {"y": np.full((len(x), 1), count, dtype=np.int32), "z": x @ x.T[:, :1]}

    return call


class ThreadNoting:
    """Notes the thread that runs each call; from call `slow_after` on, each call
    sleeps `sleep_s` (a model that turns slow, or one that waits on I/O from the start)."""

    def __init__(self, sleep_s: float = 0.0, slow_after: int = 0) -> None:
        self.sleep_s, self.slow_after = sleep_s, slow_after
        self.threads: list[str] = []

    def __call__(self, inputs):
        import threading

        self.threads.append(threading.current_thread().name)
        if self.sleep_s and len(self.threads) > self.slow_after:
            time.sleep(self.sleep_s)
        return {"y": inputs["x"]}


def thread_noting(sleep_s: float = 0.0, slow_after: int = 0) -> ThreadNoting:
    return ThreadNoting(sleep_s, slow_after)
