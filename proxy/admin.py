"""The admin HTTP endpoint (aiohttp): probes, Prometheus metrics, the live dashboard.

/healthz and /readyz for probes; /metrics in Prometheus text format; / is a
self-contained dashboard page that polls /api/stats (per-second series per
backend) and shows /api/config (the effective config).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import metrics, stats
from .metrics import SnapshotFolder
from .router import Router

DASHBOARD = resources.files(__package__).joinpath("dashboard.html")


class _Collector:
    def __init__(self, merged: dict) -> None:
        self.merged = merged

    def collect(self):
        return metrics.families(self.merged)


def make_app(router: Router, folder: SnapshotFolder | None = None) -> web.Application:
    recorder = stats.Recorder(router, folder)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readyz(request: web.Request) -> web.Response:
        backends = {name: b.ready for name, b in router.backends.items()}
        ready = bool(backends) and all(backends.values())
        return web.json_response(
            {"ready": ready, "backends": backends}, status=200 if ready else 503
        )

    async def prometheus(request: web.Request) -> web.Response:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(stats.current(router, folder)))
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def series(request: web.Request) -> web.Response:
        return web.json_response({name: list(points) for name, points in recorder.series.items()})

    async def config(request: web.Request) -> web.Response:
        return web.json_response(router.config.model_dump(mode="json"))

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text=DASHBOARD.read_text(), content_type="text/html")

    async def on_startup(app: web.Application) -> None:
        recorder.start()

    async def on_cleanup(app: web.Application) -> None:
        await recorder.stop()

    app = web.Application()
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", prometheus),
            web.get("/api/stats", series),
            web.get("/api/config", config),
            web.get("/", dashboard),
        ]
    )
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def start(
    router: Router, address: str, folder: SnapshotFolder | None = None
) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(make_app(router, folder), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port)).start()
    return runner
