"""Assembles the sidecar: router, gRPC front end, health service, admin HTTP.

Shutdown follows the grpc asyncio examples: health goes NOT_SERVING, the server
stops taking calls and gives the ones in flight `grace_period_s` to finish, then
backends close (failing whatever is left UNAVAILABLE) and the process exits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Callable

import grpc
from aiohttp import web
from coalesce.core.router import ReloadError, Router
from coalesce.frontends import rest
from coalesce.frontends.kserve.grpc import KServeService
from coalesce.frontends.kserve.shared_memory import SharedMemory
from coalesce.frontends.tfserving.grpc import TFServingService
from coalesce.http2.grpc_server import NativeServer
from coalesce.ops import admin, stats
from coalesce.pipelines.runner import Pipelines, missing_clients
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .config import Config, ConfigError, ServerTLS
from .tls import ServerCertificates, peer_identity

log = logging.getLogger("coalesce")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def freeze_heap() -> int:
    """Put every object alive now out of the cycle collector's reach (gc.freeze).

    The modules, config and backends loaded at start are most of the heap and live
    until exit, yet each full collection walked them all: 28 ms a pass under load
    here, which was the p99 (c=64 through Triton: 37 ms, 12 ms frozen). Objects
    frozen are still freed by reference counting; only cycles among them stay.
    """
    gc.collect()
    gc.freeze()
    count = gc.get_freeze_count()
    log.info("heap frozen: %d objects out of the collector's reach", count)
    return count


class _UnknownMethod(grpc.GenericRpcHandler):
    """Any method no other handler serves: UNIMPLEMENTED naming it, as our own listener
    says (grpc.aio's own answer is a bare "Method not found!"). Stream-stream, so that it
    answers at once whatever kind of call the client makes."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def answer(requests, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {details.method}"
            )

        return grpc.stream_stream_rpc_method_handler(answer)


def _generic_handlers(servicer) -> list[grpc.GenericRpcHandler]:
    """The generic handlers `add_HealthServicer_to_server` registers, for our listener."""

    class Collect:
        def __init__(self) -> None:
            self.handlers: list[grpc.GenericRpcHandler] = []

        def add_generic_rpc_handlers(self, handlers) -> None:
            self.handlers.extend(handlers)

        def add_registered_method_handlers(self, service, handlers) -> None:
            pass  # the same methods as the generic handler above

    collect = Collect()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, collect)
    return collect.handlers


class Server:
    """One serving process; `start()` then `stop()`, or `run()` until a signal."""

    def __init__(self, config: Config, source: Callable[[], Config] | None = None) -> None:
        """`source` reads the config again for a reload (SIGHUP, POST /reload)."""
        self.config = config
        self._source = source
        self.router = Router(config)
        self.pipelines = Pipelines(self.router)  # broker inboxes -> the same batchers
        self.shared_memory = SharedMemory()  # Triton's system shared memory, gRPC and REST
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._grpc: grpc.aio.Server | None = None
        self._admin: web.AppRunner | None = None
        self.http_port = 0
        self._http: web.AppRunner | None = None
        self._native: NativeServer | None = None
        self.aio_port = 0
        self._health_tasks: set[asyncio.Task] = set()
        self._publisher: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._tls: dict[str, ServerCertificates] = {}  # by listener: grpc, http, admin
        self._frozen = False  # see freeze_heap; run() only, never a test's shared heap

    async def start(self) -> None:
        for route in self.config.routes:
            await self.health.set(route.model, NOT_SERVING)
        await self.health.set("", SERVING)
        self.router.on_health_change = self._set_health
        await self.router.start()
        limit = int(self.config.max_message_mb * 1024 * 1024)
        kserve = KServeService(self.router, self.shared_memory)
        handlers = [kserve.handler(), *TFServingService(self.router).handlers()]
        reuse = self.config.workers > 1
        self._native = NativeServer(
            [*handlers, *_generic_handlers(self.health)],
            limit,
            self.config.http2,
            fast=kserve.fast_methods(),
        )
        self.port = await self._native.start(
            self.config.listen,
            reuse_port=reuse,
            tls=self._ssl_context("grpc", self.config.tls, alpn=("h2",)),
            identify=peer_identity,
        )
        if self.config.grpc_aio_listen:
            self._grpc = grpc.aio.server(
                options=[
                    ("grpc.max_send_message_length", limit),
                    ("grpc.max_receive_message_length", limit),
                    # Sharing the port is only right between our own workers; otherwise a
                    # second sidecar on the same port must fail, not silently split traffic.
                    ("grpc.so_reuseport", int(reuse)),
                ]
            )
            self._grpc.add_generic_rpc_handlers(handlers)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
            self._grpc.add_generic_rpc_handlers([_UnknownMethod()])  # last: after all others
            self.aio_port = self._add_port(self._grpc, self.config.grpc_aio_listen, self.config.tls)
            if not self.aio_port:
                raise OSError(f"cannot listen on {self.config.grpc_aio_listen}")
            await self._grpc.start()
        folder = stats.shared_folder()
        if folder is not None and folder.worker:  # the admin worker reads the others
            self._publisher = asyncio.get_running_loop().create_task(
                stats.publish(self.router, folder, self.pipelines.status)
            )
        if self.config.admin:
            self._admin = await admin.start(
                self.router,
                self.config.admin,
                folder,
                self.reload,
                ssl_context=self._ssl_context("admin", self.config.admin_tls),
                pipelines=self.pipelines.status,
            )
        if self.config.http:
            self._http, self.http_port = await rest.start(
                self.router,
                self.config.http,
                shared=self.shared_memory,
                max_body_bytes=limit,
                grace=self.config.grace_period_s,
                reuse_port=self.config.workers > 1,
                ssl_context=self._ssl_context("http", self.config.tls),
            )
        await self.pipelines.start(self.config.pipelines)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_pipelines())
        host = self.config.listen.rpartition(":")[0]
        log.info(
            "serving %s on %s:%d (admin %s, http %s, grpc_aio_listen %s)",
            ", ".join(self.router.routes),
            host,
            self.port,
            self.config.admin or "off",
            f"{self.config.http.rpartition(':')[0]}:{self.http_port}" if self._http else "off",
            f"{self.config.grpc_aio_listen.rpartition(':')[0]}:{self.aio_port}"
            if self._grpc
            else "off",
        )

    def _add_port(self, server: grpc.aio.Server, address: str, tls: ServerTLS | None) -> int:
        if tls is None:
            return server.add_insecure_port(address)
        self._tls["grpc_aio"] = ServerCertificates(tls, "grpc_aio listener")
        return server.add_secure_port(address, self._tls["grpc_aio"].grpc_credentials())

    def _ssl_context(
        self, listener: str, tls: ServerTLS | None, alpn: tuple[str, ...] = ()
    ) -> ssl.SSLContext | None:
        if tls is None:
            return None
        self._tls[listener] = ServerCertificates(tls, f"{listener} listener", alpn)
        return self._tls[listener].ssl_context()

    def _update_tls(self, config: Config) -> None:
        """A reload may point the listeners at other files (rotated ones are seen anyway);
        turning TLS on or off needs a restart."""
        blocks = {
            "grpc": config.tls,
            "grpc_aio": config.tls,
            "http": config.tls,
            "admin": config.admin_tls,
        }
        for listener, certificates in self._tls.items():
            block = blocks[listener]
            if block is None:
                log.warning("%s listener: TLS stays on until a restart", listener)
                continue
            try:
                certificates.update(block)
            except OSError as exc:
                log.error("%s (the old files serve on)", exc)

    async def _watch_pipelines(self) -> None:
        """Each pipeline's readiness (its broker reachable) as gRPC health service
        `pipeline/<name>`, checked twice a second; a removed pipeline is NOT_SERVING."""
        shown: dict[str, bool] = {}
        while True:
            now = {name: runner.ready for name, runner in self.pipelines.running.items()}
            for name in shown.keys() - now.keys():
                now[name] = False
            for name, ready in now.items():
                if shown.get(name) != ready:
                    await self.health.set(f"pipeline/{name}", SERVING if ready else NOT_SERVING)
            shown = {n: r for n, r in now.items() if n in self.pipelines.running}
            await asyncio.sleep(0.5)

    def _set_health(self, model: str, ready: bool) -> None:
        task = asyncio.get_running_loop().create_task(
            self.health.set(model, SERVING if ready else NOT_SERVING)
        )
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_period_s if grace is None else grace
        log.info("stopping: in-flight requests have %.1f s to finish", grace)
        await self.health.enter_graceful_shutdown()
        stopping = [self._grpc.stop(grace)] if self._grpc is not None else []
        if self._http is not None:  # closes its listener, lets handlers finish (grace)
            stopping.append(self._http.cleanup())
        if self._native is not None:
            stopping.append(self._native.stop(grace))
        # Pipelines stop consuming, finish and commit their cycle, and leave their groups.
        stopping.append(self.pipelines.stop(grace))
        await asyncio.gather(*stopping)
        for task in (self._publisher, self._watcher):
            if task is not None:
                task.cancel()
        await self.router.close()
        self.shared_memory.close()
        if self._admin is not None:
            await self._admin.cleanup()
        log.info("stopped")

    async def reload(self) -> list[str]:
        """Re-read the config; a bad one is refused (ReloadError) and the old one serves on."""
        try:
            if self._source is None:
                raise ReloadError(["(config): this server was not started from a config file"])
            try:
                config = self._source()
            except ConfigError as exc:
                raise ReloadError(exc.problems) from exc
            missing = missing_clients(config.pipelines)
            if missing:
                raise ReloadError(missing)
            if self._frozen:  # what the old config held may become cyclic garbage now
                gc.unfreeze()
            try:
                changes = await self.router.reload(config, self.config.grace_period_s)
                changes += await self.pipelines.update(config.pipelines, config.grace_period_s)
            finally:
                if self._frozen:
                    freeze_heap()
        except ReloadError as exc:
            self.router.metrics.reloads["error"] = self.router.metrics.reloads.get("error", 0) + 1
            log.error("reload refused, the old config keeps serving: %s", exc)
            raise
        self.config = config
        self._update_tls(config)
        self.router.metrics.reloads["ok"] = self.router.metrics.reloads.get("ok", 0) + 1
        return changes

    def _reload_in_background(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in reload()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        await self.start()
        freeze_heap()
        self._frozen = True
        await stop.wait()
        await self.stop()
