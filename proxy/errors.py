"""The errors Coalesce answers with, and their gRPC and HTTP statuses.

    CoalesceError            any failure a caller is told about
    ├── InvalidArgument      the request is malformed or does not fit the model
    ├── NotFound             no route for the model (or version) asked for
    ├── ResourceExhausted    a queue or size limit is full; retry later
    │   └── TooLarge         a request over a size limit (HTTP 413, not 429)
    ├── Unauthenticated      missing or wrong credentials (token, client certificate)
    ├── PermissionDenied     known caller, not allowed here (client identity, admin peer)
    ├── DeadlineExceeded     the caller's deadline passed before an answer
    ├── Unavailable          the backend cannot be reached or is not ready
    ├── Internal             a bug or a broken model (wrong output shape, ...)
    └── BackendError         the backend answered with an error: its status is kept

Library exceptions are translated into these at the adapter boundary, so the
core and the front ends only ever see this hierarchy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger("coalesce")


class CoalesceError(Exception):
    """Base error; `code` is the gRPC status the caller receives."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http: int | None = None
    """An HTTP status where the code's usual one (HTTP_STATUS) would mislead."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(CoalesceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CoalesceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(CoalesceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooLarge(ResourceExhausted):
    """Over a size limit: retrying the same request cannot help, so HTTP says 413."""

    http = 413


class Unauthenticated(CoalesceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CoalesceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(CoalesceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(CoalesceError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(CoalesceError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(CoalesceError):
    """A call Coalesce does not serve; the message says what to do instead."""

    code = grpc.StatusCode.UNIMPLEMENTED


class BackendError(CoalesceError):
    """An error the backend itself reported; the caller sees the backend's status."""


HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.CANCELLED: 499,
    # google.rpc's mapping, for statuses a backend may answer with:
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
}


def http_status(error: CoalesceError) -> int:
    """The HTTP status for an error (500 for anything without a closer match)."""
    return error.http or HTTP_STATUS.get(error.code, 500)


def from_backend(backend: str, code: grpc.StatusCode, details: str) -> CoalesceError:
    """A backend's gRPC error for its callers: the backend's own status is kept."""
    message = f"backend '{backend}': {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(message)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    return BackendError(message, code)


R = TypeVar("R")


def grpc_status(
    handler: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Answer a gRPC call that raised with its status and message; a bug becomes INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            if isinstance(request, CoalesceError):  # bytes that were no message (wire.parser)
                raise request
            return await handler(self, request, context)
        except Exception as exc:
            await abort(context, exc, handler.__name__)
        raise AssertionError("unreachable: abort() raises")

    return wrapper


async def abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    """End a call with the error's status (raises); anything but a CoalesceError is a bug."""
    await context.abort(*status_of(exc, method))


def status_of(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a call that raised `exc` ends with; anything but a CoalesceError
    is a bug, logged."""
    if isinstance(exc, CoalesceError):
        return exc.code, exc.message
    log.error("bug answering %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
