"""The HTTP/JSON front ends on one aiohttp server: KServe v2 REST (/v2) and TF
Serving REST (/v1).

Like the gRPC front end they only translate: each decodes its JSON into an
InferRequest and awaits the same Backend.infer, so HTTP callers share batches with
gRPC ones. Every failure becomes {"error": "..."} with errors.http_status, which is
the error body of both protocols; unknown paths and oversized bodies too.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from coalesce.codecs.json_tensors import dumps
from coalesce.core.router import Router
from coalesce.errors import CoalesceError, http_status
from coalesce.frontends.kserve.rest import KServeREST
from coalesce.frontends.kserve.shared_memory import SharedMemory
from coalesce.frontends.tfserving.rest import TFServingREST

log = logging.getLogger("coalesce")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=dumps({"error": message}), content_type="application/json"
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CoalesceError -> its status; aiohttp's own 404/405/413 -> JSON; a bug -> 500."""
    try:
        return await handler(request)
    except CoalesceError as exc:
        return _error(http_status(exc), exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text if exc.status == 413 else f"{request.method} {request.path}"
        return _error(exc.status, f"{exc.reason}: {detail}")
    except Exception as exc:
        log.exception("bug answering %s %s", request.method, request.path)
        return _error(500, f"{type(exc).__name__}: {exc}")


def make_app(
    router: Router, max_body_bytes: int, shared: SharedMemory | None = None
) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=max_body_bytes)
    app.add_routes(KServeREST(router, shared).routes())
    app.add_routes(TFServingREST(router).routes())
    return app


async def start(
    router: Router,
    address: str,
    *,
    shared: SharedMemory | None = None,
    max_body_bytes: int,
    grace: float,
    reuse_port: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve on `address` ("host:0" picks a free port); returns the runner and the port.

    `runner.cleanup()` closes the listener, then gives running handlers `grace` s."""
    host, _, port = address.rpartition(":")
    app = make_app(router, max_body_bytes, shared)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    site = web.TCPSite(
        runner, host, int(port), reuse_port=reuse_port or None, ssl_context=ssl_context
    )
    await site.start()
    return runner, runner.addresses[0][1]
