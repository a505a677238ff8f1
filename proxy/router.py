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
from .errors import CoalesceError, NotFound
from .metrics import Metrics
from .request import InferRequest, ModelInfo, Tensors
from .routing import RouteTable
from .tensors import check_inputs

log = logging.getLogger("coalesce")
PROBE_INTERVAL_S = 2.0


def _code(error: BaseException) -> str:
    if isinstance(error, CoalesceError):
        return error.code.name
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"


def _outcome(future: asyncio.Future) -> BaseException | None:
    return asyncio.CancelledError() if future.cancelled() else future.exception()


class StartupError(Exception):
    """A backend that cannot even be loaded (import error, bad model file, ...)."""


class Backend:
    """A backend model: its adapter, its batcher and whether it can serve now."""

    def __init__(
        self, name: str, adapter: Adapter, batcher: Batcher, metrics: Metrics | None = None
    ) -> None:
        self.name = name
        self.adapter = adapter
        self.batcher = batcher
        self.ready = False
        self.metrics = metrics or Metrics()
        self._accepted: set[tuple] = set()
        self._time = asyncio.get_running_loop().time

    async def infer(self, request: InferRequest) -> Tensors:
        """The request's outputs; sent at once, without queueing, when the backend is idle."""
        start = self._time()
        try:
            outputs = await self.batcher.infer(request, self._check(request))
        except BaseException as exc:
            self._record(request, start, exc)
            raise
        self._record(request, start, None)
        return outputs

    def submit(self, request: InferRequest) -> asyncio.Future[Tensors]:
        """Queue the request; the future resolves to its outputs (for callback-style callers)."""
        start = self._time()
        try:
            future = self.batcher.submit(request, self._check(request))
        except CoalesceError as exc:
            self._record(request, start, exc)
            raise
        future.add_done_callback(lambda f: self._record(request, start, _outcome(f)))
        return future

    def _record(self, request: InferRequest, start: float, error: BaseException | None) -> None:
        code = "OK" if error is None else _code(error)
        stats = self.metrics.route(request.route, self.name)
        stats.record(code, request.rows, self._time() - start)

    def _check(self, request: InferRequest) -> tuple:
        """Check the request against the model once per input signature; its signature."""
        key = signature(request.inputs)
        if key not in self._accepted:
            info = self.info()
            if info.inputs:  # a model that declares nothing is checked by the model itself
                check_inputs(request.inputs, info.inputs, self.name)
                if len(self._accepted) > 256:
                    self._accepted.clear()
                self._accepted.add(key)
        return key

    def info(self) -> ModelInfo:
        return self.adapter.info()


class Router:
    """Maps the model names clients ask for onto backends, and watches their health."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.backends: dict[str, Backend] = {}
        self.routes: dict[str, Backend] = {}
        self.metrics = Metrics()
        self.table = RouteTable(config.routes)
        self._ordered = {r.model for r in config.routes if r.ordered}
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
                stats=self.metrics.backend(name),
            )
            batcher.start()
            self.backends[name] = Backend(name, adapter, batcher, self.metrics)
        self.routes = {m: self.backends[r.backend] for m, r in self.table.defaults().items()}
        await self.probe()
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    def get(self, model: str, version: str = "", label: str = "") -> Backend:
        if version or label:  # routes pinned to versions or labels (coalesce.routing)
            route = self.table.find(model, version, label)
            if route is not None and (label or route.version is not None):
                return self.backends[route.backend]
        backend = self.routes.get(model)
        if backend is None:
            raise NotFound(f"model '{model}' is not routed by this server")
        if version and version not in backend.info().versions:
            raise NotFound(f"model '{model}' has no version '{version}'")
        return backend

    def ordered(self, model: str) -> bool:
        """Whether streamed answers for `model` keep request order."""
        return model in self._ordered

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
