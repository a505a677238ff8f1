"""The admin HTTP endpoint (aiohttp): probes, Prometheus metrics, the live dashboard.

/healthz and /readyz for probes; /metrics in Prometheus text format; / is a
self-contained dashboard page that polls /api/stats (per-second series per
backend) and shows /api/config (the effective config).
"""

from __future__ import annotations

import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from coalesce.core import access
from coalesce.core.router import ReloadError, Router
from coalesce.frontends.rest import errors_as_json
from coalesce.telemetry import metrics
from coalesce.telemetry.metrics import SnapshotFolder
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import stats

DASHBOARD = resources.files(__package__).joinpath("dashboard.html")


class _Collector:
    def __init__(self, merged: dict, pipelines: dict[str, dict]) -> None:
        self.merged = merged
        self.pipelines = pipelines

    def collect(self):
        yield from metrics.families(self.merged)
        yield from metrics.pipeline_families(self.pipelines)


def make_app(
    router: Router,
    folder: SnapshotFolder | None = None,
    reload: Callable[[], Awaitable[list[str]]] | None = None,
    pipelines: Callable[[], dict[str, dict]] = dict,
) -> web.Application:
    """`pipelines` gives each broker pipeline's status (coalesce.pipelines), for /readyz."""
    recorder = stats.Recorder(router, folder)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readyz(request: web.Request) -> web.Response:
        backends = {name: b.ready for name, b in router.backends.items()}
        ready = bool(backends) and all(backends.values())
        body: dict = {"ready": ready, "backends": backends}
        status = {n: b.status for n, b in router.backends.items() if b.status is not None}
        if status:  # e.g. a python backend building its environment, and which step
            body["status"] = status
        flows = stats.pipelines(pipelines(), folder)
        if flows:  # a pipeline whose broker is unreachable makes the instance not ready
            body["pipelines"] = flows
            ready = body["ready"] = ready and all(p["ready"] for p in flows.values())
        return web.json_response(body, status=200 if ready else 503)

    async def prometheus(request: web.Request) -> web.Response:
        registry = CollectorRegistry(auto_describe=False)
        flows = stats.pipelines(pipelines(), folder)
        registry.register(_Collector(stats.current(router, folder), flows))
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def series(request: web.Request) -> web.Response:
        return web.json_response({name: list(points) for name, points in recorder.series.items()})

    async def config(request: web.Request) -> web.Response:
        return web.json_response(router.config.model_dump(mode="json"))

    async def reload_config(request: web.Request) -> web.Response:
        """POST /reload: re-read the config (all workers, when there are several)."""
        access.require_admin(request)
        if reload is None:
            return web.json_response({"error": "reload is not available"}, status=501)
        if folder is not None:  # workers: validate here, then the supervisor tells every worker
            try:
                await reload()
            except ReloadError as exc:
                return web.json_response(
                    {"error": "; ".join(exc.problems), "problems": exc.problems}, status=400
                )
            os.kill(os.getppid(), signal.SIGHUP)
            return web.json_response({"reloaded": True, "workers": "all, via the supervisor"})
        try:
            changes = await reload()
        except ReloadError as exc:
            return web.json_response(
                {"error": "; ".join(exc.problems), "problems": exc.problems}, status=400
            )
        return web.json_response({"reloaded": True, "changes": changes})

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text=DASHBOARD.read_text(), content_type="text/html")

    async def on_startup(app: web.Application) -> None:
        recorder.start()

    async def on_cleanup(app: web.Application) -> None:
        await recorder.stop()

    # a mutating handler calls access.require_admin(request) first: 401/403 as JSON
    app = web.Application(middlewares=[errors_as_json])
    app[access.ADMIN_TOKEN] = lambda: router.config.admin_token
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", prometheus),
            web.get("/api/stats", series),
            web.get("/api/config", config),
            web.get("/", dashboard),
            web.post("/reload", reload_config),
        ]
    )
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def start(
    router: Router,
    address: str,
    folder: SnapshotFolder | None = None,
    reload: Callable[[], Awaitable[list[str]]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    pipelines: Callable[[], dict[str, dict]] = dict,
) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(make_app(router, folder, reload, pipelines), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port), ssl_context=ssl_context).start()
    return runner
