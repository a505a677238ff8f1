"""The admin HTTP endpoint (aiohttp): liveness and readiness for probes."""

from __future__ import annotations

from aiohttp import web

from .router import Router


def make_app(router: Router) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readyz(request: web.Request) -> web.Response:
        backends = {name: b.ready for name, b in router.backends.items()}
        ready = bool(backends) and all(backends.values())
        return web.json_response(
            {"ready": ready, "backends": backends}, status=200 if ready else 503
        )

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz)])
    return app


async def start(router: Router, address: str) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(make_app(router), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port)).start()
    return runner
