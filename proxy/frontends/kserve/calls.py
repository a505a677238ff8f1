"""One ModelInferRequest routed, admitted and decoded: what the unary method and the
stream both start from."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import grpc
from coalesce.codecs.kserve import (
    Classes,
    Layout,
    Named,
    Placement,
    classify,
    decode,
    encode,
    output_placements,
    requested_classes,
    requested_outputs,
)
from coalesce.core import access
from coalesce.core.request import InferRequest, Tensors
from coalesce.core.router import Backend, Router
from coalesce.errors import InvalidArgument
from coalesce.telemetry.tracing import carrier_of

from .shared_memory import SharedMemory


class Call(NamedTuple):
    """A decoded, routed request and what its answer must carry."""

    backend: Backend
    request: InferRequest
    names: list[str]  # requested outputs; empty for all
    version: str
    placed: dict[str, Placement] | None  # outputs that go into shared memory
    shared: SharedMemory | None
    classes: Classes | None  # outputs asked for as classifications

    def answer(self, message, outputs: Tensors) -> bytes:
        """The serialized ModelInferResponse to `message`."""
        if self.classes:
            outputs = dict(outputs)
            for name, (count, labels) in self.classes.items():
                if name in outputs:
                    outputs[name] = classify(outputs[name], count, name, labels)
        if not self.placed:
            return encode(message, self.version, outputs, self.names)
        write = self.shared.write  # type: ignore[union-attr]
        return encode(message, self.version, outputs, self.names, self.placed, write)


def _admitted(router: Router, model: str, version: str, context) -> tuple:
    """The request metadata forwarded to (model, version)'s backend, once the caller is
    admitted to its route."""
    if version or model not in router.plain:
        route = access.route_of(router, model, version)
        return access.admit(router, route, access.GrpcCaller(context), access.request_bytes())
    return ()


def _deadline(context, now: Callable[[], float]) -> float | None:
    left = context.time_remaining()
    return None if left is None else now() + left


def _carried(request: InferRequest, router: Router, context, metadata: tuple) -> InferRequest:
    request.metadata = metadata
    if router.tracer is not None:
        request.trace = carrier_of(context.invocation_metadata() or ())
    return request


def prepare_value(
    router: Router,
    value: bytes,
    context: grpc.aio.ServicerContext,
    now: Callable[[], float],
    layouts: dict[str, Layout],
) -> tuple[Call, Named] | None:
    """A serialized ModelInferRequest of a model's Known layout, routed, admitted and
    decoded off its bytes without parsing it (Known.take_value), or None: parse it and
    prepare() then. Also what its answer's encode() reads of it."""
    for layout in layouts.values():  # routed model names only: a few
        known = layout.known
        if known is None or not value.startswith(known.head):
            continue
        model, version = known.skeleton.model_name, known.skeleton.model_version
        backend = router.get(model, version)
        info = backend.info()
        decoded = layout.decode_value(value, info, _deadline(context, now))
        if decoded is None:  # parsed then, and admitted once, by prepare()
            return None
        request, names, classes, named = decoded
        metadata = _admitted(router, model, version, context)
        request = _carried(request, router, context, metadata)
        call = Call(backend, request, names, version or info.versions[0], None, None, classes)
        return call, named
    return None


def prepare(
    router: Router,
    request,
    context: grpc.aio.ServicerContext,
    now: Callable[[], float],
    shared: SharedMemory | None = None,
    layouts: dict[str, Layout] | None = None,
) -> Call:
    """Route and decode one ModelInferRequest (raising a CoalesceError if it is bad).

    `layouts` (model name -> its last request's Layout) lets a request shaped as the
    last one skip the checks that one passed."""
    backend = router.get(request.model_name, request.model_version)
    metadata = _admitted(router, request.model_name, request.model_version, context)
    info = backend.info()
    deadline = _deadline(context, now)
    version = request.model_version or info.versions[0]
    layout = None if layouts is None else layouts.get(request.model_name)
    known = None if layout is None else layout.decode(request, info, deadline)
    placed = None
    if known is not None:
        decoded, names, classes = known
    else:
        names = requested_outputs(request, info) if request.outputs else []
        decoded = decode(request, deadline, shared.read if shared is not None else None)
        classes = None
        if request.outputs:
            placed, classes = output_placements(request), requested_classes(request, info)
            if placed and shared is None:
                raise InvalidArgument("outputs: shared memory is not served here")
        if layouts is not None:
            if layout is None:
                layout = layouts[request.model_name] = Layout()
            layout.learn(request, decoded, info, names, classes)
    return Call(
        backend,
        _carried(decoded, router, context, metadata),
        names,
        version,
        placed,
        shared,
        classes,
    )
