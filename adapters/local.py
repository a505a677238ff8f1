"""`type: local` — a Python model running inside the sidecar process.

A blocking model runs in a thread pool so the event loop keeps accepting
requests (numpy releases the GIL in its heavy loops); an `async def` model, or
one marked `inline: true`, is called on the loop itself.
"""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from coalesce.config import LocalBackend
from coalesce.core.adapter import import_string
from coalesce.core.request import ModelInfo, Tensors, TensorSpec
from coalesce.errors import CoalesceError, Internal, InvalidArgument


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

    async def load(self) -> None:
        self._model = import_string(self.config.model)(**self.config.args)
        call = type(self._model).__call__ if not inspect.isroutine(self._model) else self._model
        self._is_async = inspect.iscoroutinefunction(call)
        self._info = ModelInfo(
            inputs=_specs(getattr(self._model, "inputs", ())),
            outputs=_specs(getattr(self._model, "outputs", ())),
            platform="coalesce_local",
        )
        if not (self._is_async or self.config.inline):
            threads = self.config.threads or self.config.batching.max_in_flight
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"model-{self.name}")

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        try:
            if self._is_async:
                outputs = await self._model(inputs)
            elif self._pool is None:
                outputs = self._model(inputs)
            else:
                loop = asyncio.get_running_loop()
                outputs = await loop.run_in_executor(self._pool, self._model, inputs)
        except CoalesceError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"model '{self.name}' rejected the batch: {exc}") from exc
        if not isinstance(outputs, dict):
            raise Internal(f"model '{self.name}' returned {type(outputs).__name__}, not a dict")
        return outputs

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
