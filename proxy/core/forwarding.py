"""Which request metadata reaches a backend: an explicit allow-list per backend.

A sidecar must not open a door the pod did not have, so nothing a caller sends is
passed on unless the backend's `forward_metadata` names it. The front ends pick the
allowed values into `InferRequest.metadata`; the batcher hands a batch's metadata
to the adapter call through a context variable, so the Adapter protocol stays
`infer(inputs, timeout)` and adapters that cannot send metadata need no change.

A batch is one backend call for many callers, so callers whose forwarded values
differ (say two `authorization` tokens) never share a batch: the values are part of
the batching key. Trace context is the exception: splitting batches per trace would
end batching, so a batch carries its first request's `traceparent`/`tracestate`
(a tracing layer that wants every caller's span must link them itself).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

Metadata = tuple[tuple[str, str], ...]
"""(lower-case name, value) pairs, in allow-list order."""

TRACE_CONTEXT = frozenset({"traceparent", "tracestate"})
"""Forwarded from a batch's first request only; they never split a batch."""

_OUTGOING: ContextVar[Metadata] = ContextVar("coalesce_outgoing_metadata", default=())

Parameters = tuple[tuple[str, str, object], ...]
"""KServe request parameters: (name, InferParameter kind such as "int64_param", value)."""
_PARAMETERS: ContextVar[Parameters] = ContextVar("coalesce_parameters", default=())
SEQUENCE = frozenset({"sequence_id", "sequence_start", "sequence_end"})
"""Parameters of a stateful model's request: it must go alone, and in order."""


def pick(allowed: tuple[str, ...], lookup: Callable[[str], str | None]) -> Metadata:
    """The allowed names the caller sent, with their values (`lookup` is per transport)."""
    found = []
    for name in allowed:
        value = lookup(name)
        if value is not None:
            found.append((name, value))
    return tuple(found)


def batch_key(metadata: Metadata) -> tuple:
    """What must be equal for two requests to share a batch (empty: no constraint)."""
    split = tuple(pair for pair in metadata if pair[0] not in TRACE_CONTEXT)
    return (("forwarded metadata", split),) if split else ()


def sending(metadata: Metadata) -> Token[Metadata]:
    """Make `metadata` what adapter calls in this context send; returns the token to reset."""
    return _OUTGOING.set(metadata)


def done(token: Token[Metadata]) -> None:
    _OUTGOING.reset(token)


def outgoing() -> Metadata | None:
    """The metadata to send with the backend call being made now (None: nothing)."""
    return _OUTGOING.get() or None


def parameter_key(parameters: Parameters, sequence_token: object) -> tuple:
    """The batching key part of a request's parameters: a batch carries one set, so only
    requests that agree share one; a sequence request shares with none (`sequence_token`
    is unique to it)."""
    key: tuple = (("parameters", parameters),)
    if any(name in SEQUENCE for name, _, _ in parameters):
        key += (("sequence request", sequence_token),)
    return key


def sending_parameters(parameters: Parameters) -> Token[Parameters]:
    return _PARAMETERS.set(parameters)


def done_parameters(token: Token[Parameters]) -> None:
    _PARAMETERS.reset(token)


def parameters() -> Parameters:
    """The request parameters the backend call being made now carries (empty: none)."""
    return _PARAMETERS.get()
