"""The client side of coalesce.http2.endpoint: gRPC unary calls to one backend address.

The transport of backends with one address (see config `transport`): one HTTP/2
connection, cleartext or TLS, opened on first use and again after it is lost,
multiplexing every call. It trades gRPC core's resolver, balancing and outlier
ejection for a call path with no thread hop: ~0.3 ms less per call at light load
here. Retries are the caller's (coalesce.adapters.channels).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse

import grpc

from .endpoint import CANCEL, REFUSED_STREAM, Endpoint, Stream
from .hpack import literal

# After the pseudo-headers (RFC 9113 8.3: they come first): content-type (static name 31), te
_GRPC = b"\x0f\x10\x10application/grpc" + literal(b"te", b"trailers")
_HTTP_CODES = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_MAX_STREAM_ID = (1 << 31) - 1


class CallError(Exception):
    """A call that did not end OK: its gRPC status and message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def _timeout(seconds: float) -> bytes:
    """grpc-timeout: at most 8 digits and a unit."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0)):
        value = int(max(seconds, 0) * scale)
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999S"


class ClientConnection(Endpoint):
    corks = False  # a batch's call goes out at once: the callers wait on it

    def __init__(self, authority: str, secure: bool = False) -> None:
        super().__init__()
        # :method POST (static 3), :scheme http (static 6) or https (static 7)
        start = b"\x83\x87" if secure else b"\x83\x86"
        self._fixed = start + literal(b":authority", authority.encode())
        self._next = 1
        self._loop = asyncio.get_running_loop()

    def call(
        self, path: bytes, message: bytes, timeout: float | None, metadata
    ) -> asyncio.Future[bytes]:
        stream_id, self._next = self._next, self._next + 2
        if self._next > _MAX_STREAM_ID:
            self.draining = True  # the next call opens a new connection
        stream = Stream(stream_id, self.peer_window, self.limits.stream_window)
        stream.call = future = self._loop.create_future()
        self.streams[stream_id] = stream
        headers = self._fixed + literal(b":path", path) + _GRPC
        if timeout is not None:
            headers += literal(b"grpc-timeout", _timeout(timeout))
        for key, value in metadata or ():
            headers += literal(key.encode(), value if isinstance(value, bytes) else value.encode())
        self.send(stream, headers, b"\x00" + len(message).to_bytes(4, "big") + message, None)
        if timeout is not None:
            timer = self._loop.call_later(timeout, self._expire, stream)
            future.add_done_callback(lambda _: timer.cancel())
        future.add_done_callback(lambda f: f.cancelled() and self._abandon(stream))
        return future

    def _expire(self, stream: Stream) -> None:
        self._fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.reset(stream.id, CANCEL)

    def _abandon(self, stream: Stream) -> None:  # the caller gave up (cancelled)
        if self.streams.pop(stream.id, None) is not None:
            self.reset(stream.id, CANCEL)

    def is_idle(self, stream_id: int) -> bool:
        return stream_id >= self._next or not stream_id % 2

    def on_headers(
        self, stream_id: int, fields: list[tuple[str, str]], end: bool, problem: str | None
    ) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # expired or abandoned meanwhile
        if stream.headers is None:
            stream.headers = fields
            status = dict(fields).get(":status", "")
            if status != "200":
                code = _HTTP_CODES.get(int(status) if status.isdigit() else 0)
                self._fail(stream, code or grpc.StatusCode.UNKNOWN, f"HTTP status {status}")
                return
        if end:  # trailers, or a trailers-only answer
            self._finish(stream, dict(fields))

    def on_data(self, stream: Stream, end: bool) -> None:
        self.release(stream)  # the backend's answer is ours to keep: credit it at once
        if end:
            self._fail(stream, grpc.StatusCode.INTERNAL, "the answer ended without a status")

    def _finish(self, stream: Stream, trailers: dict[str, str]) -> None:
        status = trailers.get("grpc-status")
        if status is None:
            self._fail(stream, grpc.StatusCode.INTERNAL, "the answer carries no grpc-status")
            return
        if status != "0":
            try:
                code = _CODES[int(status)]
            except (ValueError, KeyError):
                code = grpc.StatusCode.UNKNOWN
            message = urllib.parse.unquote(trailers.get("grpc-message", ""))
            self._fail(stream, code, message)
            return
        body = stream.body
        if len(body) < 5 or body[0] or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._fail(stream, grpc.StatusCode.INTERNAL, "the answer is not one gRPC message")
            return
        self.streams.pop(stream.id, None)
        if not stream.call.done():
            stream.call.set_result(bytes(body[5:]))

    def _fail(self, stream: Stream, code: grpc.StatusCode, message: str) -> None:
        self.streams.pop(stream.id, None)
        if not stream.call.done():
            stream.call.set_exception(CallError(code, message))

    def on_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            status = (
                grpc.StatusCode.UNAVAILABLE
                if code == REFUSED_STREAM
                else (grpc.StatusCode.CANCELLED if code == CANCEL else grpc.StatusCode.INTERNAL)
            )
            self._fail(stream, status, f"the backend reset the stream (HTTP/2 error {code})")

    def on_goaway(self, last_stream: int, code: int) -> None:
        for stream in [s for s in self.streams.values() if s.id > last_stream]:
            self._fail(stream, grpc.StatusCode.UNAVAILABLE, "the backend is going away")

    def on_lost(self) -> None:
        self.draining = True
        for stream in list(self.streams.values()):
            self._fail(stream, grpc.StatusCode.UNAVAILABLE, "the backend connection was lost")


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class NativeChannel:
    """Unary calls to host:port over one ClientConnection, reconnecting when it is gone.

    With `context` the connection is TLS, ALPN h2, the certificate checked against
    `server_name` (default the host)."""

    def __init__(
        self, address: str, context: ssl.SSLContext | None = None, server_name: str | None = None
    ) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self._host, self._port = host.strip("[]"), int(port)
        self._context = context
        if context is not None:
            context.set_alpn_protocols(["h2"])
        self._server_name = (server_name or self._host) if context is not None else None
        self._connection: ClientConnection | None = None
        self._connecting: asyncio.Task | None = None

    async def unary(
        self, path: bytes, message: bytes, timeout: float | None = None, metadata=None
    ) -> bytes:
        connection = self._connection
        if connection is None or connection.draining or connection.closed.done():
            connection = await self._connect()
        return await connection.call(path, message, timeout, metadata)

    async def _connect(self) -> ClientConnection:
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(lambda _: setattr(self, "_connecting", None))
        return await asyncio.shield(self._connecting)

    async def _open(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            transport, connection = await loop.create_connection(
                lambda: ClientConnection(self.address, self._context is not None),
                self._host,
                self._port,
                ssl=self._context,
                server_hostname=self._server_name,
            )
        except ssl.SSLError as exc:  # a handshake or certificate problem: name it
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"TLS with {self.address} failed: {exc.reason or exc}",
            ) from None
        except OSError as exc:
            raise CallError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot connect to {self.address}: {exc.strerror or exc}",
            ) from None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() not in ("h2", None):
            transport.close()
            raise CallError(
                grpc.StatusCode.UNAVAILABLE, f"{self.address} does not speak HTTP/2 (ALPN)"
            )
        self._connection = connection
        return connection

    async def close(self) -> None:
        if self._connection is not None and self._connection.transport is not None:
            self._connection.close(0, "closing")
            self._connection = None
