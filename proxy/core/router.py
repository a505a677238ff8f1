"""Backends (an adapter plus its batcher) and the routes that reach them.

One Backend per `backends` entry: every route naming it shares its batcher, so
several client pipelines coalesce into the same batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from coalesce.config import Backend as BackendSpec
from coalesce.config import Config
from coalesce.errors import CoalesceError, InvalidArgument, NotFound, Unavailable
from coalesce.telemetry.metrics import Metrics, RouteStats
from coalesce.telemetry.tracing import Tracer

from .adapter import Adapter, adapter_class
from .batcher import Batcher
from .batching import signature
from .forwarding import SEQUENCE, batch_key, parameter_key
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


RESTART_KEYS = (
    "listen",
    "grpc_aio_listen",
    "admin",
    "workers",
    "max_message_mb",
    "metrics",
    "tracing",
    "http2",
)
"""Config keys a running server cannot change: a reload that changes them is refused."""


async def _ready(backend: Backend) -> bool:
    try:
        return bool(await backend.adapter.ready())
    except Exception:  # a probe must never kill the prober
        log.exception("backend %s: readiness probe failed", backend.name)
        return False


def _tracer(config: Config) -> Tracer | None:
    if config.tracing is None:
        return None
    try:
        return Tracer(config.tracing)
    except ImportError as exc:
        raise StartupError(
            f"tracing: needs OpenTelemetry, which is not installed ({exc.name} is missing): "
            "pip install 'coalesce[tracing]'"
        ) from None


class ReloadError(Exception):
    """A reload that was refused; the old config keeps serving."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class StartupError(Exception):
    """A backend that cannot even be loaded (import error, bad model file, ...)."""


class Backend:
    """A backend model: its adapter, its batcher and whether it can serve now."""

    def __init__(
        self,
        name: str,
        adapter: Adapter,
        batcher: Batcher,
        metrics: Metrics | None = None,
        *,
        fail_fast_after: int | None = None,
    ) -> None:
        self.name = name
        self.adapter = adapter
        self.batcher = batcher
        self.ready = False
        self.down = False  # the circuit breaker is open: answer UNAVAILABLE, do not queue
        self._fail_fast_after = fail_fast_after
        self._failed_probes = 0
        self.metrics = metrics or Metrics()
        self._accepted: set[tuple] = set()
        self._sequence_requests = 0  # a unique batching key for each sequence request
        self.count = True  # per-request metrics; see config `metrics`
        self._route_stats: dict[str, RouteStats] = {}
        self.tracer: Tracer | None = None  # see config `tracing`
        self._released = False
        self.labels: dict[str, tuple[str, ...]] = {}  # see config `labels`
        self._info_from: ModelInfo | None = None  # the adapter's info, once labelled
        self._labelled: ModelInfo | None = None
        self._time = time.perf_counter  # latencies; uvloop's loop.time() ticks in ms

    async def infer(self, request: InferRequest) -> Tensors:
        """The request's outputs; sent at once, without queueing, when the backend is idle."""
        if not self.count and self.tracer is None:  # nothing to record (`metrics: false`)
            return await self.batcher.infer(request, self._admit(request))
        start = self._start(request)
        try:
            outputs = await self.batcher.infer(request, self._admit(request))
        except BaseException as exc:
            self._record(request, start, exc)
            raise
        self._record(request, start, None)
        return outputs

    def submit(self, request: InferRequest) -> asyncio.Future[Tensors]:
        """Queue the request; the future resolves to its outputs (for callback-style callers)."""
        if not self.count and self.tracer is None:
            return self.batcher.submit(request, self._admit(request))
        start = self._start(request)
        try:
            future = self.batcher.submit(request, self._admit(request))
        except CoalesceError as exc:
            self._record(request, start, exc)
            raise
        future.add_done_callback(lambda f: self._record(request, start, _outcome(f)))
        return future

    def _admit(self, request: InferRequest) -> tuple:
        """Fail fast while the backend is down; else the request's batching key."""
        if self.down:
            raise self._down()
        return self._check(request)

    def _start(self, request: InferRequest) -> float:
        """When the request began (for its latency), and its span when tracing."""
        if self.tracer is not None:
            request.span = self.tracer.request(
                request.route, self.name, request.rows, request.trace
            )
        return self._time()

    def _record(self, request: InferRequest, start: float, error: BaseException | None) -> None:
        if self.count:
            code = "OK" if error is None else _code(error)
            stats = self._route_stats.get(request.route)
            if stats is None:
                stats = self._route_stats[request.route] = self.metrics.route(
                    request.route, self.name
                )
            stats.record(code, request.rows, self._time() - start)
        if request.span is not None:
            self.tracer.finish(request.span, error)

    def _check(self, request: InferRequest) -> tuple:
        """Check the request against the model once per input signature; its batching key
        (the signature, plus any forwarded metadata that must not mix in a batch)."""
        key = signature(request.inputs)
        if key not in self._accepted:
            info = self.info()
            if info.inputs:  # a model that declares nothing is checked by the model itself
                check_inputs(request.inputs, info.inputs, self.name)
                if len(self._accepted) > 256:
                    self._accepted.clear()
                self._accepted.add(key)
        if request.parameters:
            key += self._parameters(request)
        return (key + batch_key(request.metadata)) if request.metadata else key

    def _parameters(self, request: InferRequest) -> tuple:
        """Request parameters reach a backend that takes them (`takes_parameters`, the
        triton adapter); elsewhere a sequence is refused, and other parameters dropped."""
        if getattr(self.adapter, "takes_parameters", False):
            self._sequence_requests += 1
            return parameter_key(request.parameters, self._sequence_requests)
        if any(name in SEQUENCE for name, _, _ in request.parameters):
            raise InvalidArgument(
                f"backend '{self.name}' cannot serve sequences (sequence_id, sequence_start, "
                "sequence_end): only a triton backend passes them to its model"
            )
        return ()

    def info(self) -> ModelInfo:
        info = self.adapter.info()
        if not self.labels or info.labels:
            return info
        if info is not self._info_from:  # the adapter's info changed (a reload of the model)
            self._info_from = info
            self._labelled = dataclasses.replace(info, labels=self.labels)
        return self._labelled

    def route_stats(self, route: str) -> RouteStats | None:
        """What the callers of `route` on this backend saw (None before the first)."""
        return self._route_stats.get(route)

    def probed(self, ready: bool) -> None:
        """Take a readiness probe's answer (and the retries gRPC made meanwhile).

        The circuit breaker: `fail_fast_after` failed probes in a row (not one, so a
        hiccup does not make a healthy backend flap) mark the backend down, and its
        requests, queued ones too, get UNAVAILABLE at once instead of waiting out their
        deadlines; the first probe that succeeds lets them through again.
        """
        counter = getattr(self.adapter, "retry_counter", None)  # see coalesce.adapters.channels
        if counter is not None:
            self.batcher.stats.retries += counter.take()
        if ready or self._fail_fast_after is None:
            if self.down:
                log.info("backend %s: probe succeeded, taking requests again", self.name)
            self.down, self._failed_probes = False, 0
            return
        self._failed_probes += 1
        if not self.down and self._failed_probes >= self._fail_fast_after:
            failed = self._failed_probes
            log.warning("backend %s: %d probes failed in a row, failing fast", self.name, failed)
            self.down = True
            self.batcher.shed(self._down())

    def _down(self) -> Unavailable:
        status = self.status
        why = f": {status}" if status else ""
        return Unavailable(f"backend '{self.name}' is down (its readiness probes fail){why}")

    @property
    def status(self) -> str | None:
        """The adapter's own account of its state, where it gives one (python workers)."""
        return getattr(self.adapter, "status", None)

    async def close(self, grace: float) -> None:
        """Let queued and in-flight requests finish (up to `grace` s), then release."""
        if grace > 0:
            await self.batcher.drain(grace)
        if self._released:
            return
        self._released = True
        await self.batcher.close()
        await self.adapter.close()


class Router:
    """Maps the model names clients ask for onto backends, and watches their health."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.backends: dict[str, Backend] = {}
        self.routes: dict[str, Backend] = {}
        self.plain: set[str] = set()
        self.metrics = Metrics()
        self.tracer = _tracer(config)
        self.table = RouteTable(config.routes)
        self._ordered = {r.model for r in config.routes if r.ordered}
        self.on_health_change: Callable[[str, bool], None] = lambda model, ready: None
        self._prober: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._retired: list[Backend] = []

    async def start(self) -> None:
        """Load every backend; an unreachable one starts not ready rather than failing."""
        for name, spec in self.config.backends.items():
            self.backends[name] = await self._build(name, spec)
        self._set_routes(self.config)
        await self.probe()
        self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def _build(self, name: str, spec: BackendSpec) -> Backend:
        try:
            adapter = adapter_class(spec.type)(name, spec)
            await adapter.load()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise StartupError(f"backend '{name}' cannot load: {problem}") from exc
        timeout = spec.timeout_ms / 1000 if spec.timeout_ms else None
        batcher = Batcher(
            name,
            adapter.infer,
            spec.batching,
            timeout_s=timeout,
            call_keeps_timeout=getattr(adapter, "keeps_timeout", False),
            backend_limit=lambda a=adapter: a.max_batch_size,
            stats=self.metrics.backend(name),
        )
        batcher.start()
        breaker = spec.circuit_breaker
        fail_fast_after = breaker.failed_probes if breaker else None
        backend = Backend(name, adapter, batcher, self.metrics, fail_fast_after=fail_fast_after)
        backend.count = self.config.metrics
        backend.labels = {
            output: tuple(Path(path).read_text().splitlines())
            for output, path in spec.labels.items()
        }
        backend.tracer = batcher.tracer = self.tracer
        return backend

    def _set_routes(self, config: Config) -> None:
        self.table = RouteTable(config.routes)
        self._ordered = {r.model for r in config.routes if r.ordered}
        defaults = self.table.defaults()
        self.routes = {m: self.backends[r.backend] for m, r in defaults.items()}
        self.plain = {  # nothing to admit: no auth, no size limit, no metadata to forward
            m
            for m, r in defaults.items()
            if r.auth is None
            and r.max_request_bytes is None
            and not config.backends[r.backend].forward_metadata
        }

    async def reload(self, config: Config, grace: float) -> list[str]:
        """Switch to `config` (already validated) without dropping a request.

        Backends whose block did not change keep their batcher and queue. New and
        changed ones are loaded first (if one cannot load, nothing changes); then
        the routes switch at once, and the replaced backends finish what they hold
        within `grace` seconds before they close.
        """
        fixed = [k for k in RESTART_KEYS if getattr(config, k) != getattr(self.config, k)]
        fixed += [  # new certificate files are taken live; TLS on or off is a new listener
            key
            for key in ("tls", "admin_tls", "http")
            if (getattr(config, key) is None) != (getattr(self.config, key) is None)
            or (key == "http" and config.http != self.config.http)
        ]
        if fixed:
            raise ReloadError([f"{key}: cannot change without a restart" for key in fixed])
        old = self.config.backends
        keep = {  # unchanged, and not asking to be built again (a failed environment build)
            n: b
            for n, b in self.backends.items()
            if config.backends.get(n) == old[n] and not getattr(b.adapter, "needs_rebuild", False)
        }
        fresh: dict[str, Backend] = {}
        try:
            for name, spec in config.backends.items():
                if name not in keep:
                    fresh[name] = await self._build(name, spec)
        except StartupError as exc:
            await asyncio.gather(*(b.close(0) for b in fresh.values()))
            raise ReloadError([str(exc)]) from exc
        retired = [b for n, b in self.backends.items() if n not in keep]
        before = set(self.routes)
        self.backends = {**keep, **fresh}
        self.config = config
        self._set_routes(config)
        for backend in fresh.values():
            backend.ready = await _ready(backend)
        for model in before - set(self.routes):
            self.on_health_change(model, False)
        for model, backend in self.routes.items():
            self.on_health_change(model, backend.ready)
        for backend in retired:
            self._retired.append(backend)
            task = asyncio.get_running_loop().create_task(backend.close(grace))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        changes = [f"backend {n}: {'changed' if n in old else 'added'}" for n in fresh]
        changes += [f"backend {b.name}: removed" for b in retired if b.name not in fresh]
        log.info("reloaded config: %s", "; ".join(changes) or "no backend changed")
        return changes

    def get(self, model: str, version: str = "", label: str = "") -> Backend:
        if version or label:  # routes pinned to versions or labels (coalesce.core.routing)
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
        for backend in list(self.backends.values()):
            ready = await _ready(backend)
            backend.probed(ready)
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
        """Close every backend now: what is still queued is answered UNAVAILABLE."""
        if self._prober:
            self._prober.cancel()
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for backend in [*self.backends.values(), *self._retired]:
            await backend.close(0)
        self.backends.clear()
        self.routes.clear()
