"""Backends (an adapter plus its batcher) and the routes that reach them.

One Backend per `backends` entry: every route naming it shares its batcher, so
several client pipelines coalesce into the same batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .adapter import Adapter, adapter_class
from .batcher import Batcher
from .batching import signature
from .config import Config
from .errors import NotFound
from .request import InferRequest, ModelInfo, Tensors
from .tensors import check_inputs

log = logging.getLogger("coalesce")
PROBE_INTERVAL_S = 2.0


class StartupError(Exception):
    """A backend that cannot even be loaded (import error, bad model file, ...)."""


class Backend:
    """A backend model: its adapter, its batcher and whether it can serve now."""

    def __init__(self, name: str, adapter: Adapter, batcher: Batcher) -> None:
        self.name = name
        self.adapter = adapter
        self.batcher = batcher
        self.ready = False
        self._accepted: set[tuple] = set()

    async def infer(self, request: InferRequest) -> Tensors:
        key = signature(request.inputs)
        if key not in self._accepted:
            info = self.info()
            if info.inputs:  # a model that declares nothing is checked by the model itself
                check_inputs(request.inputs, info.inputs, self.name)
                if len(self._accepted) > 256:
                    self._accepted.clear()
                self._accepted.add(key)
        return await self.batcher.submit(request, key)

    def info(self) -> ModelInfo:
        return self.adapter.info()


class Router:
    """Maps the model names clients ask for onto backends, and watches their health."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.backends: dict[str, Backend] = {}
        self.routes: dict[str, Backend] = {}
        self.on_health_change: Callable[[str, bool], None] = lambda model, ready: None
        self._prober: asyncio.Task | None = None

    async def start(self) -> None:
        """Load every backend; an unreachable one starts not ready rather than failing."""
        for name, spec in self.config.backends.items():
            try:
                adapter = adapter_class(spec.type)(name, spec)
                await adapter.load()
            except Exception as exc:
                raise StartupError(
                    f"backend '{name}' cannot load: {type(exc).__name__}: {exc}"
                ) from exc
            timeout = spec.timeout_ms / 1000 if spec.timeout_ms else None
            batcher = Batcher(
                name,
                adapter.infer,
                spec.batching,
                timeout_s=timeout,
                backend_limit=lambda a=adapter: a.max_batch_size,
            )
            batcher.start()
            self.backends[name] = Backend(name, adapter, batcher)
        self.routes = {r.model: self.backends[r.backend] for r in self.config.routes}
        await self.probe()
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    def get(self, model: str, version: str = "") -> Backend:
        backend = self.routes.get(model)
        if backend is None:
            raise NotFound(f"model '{model}' is not routed by this server")
        if version and version not in backend.info().versions:
            raise NotFound(f"model '{model}' has no version '{version}'")
        return backend

    def models_of(self, backend: Backend) -> list[str]:
        return [model for model, b in self.routes.items() if b is backend]

    async def probe(self) -> None:
        """Ask every backend whether it is ready; report changes per routed model."""
        for backend in self.backends.values():
            try:
                ready = await backend.adapter.ready()
            except Exception:  # a probe must never kill the prober
                log.exception("backend %s: readiness probe failed", backend.name)
                ready = False
            if ready != backend.ready:
                log.info("backend %s is %s", backend.name, "ready" if ready else "NOT ready")
                backend.ready = ready
                for model in self.models_of(backend):
                    self.on_health_change(model, ready)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self.probe()

    @property
    def ready(self) -> bool:
        return all(b.ready for b in self.backends.values())

    async def close(self) -> None:
        if self._prober:
            self._prober.cancel()
        for backend in self.backends.values():
            await backend.batcher.close()
            await backend.adapter.close()
        self.backends.clear()
        self.routes.clear()
