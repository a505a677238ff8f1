"""gRPC unary calls over coalesce.http2.server: the `fast_listen` front end.

It serves the very handlers the grpc.aio listener serves (KServe, TF Serving, health),
looked up through the same generic handlers, with a context that offers what they
use: time_remaining, invocation_metadata, abort, auth_context, peer. Streaming methods
answer UNIMPLEMENTED: they stay on `listen`. No TLS: config refuses fast_listen with tls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import grpc

from .endpoint import Stream
from .hpack import literal
from .limits import Limits
from .server import Listener, ServerConnection

log = logging.getLogger("coalesce")

# Our header blocks, from HPACK's static table and literals without indexing (no
# dynamic table: nothing to keep in step with the peer's decoder).
STATUS_200 = b"\x88"  # static entry 8
GRPC_CONTENT_TYPE = b"\x0f\x10\x10application/grpc"  # static name 31, literal value
RESPONSE_HEADERS = STATUS_200 + GRPC_CONTENT_TYPE
OK_TRAILERS = b"\x00\x0bgrpc-status\x010"
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
HIDDEN = frozenset(("te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"))


def _percent(message: str) -> bytes:
    """grpc-message's percent-encoding: printable ASCII but '%' as is, the rest %XX."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in message.encode()
    )


def status_trailers(code: grpc.StatusCode, message: str) -> bytes:
    block = literal(b"grpc-status", str(code.value[0]).encode())
    if message:
        block += literal(b"grpc-message", _percent(message))
    return block


class Abort(Exception):
    """context.abort(): the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    """What our handlers use of grpc.aio.ServicerContext."""

    __slots__ = ("_deadline", "_metadata", "_peer", "_time")

    def __init__(self, deadline: float | None, metadata: tuple, peer: str, time) -> None:
        self._deadline, self._metadata, self._peer, self._time = deadline, metadata, peer, time

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - self._time(), 0.0)

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def auth_context(self) -> dict:
        return {}  # no TLS on this listener: no peer identity

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Abort(code, details)


class _Details(NamedTuple):  # grpc.HandlerCallDetails, for generic handlers' service()
    method: str
    invocation_metadata: tuple


class GrpcApp:
    """Turns complete HTTP/2 requests into calls of our unary gRPC handlers."""

    def __init__(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._handlers = list(handlers)
        self._methods: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task] = set()

    def _method(self, path: str) -> Any:
        try:
            return self._methods[path]
        except KeyError:
            pass
        found = None
        for handler in self._handlers:
            found = handler.service(_Details(path, ()))
            if found is not None:
                break
        if len(self._methods) < 1024:  # unknown paths are cached too, within reason
            self._methods[path] = found
        return found

    def request(self, connection: ServerConnection, stream: Stream) -> None:
        path = method = content_type = timeout = encoding = ""
        metadata = []
        for name, value in stream.headers:
            if name[0] == ":":
                if name == ":path":
                    path = value
                elif name == ":method":
                    method = value
            elif name == "content-type":
                content_type = value
            elif name == "grpc-timeout":
                timeout = value
            elif name == "grpc-encoding":
                encoding = value
            elif name not in HIDDEN:
                if name.endswith("-bin"):
                    try:
                        value = base64.b64decode(value + "==")  # type: ignore[assignment]
                    except binascii.Error:
                        self._trailers_only(
                            connection,
                            stream,
                            grpc.StatusCode.INTERNAL,
                            f"metadata {name} is not base64",
                        )
                        return
                metadata.append((name, value))
        if method != "POST":
            _plain(connection, stream, b"405", b"a gRPC server: calls are POST requests\n")
            return
        if not content_type.startswith("application/grpc"):
            _plain(connection, stream, b"415", b"a gRPC server: content-type application/grpc\n")
            return
        handler = self._method(path)
        error = None
        if handler is None:
            error = (grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}")
        elif handler.request_streaming or handler.response_streaming:
            error = (
                grpc.StatusCode.UNIMPLEMENTED,
                f"{path} streams: it is served on the `listen` port, not `fast_listen`",
            )
        elif stream.too_big:
            error = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request message larger than max ({connection.max_body - 5} bytes)",
            )
        deadline = None
        if timeout and error is None:
            try:
                deadline = self._loop.time() + int(timeout[:-1]) * TIMEOUT_UNITS[timeout[-1]]
            except (KeyError, ValueError):
                error = (grpc.StatusCode.INTERNAL, f"malformed grpc-timeout '{timeout}'")
        body = stream.body
        if error is None:
            if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
                error = (grpc.StatusCode.INTERNAL, "the request is not one gRPC message")
            elif body[0]:
                error = (
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"compressed messages ({encoding or 'no grpc-encoding'}) are not "
                    "supported on fast_listen",
                )
        if error is not None:
            self._trailers_only(connection, stream, *error)
            return
        context = Context(deadline, tuple(metadata), connection.peer, self._loop.time)
        task = self._loop.create_task(
            self._call(connection, stream, handler, bytes(body[5:]), context)
        )
        stream.task = task
        stream.body = bytearray()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if deadline is not None:
            timer = self._loop.call_at(deadline, self._expire, connection, stream)
            task.add_done_callback(lambda _: timer.cancel())

    async def _call(self, connection, stream, handler, message: bytes, context: Context) -> None:
        try:
            deserialize = handler.request_deserializer
            request = deserialize(message) if deserialize else message
            response = await handler.unary_unary(request, context)
            serialize = handler.response_serializer
            data = serialize(response) if serialize else response
        except Abort as abort:
            self._trailers_only(connection, stream, abort.code, abort.details)
            return
        except asyncio.CancelledError:
            return  # reset by the peer, its deadline passed (_expire answered), or shutdown
        except Exception as exc:
            log.error("bug answering %s", handler, exc_info=exc)
            self._trailers_only(
                connection, stream, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
            )
            return
        framed = b"\x00" + len(data).to_bytes(4, "big") + data
        connection.answer(stream, RESPONSE_HEADERS, framed, OK_TRAILERS)

    def _expire(self, connection: ServerConnection, stream: Stream) -> None:
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
            self._trailers_only(
                connection, stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
            )

    @staticmethod
    def _trailers_only(connection, stream, code: grpc.StatusCode, message: str) -> None:
        connection.answer_headers_only(stream, RESPONSE_HEADERS + status_trailers(code, message))


def _plain(connection: ServerConnection, stream: Stream, status: bytes, text: bytes) -> None:
    """An HTTP answer with a body for what is no gRPC call (a browser, curl, a prober)."""
    headers = literal(b":status", status) + literal(b"content-type", b"text/plain")
    connection.answer(stream, headers, text, None)


class NativeServer:
    """The fast_listen listener: a Listener of our HTTP/2 serving the gRPC handlers."""

    def __init__(
        self,
        handlers: Iterable[grpc.GenericRpcHandler],
        max_message: int,
        limits: Limits | None = None,
    ) -> None:
        self.app = GrpcApp(handlers)
        self.listener = Listener(self.app, max_message + 5, limits or Limits())
        self.port = 0

    @property
    def connections(self) -> set[ServerConnection]:
        return self.listener.connections

    async def start(self, address: str, reuse_port: bool = False) -> int:
        self.port = await self.listener.start(address, reuse_port)
        return self.port

    async def stop(self, grace: float) -> None:
        """GOAWAY to every connection; what is in flight has `grace` seconds to finish."""
        await self.listener.stop(grace)
        for task in list(self.app.tasks):
            task.cancel()
        self.listener.abort()
