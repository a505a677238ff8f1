"""`type: local` — a Python model running inside the sidecar process.

A blocking model runs in a thread pool so the event loop keeps accepting
requests (numpy releases the GIL in its heavy loops); an `async def` model, or
one marked `inline: true`, is called on the loop itself. By default (`inline: auto`)
a model whose calls prove quick is called on the loop too: handing a call to a thread
and back, and the GIL with it, costs more than the call itself (an MLP of 64 rows,
Kafka pipeline, 2 workers: 38.2k -> 46.7k msgs/s, medians of 3 alternated runs). A
call that proves slow sends the next ones back to the threads.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from coalesce.config import LocalBackend
from coalesce.core.adapter import import_string
from coalesce.core.request import ModelInfo, Tensors, TensorSpec
from coalesce.errors import CoalesceError, Internal, InvalidArgument

QUICK_S = 0.0003  # seconds a call under which `inline: auto` calls the model on the loop


def _specs(items: Any) -> tuple[TensorSpec, ...]:
    return tuple(s if isinstance(s, TensorSpec) else TensorSpec(*s) for s in items or ())


class LocalAdapter:
    """Calls `factory(**args)`'s result with each batch."""

    def __init__(self, name: str, config: LocalBackend) -> None:
        self.name = name
        self.config = config
        self._model: Any = None
        self._is_async = False
        self._pool: ThreadPoolExecutor | None = None
        self._info = ModelInfo()
        self._cost = float("inf")  # seconds a call, moving average (inline: auto)

    async def load(self) -> None:
        self._model = import_string(self.config.model)(**self.config.args)
        call = type(self._model).__call__ if not inspect.isroutine(self._model) else self._model
        self._is_async = inspect.iscoroutinefunction(call)
        self._info = ModelInfo(
            inputs=_specs(getattr(self._model, "inputs", ())),
            outputs=_specs(getattr(self._model, "outputs", ())),
            platform="coalesce_local",
        )
        if not (self._is_async or self.config.inline is True):
            threads = self.config.threads or self.config.batching.max_in_flight
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"model-{self.name}")

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        try:
            if self._is_async:
                outputs = await self._model(inputs)
            elif self._pool is None:
                outputs = self._model(inputs)
            elif self._cost < QUICK_S and self.config.inline == "auto":
                outputs = self._timed(inputs)
            else:
                loop = asyncio.get_running_loop()
                call = self._timed if self.config.inline == "auto" else self._model
                outputs = await loop.run_in_executor(self._pool, call, inputs)
        except CoalesceError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"model '{self.name}' rejected the batch: {exc}") from exc
        if not isinstance(outputs, dict):
            raise Internal(f"model '{self.name}' returned {type(outputs).__name__}, not a dict")
        return outputs

    def _timed(self, inputs: Tensors) -> Any:
        """The model's call, its time folded into the moving average that picks where
        the next call runs. Wall time, not CPU: a model that waits (on I/O, a lock)
        stays in the threads. In a thread, waits for the GIL count too: a model only
        moves to the loop once its calls are quick even so."""
        start = time.perf_counter()
        try:
            return self._model(inputs)
        finally:
            took = time.perf_counter() - start
            cost = self._cost
            self._cost = took if cost == float("inf") else cost * 0.75 + took * 0.25

    @property
    def model(self) -> Any:
        """The loaded model object."""
        return self._model

    async def ready(self) -> bool:
        return self._model is not None

    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch_size(self) -> int | None:
        return getattr(self._model, "max_batch_size", None)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
