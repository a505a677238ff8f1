"""The server side of coalesce.http2.endpoint: requests in, answers out.

A complete request (headers, body, END_STREAM) goes to `app.request(connection,
stream)`; `answer(...)` or `answer_headers_only(...)` sends its response. A request
is checked against RFC 9113 8.1-8.3 first: a malformed one is reset, never seen by the
app. `Listener` accepts connections within the limits and runs their timeouts. gRPC's
rules live in coalesce.http2.grpc_server.
"""

from __future__ import annotations

import asyncio
import ctypes
import re
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from .endpoint import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    INTERNAL_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    SETTINGS_TIMEOUT,
    STREAM_CLOSED,
    Backlog,
    Endpoint,
    ProtocolError,
    Stream,
    frame,
)
from .limits import LEAST, LEAST_DEFAULT, Limits, Penalties, ReceivePool

HELD_BYTES = 1 << 20  # a held connection's input kept for when it is let in; more: closed
HAS_LENGTH = "content-length"  # check_fields' answer for a valid list with a content-length
_CONNECTION_SPECIFIC = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade")
)
_REQUEST_PSEUDO = frozenset((":method", ":scheme", ":authority", ":path"))
_BAD_NAME = re.compile(r"[^!#$%&'*+\-.^_`|~0-9a-z]")  # a lowercase token (RFC 9110 5.1)
_BAD_VALUE = re.compile(r"[\0\r\n]|^[ \t]|[ \t]\Z")


def request_problem(fields: list[tuple[str, str]]) -> str | None:
    """What makes a request's header list malformed (RFC 9113 8.2, 8.3), or None."""
    seen: set[str] = set()
    regular = length = False
    for name, value in fields:
        if not name:
            return "an empty header name"
        if name[0] == ":":
            if regular:
                return f"pseudo-header {name} after a regular header"
            if name not in _REQUEST_PSEUDO:
                return f"pseudo-header {name} is not a request's"
            if name in seen:
                return f"pseudo-header {name} twice"
            if name == ":path" and not value:
                return "an empty :path"
            seen.add(name)
        else:
            regular = True
            if _BAD_NAME.search(name):
                return f"header name {name!r} is not a lowercase token"
            if name in _CONNECTION_SPECIFIC:
                return f"connection-specific header {name}"
            if name == "te" and value != "trailers":
                return "te other than trailers"
            if name == "content-length":
                if not value.isdigit():
                    return "a content-length that is no number"
                length = True
        if value and _BAD_VALUE.search(value):
            return f"header {name} has a forbidden character or surrounding space"
    if ":method" not in seen or ":scheme" not in seen or ":path" not in seen:
        return "a request without :method, :scheme and :path"
    return HAS_LENGTH if length else None


def _trailers_problem(fields: list[tuple[str, str]]) -> str | None:
    for name, _ in fields:
        if not name or name[0] == ":" or _BAD_NAME.search(name):
            return f"trailer {name!r}"
    return None


class App(Protocol):
    def opened(self, connection: ServerConnection, stream: Stream) -> None:
        """HEADERS opened `stream`: answer it now, or start it now (`stream.streaming`),
        or wait for `request`."""

    def request(self, connection: ServerConnection, stream: Stream) -> None:
        """The whole request of a stream that is not streaming has come: answer it now, or
        put (stream, message, flag) on `connection.ready` for `start`."""

    def start(self, connection: ServerConnection, stream: Stream, message: bytes, flag: int):
        """Run a call from `connection.ready`, the parser's pass over and it still open."""

    def data(self, connection: ServerConnection, stream: Stream, end: bool) -> None:
        """A streaming request's body has grown, or ended."""


class ServerConnection(Endpoint):
    expects_preface = True

    def __init__(
        self,
        app: App,
        max_body: int,
        on_close: Callable[[ServerConnection], None],
        limits: Limits | None = None,
        pool: ReceivePool | None = None,
        backlog: Backlog | None = None,
    ) -> None:
        super().__init__(limits or Limits(), pool, backlog)
        self.app = app
        self.max_body = max_body
        self._on_close = on_close
        self.peer = ""
        self.address = ""  # the peer's IP address
        self.penalties: Penalties | None = None  # the Listener's
        self.auth: dict = {}  # the client certificate's names, under mutual TLS
        self.identify: Callable | None = None  # ssl object -> auth (set by the Listener)
        self.last_stream = 0  # the highest stream id the peer used
        self.last_taken = 0  # the highest we took on: what a GOAWAY names (6.8)
        self.born = self.idle_since = self._loop.time()
        self.on_hold: asyncio.BaseTransport | None = None  # a penalised peer's, until let in
        self._closed: set[int] = set()  # streams lately closed both ways

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = f"ipv4:{peer[0]}:{peer[1]}" if peer else ""
        self.address = peer[0] if peer else ""
        hold = 0.0
        if self.penalties is not None:  # before our SETTINGS: they say how many streams
            factor, hold = self.penalties.check(self.address)
            if factor < 1.0:
                for kind, budget in self.budgets.items():
                    budget.scale(factor, LEAST.get(kind, LEAST_DEFAULT))
                floor = min(self.max_streams, 100)  # RFC 9113 6.5.2's recommended least
                self.max_streams = max(int(self.max_streams * factor), floor)
        if hold:  # unread and unanswered meanwhile; its timeouts start once it is let in
            self.on_hold = transport
            transport.pause_reading()
            self.born = self.idle_since = self.born + hold
            self._loop.call_later(hold, self._let_in, transport)
            return
        self._let_in(transport)

    def data_received(self, data: bytes) -> None:
        held = self.on_hold
        if held is not None:  # uvloop starts reading after connection_made, paused or not
            held.pause_reading()
            self._buffer += data  # one read's worth, parsed once it is let in
            if len(self._buffer) > HELD_BYTES:
                held.close()
            return
        super().data_received(data)

    def start_ready(self) -> None:
        ready, self.ready = self.ready, []
        streams, start = self.streams, self.app.start
        for stream, message, flag in ready:
            if streams.get(stream.id) is stream:  # not reset meanwhile
                start(self, stream, message, flag)

    def _let_in(self, transport) -> None:
        if self.on_hold is not None:
            self.on_hold = None
            if transport.is_closing():
                return
            transport.resume_reading()
        super().connection_made(transport)
        identify = self.identify
        if identify is not None:
            self.auth = identify(transport.get_extra_info("ssl_object"))
        if self._buffer:  # what arrived while it was held
            self.read_later()

    def is_idle(self, stream_id: int) -> bool:
        unused = stream_id > self.last_stream or not stream_id % 2
        return unused and stream_id not in self.resets  # (a PRIORITY may reset an idle one)

    def check_fields(self, fields: list[tuple[str, str]]) -> str | None:
        return request_problem(fields)

    def on_headers(
        self, stream_id: int, fields: list[tuple[str, str]], end: bool, problem: str | None
    ) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers after the body: they must end the stream
            if stream.ended:
                self.stream_error(stream, STREAM_CLOSED)
            elif not end or _trailers_problem(fields):
                self.stream_error(stream, PROTOCOL_ERROR)
            else:
                self._end(stream)
            return
        if self.is_idle(stream_id):
            if not stream_id % 2:
                raise ProtocolError(PROTOCOL_ERROR, f"even stream id {stream_id}")
        elif stream_id in self.resets:
            return  # a stream we reset: the peer may not know yet
        elif stream_id in self._closed:
            raise ProtocolError(STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
        else:  # lower than one it opened: no new stream (RFC 9113 5.1.1)
            raise ProtocolError(PROTOCOL_ERROR, f"stream id {stream_id} out of order")
        self.last_stream = stream_id  # every lower id is closed now (5.1.1)
        if problem is not None and problem is not HAS_LENGTH:
            self._spend("reset", "malformed requests")  # resets we are made to send count too
            self.reset(stream_id, PROTOCOL_ERROR)  # malformed (RFC 9113 8.1.1)
            return
        if self.draining or len(self.streams) >= self.max_streams:
            self._spend("empty_frame", "streams beyond SETTINGS_MAX_CONCURRENT_STREAMS")
            self.reset(stream_id, REFUSED_STREAM)
            return
        self.last_taken = stream_id
        stream = self.streams[stream_id] = Stream(
            stream_id, self.peer_window, self.limits.stream_window
        )
        self.earnings.streams += 1
        stream.headers = fields
        if problem is HAS_LENGTH:
            stream.expected = int(next(v for n, v in fields if n == "content-length"))
        self.app.opened(self, stream)
        if stream.sent or stream.closing:  # answered from its headers alone
            stream.ended = stream.ended or end
            self._early(stream)
            return
        if end:
            self._end(stream)

    def on_data(self, stream: Stream, end: bool) -> None:
        if stream.streaming:
            if not stream.too_big:
                self.app.data(self, stream, end)
            return
        body = stream.body
        if (
            not stream.too_big
            and (
                stream.size > self.max_body
                # a gRPC message's length prefix: refused before its bytes are waited for
                or (
                    stream.framed
                    and len(body) >= 5
                    and int.from_bytes(body[1:5], "big") + 5 > self.max_body
                )
            )
        ):
            stream.too_big = True  # answered at once (RESOURCE_EXHAUSTED); no bytes kept
            stream.whole()
            self.release(stream)
            self.app.request(self, stream)
            stream.ended = stream.ended or end
            self._early(stream)
            return
        if end:
            self._end(stream)

    def _end(self, stream: Stream) -> None:
        """The peer's side is complete: hand the request on (its bytes are consumed)."""
        stream.ended = True
        if stream.streaming:
            self.app.data(self, stream, True)
            return
        if stream.too_big or stream.task is not None or stream.sent or stream.closing:
            return
        if stream.expected >= 0 and stream.expected != stream.size:
            self.stream_error(stream, PROTOCOL_ERROR)  # content-length mismatch (8.1.1)
            return
        self.release(stream)
        self.app.request(self, stream)

    def on_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()
        self._forgot(stream_id)

    def on_goaway(self, last_stream: int, code: int) -> None:
        self._close_if_done()

    def _early(self, stream: Stream) -> None:
        """Answered before its request ended: once the answer is out, RST_STREAM NO_ERROR
        tells the peer to send no more of it (RFC 9113 8.1)."""
        stream.too_big = True  # what still comes is not kept
        if stream.sent and not stream.ended and stream.id not in self.resets:
            self.reset(stream.id, NO_ERROR)

    def on_sent(self, stream: Stream) -> None:
        """Our side is closed. A request is answered once its body has ended, or early
        (and then reset), so the stream is done either way."""
        if stream.too_big:
            self._early(stream)
        self.streams.pop(stream.id, None)
        self.release(stream)
        self._forgot(stream.id)

    def _forgot(self, stream_id: int) -> None:
        closed = self._closed
        if len(closed) >= 1024:
            closed.clear()
        closed.add(stream_id)
        if not self.streams:
            self.idle_since = self._loop.time()
        self._close_if_done()

    def on_lost(self) -> None:
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self._on_close(self)

    def answer(self, stream: Stream, headers: bytes, data: bytes, trailers: bytes | None) -> None:
        if self.is_open(stream):
            self.send(stream, headers, data, trailers)

    def answer_headers_only(self, stream: Stream, headers: bytes) -> None:
        if self.is_open(stream):
            self.send_headers_only(stream, headers)

    def is_open(self, stream: Stream) -> bool:
        """Not reset by the peer, not answered (nor being answered) yet."""
        return not stream.sent and not stream.closing and self.streams.get(stream.id) is stream

    def goaway(self) -> None:
        """Take no new streams; close once the open ones are answered."""
        if self.transport is None or self.transport.is_closing():
            return
        self.draining = True
        self.write(frame(GOAWAY, 0, 0, self.last_taken.to_bytes(4, "big") + bytes(4)))
        self._close_if_done()

    def close(self, code: int, message: str, last_stream: int = 0, quiet: bool = False) -> None:
        if self.penalties is not None and code not in NOT_STRIKES and not self.lingering:
            self.penalties.strike(self.address)  # now: the close itself lingers a while
        super().close(code, message, last_stream or self.last_taken, quiet)

    def _close_if_done(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()

    def sweep(self, now: float) -> None:
        """The timeouts, checked once a second by the Listener."""
        limits, age = self.limits, now - self.born
        if not self._started and age > limits.preface_timeout_s:
            self.close(PROTOCOL_ERROR, "no connection preface in time", quiet=True)
        elif not self.acked and age > limits.settings_ack_timeout_s:
            self.close(SETTINGS_TIMEOUT, "SETTINGS not acknowledged in time", quiet=True)
        elif self._block_stream and now - self.block_since > limits.header_timeout_s:
            self.close(ENHANCE_YOUR_CALM, "a header block not completed in time", quiet=True)
        elif not self.streams:
            if now - self.idle_since > limits.idle_timeout_s:
                self.goaway()
        else:
            for stream in list(self.streams.values()):
                if stream.ended or stream.task is not None or stream.sent:
                    continue  # its body is complete: the handler has it
                if stream.held != stream.seen:
                    stream.seen, stream.stalled = stream.held, now
                elif now - stream.stalled > limits.body_timeout_s:
                    self.stream_error(stream, CANCEL, spend=False)  # a body that stopped


NOT_STRIKES = frozenset({NO_ERROR, INTERNAL_ERROR, SETTINGS_TIMEOUT})
"""Closes that do not count against the peer's address: ours (a bug), and a peer gone
quiet (its cost is a timer, not our loop's time)."""


TRIM_AFTER_CLOSES = 16
"""Once this many connections have closed, the sweep gives the C heap's free pages back
to the system (glibc's malloc_trim, 0.2-1 ms, 8.6 at most, measured). Otherwise a
flood of short TLS connections leaves RSS near where it peaked: what OpenSSL freed
stays in the heap. Attack benchmark, TLS, closed connections already freed at once,
RSS MiB baseline / after without -> with the trim: rapid-reset 79 / 86 -> 79,
malformed 79 / 86 -> 80, idle 79 / 141 -> 89."""


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _libc_trim()


class _Refused(asyncio.Protocol):
    """A connection over max_connections: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Listener:
    """Accepts connections for an App within the limits, sweeps their timeouts once a
    second, and drains them on stop."""

    def __init__(self, app: App, max_body: int, limits: Limits) -> None:
        self.app, self.max_body, self.limits = app, max_body, limits
        self.pool = ReceivePool(limits.max_buffered_bytes)
        self.backlog: Backlog | None = None  # made on the loop, once it runs
        self.penalties = Penalties(limits.penalty_half_life_s)
        self.connections: set[ServerConnection] = set()
        self.refused = 0
        self._closes = 0  # connections closed since memory was last given back
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._identify: Callable | None = None
        self.port = 0

    async def start(
        self,
        address: str,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
        identify: Callable | None = None,
    ) -> int:
        """Listen on `address`, with TLS if `tls`; `identify` reads a TLS peer's names."""
        self._identify = identify
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        self.backlog = Backlog()
        self._server = await loop.create_server(
            self._connection,
            host.strip("[]") or None,
            int(port),
            reuse_port=reuse_port or None,
            backlog=self.limits.backlog,
            ssl=tls,
        )
        sock = self._server.sockets[0]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = sock.getsockname()[1]
        self._sweeper = loop.call_later(1.0, self._sweep)
        return self.port

    def _connection(self) -> asyncio.Protocol:
        if len(self.connections) >= self.limits.max_connections:
            self.refused += 1
            return _Refused()
        connection = ServerConnection(
            self.app, self.max_body, self._closed, self.limits, self.pool, self.backlog
        )
        connection.identify = self._identify
        connection.penalties = self.penalties
        self.connections.add(connection)
        return connection

    def _closed(self, connection: ServerConnection) -> None:
        self.connections.discard(connection)
        self._closes += 1

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for connection in list(self.connections):
            connection.sweep(now)
        if self._closes >= TRIM_AFTER_CLOSES and _malloc_trim is not None:
            self._closes = 0
            _malloc_trim(0)
        self._sweeper = loop.call_later(1.0, self._sweep)

    async def stop(self, grace: float) -> None:
        """GOAWAY to every connection; what is in flight has `grace` seconds to finish."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.on_hold is not None:  # not yet answered: nothing to say to it
                connection.on_hold.close()
            else:
                connection.goaway()
        waiting = [c.closed for c in self.connections]
        if waiting:
            await asyncio.wait(waiting, timeout=grace)

    def abort(self) -> None:
        for connection in list(self.connections):
            transport = connection.transport or connection.on_hold
            if transport is not None:
                transport.close()
