"""One ModelInferRequest routed, admitted and decoded: what the unary method and the
stream both start from."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import grpc
from coalesce.codecs.kserve import decode, requested_outputs
from coalesce.core import access
from coalesce.core.request import InferRequest
from coalesce.core.router import Backend, Router
from coalesce.telemetry.tracing import carrier_of


class Call(NamedTuple):
    """A decoded, routed request and what its answer must carry."""

    backend: Backend
    request: InferRequest
    names: list[str]  # requested outputs; empty for all
    version: str


def prepare(
    router: Router, request, context: grpc.aio.ServicerContext, now: Callable[[], float]
) -> Call:
    """Route and decode one ModelInferRequest (raising a CoalesceError if it is bad)."""
    backend = router.get(request.model_name, request.model_version)
    metadata: tuple = ()
    if request.model_version or request.model_name not in router.plain:
        route = access.route_of(router, request.model_name, request.model_version)
        caller = access.GrpcCaller(context)
        metadata = access.admit(router, route, caller, access.request_bytes())
    info = backend.info()
    names = requested_outputs(request, info) if request.outputs else []
    left = context.time_remaining()
    deadline = None if left is None else now() + left
    version = request.model_version or info.versions[0]
    decoded = decode(request, deadline)
    decoded.metadata = metadata
    if router.tracer is not None:
        decoded.trace = carrier_of(context.invocation_metadata() or ())
    return Call(backend, decoded, names, version)
