"""A lean HTTP/2 server (RFC 9113, cleartext) on the asyncio loop, for gRPC unary calls.

Why not grpc.aio: its C core parses HTTP/2 on threads of its own and hands every
call to the loop through a poller thread and Cython glue, which costs ~125 µs of
CPU per call here and ~0.3 ms of latency at light load. Framing in Python on the
loop itself costs a few µs (benchmarks/h2_probe.py, `--scenarios floor`).

This module knows HTTP/2 only: frames, HPACK decoding, flow control in both
directions, stream limits, RST_STREAM and GOAWAY. A complete request (headers, body,
END_STREAM) goes to `app.request(connection, stream)`; `connection.respond(...)`
sends an answer. gRPC's rules live in coalesce.native_grpc.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Protocol

from .hpack import Decoder, HpackError

log = logging.getLogger("coalesce")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9

MAX_FRAME = 16384  # we never raise SETTINGS_MAX_FRAME_SIZE: peers send at most this
MAX_WINDOW = (1 << 31) - 1
STREAM_WINDOW = 1 << 22  # what each request may send before we acknowledge it
CONNECTION_WINDOW = 1 << 30
MAX_STREAMS = 1024
MAX_HEADER_BLOCK = 1 << 16


class ConnectionError_(Exception):
    """The peer broke the protocol: GOAWAY with `code`, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class App(Protocol):
    def request(self, connection: Connection, stream: Stream) -> None: ...


class Stream:
    """One request/response exchange."""

    __slots__ = (
        "answered",
        "body",
        "headers",
        "id",
        "pending",
        "received",
        "task",
        "too_big",
        "trailers",
        "window",
    )

    def __init__(self, stream_id: int, window: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.received = 0  # bytes since our last WINDOW_UPDATE for this stream
        self.window = window  # what we may still send on it
        self.pending: memoryview | None = None  # DATA payload waiting for window
        self.trailers = b""
        self.task: asyncio.Task | None = None
        self.too_big = False
        self.answered = False


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


class Connection(asyncio.Protocol):
    def __init__(self, app: App, max_body: int, on_close: Callable[[Connection], None]) -> None:
        self.app = app
        self.max_body = max_body
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.decoder = Decoder()
        self._buffer = b""
        self._started = False
        self._block = bytearray()  # a header block continued in CONTINUATION frames
        self._block_stream = 0
        self._block_end = False
        self._received = 0  # DATA bytes since our last connection WINDOW_UPDATE
        self.send_window = 65535
        self.peer_window = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame = 16384  # the peer's SETTINGS_MAX_FRAME_SIZE
        self._blocked: dict[int, Stream] = {}  # streams waiting for send window
        self.draining = False
        self.closed = asyncio.get_running_loop().create_future()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"ipv4:{peer[0]}:{peer[1]}" if peer else ""
        settings = struct.pack(
            ">HIHIHI", 0x3, MAX_STREAMS, 0x4, STREAM_WINDOW, 0x6, MAX_HEADER_BLOCK
        )
        window = (CONNECTION_WINDOW - 65535).to_bytes(4, "big")
        self.transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, window))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        try:
            used = self._frames(buffer)
        except ConnectionError_ as exc:
            self.close(exc.code, str(exc))
            return
        self._buffer = buffer[used:]

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self._blocked.clear()
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_close(self)

    def pause_writing(self) -> None:  # the peer reads slower than we answer: stop reading
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # frames in

    def _frames(self, buffer: bytes) -> int:
        pos, end = 0, len(buffer)
        if not self._started:
            if end < len(PREFACE):
                if not PREFACE.startswith(buffer):
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return 0
            if buffer[: len(PREFACE)] != PREFACE:
                raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            pos, self._started = len(PREFACE), True
        while end - pos >= 9:
            length = int.from_bytes(buffer[pos : pos + 3], "big")
            if length > MAX_FRAME:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            stop = pos + 9 + length
            if stop > end:
                break
            kind, flags = buffer[pos + 3], buffer[pos + 4]
            stream_id = int.from_bytes(buffer[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            payload = buffer[pos + 9 : stop]
            pos = stop
            if self._block_stream and kind != CONTINUATION:
                raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted")
            if kind == DATA:
                self._data(stream_id, flags, payload)
            elif kind == HEADERS:
                self._headers(stream_id, flags, payload)
            elif kind == CONTINUATION:
                self._continuation(stream_id, flags, payload)
            elif kind == SETTINGS:
                self._settings(stream_id, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._window_update(stream_id, payload)
            elif kind == PING:
                if len(payload) != 8 or stream_id:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "bad PING")
                if not flags & ACK:
                    self.transport.write(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                self._reset(stream_id)
            elif kind == GOAWAY:
                self.draining = True
                self._close_if_done()
            elif kind == PUSH_PROMISE:
                raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # PRIORITY and unknown frame types are ignored, as RFC 9113 allows
        return pos

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        size = len(payload)
        self._received += size
        if self._received >= CONNECTION_WINDOW // 4:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, self._received.to_bytes(4, "big")))
            self._received = 0
        if flags & PADDED:
            payload = _unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.task is not None or stream.answered:
            if stream_id > self.last_stream:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream we reset or already answered: drop, the window is counted
        if not stream.too_big:
            if len(stream.body) + len(payload) > self.max_body:
                stream.too_big = True
                stream.body = bytearray()
            else:
                stream.body += payload
        if flags & END_STREAM:
            self.app.request(self, stream)
            return
        stream.received += size
        if stream.received >= STREAM_WINDOW // 2:
            self.transport.write(
                frame(WINDOW_UPDATE, 0, stream_id, stream.received.to_bytes(4, "big"))
            )
            stream.received = 0

    def _headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        self._block = bytearray(payload)
        self._block_end = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._header_block(stream_id)
        else:
            self._block_stream = stream_id

    def _continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id != self._block_stream:
            raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        self._block += payload
        if len(self._block) > MAX_HEADER_BLOCK:
            raise ConnectionError_(PROTOCOL_ERROR, "header block too large")
        if flags & END_HEADERS:
            self._block_stream = 0
            self._header_block(stream_id)

    def _header_block(self, stream_id: int) -> None:
        try:  # decoded whatever becomes of the stream: the table must stay in step
            fields = self.decoder.decode(bytes(self._block))
        except HpackError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, str(exc)) from None
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers after the body: they must end the stream
            if not self._block_end:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            if stream.task is None and not stream.answered:
                self.app.request(self, stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise ConnectionError_(PROTOCOL_ERROR, f"stream id {stream_id} out of order")
        self.last_stream = stream_id
        if self.draining or len(self.streams) >= MAX_STREAMS:
            self.transport.write(frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        stream = self.streams[stream_id] = Stream(stream_id, self.peer_window)
        stream.headers = fields
        if self._block_end:
            self.app.request(self, stream)

    def _settings(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length")
        for pos in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, pos)
            if key == 0x4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == 0x5:
                if not 16384 <= value <= (1 << 24) - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_frame = value
        self.transport.write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not stream_id:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.window += increment
            if stream.pending is not None:
                self._send_data(stream)

    def _reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()
        self._close_if_done()

    # frames out

    def respond(self, stream: Stream, headers: bytes, data: bytes, trailers: bytes) -> None:
        """HEADERS, DATA as the windows allow, then trailing HEADERS (END_STREAM)."""
        if stream.answered or self.streams.get(stream.id) is not stream:
            return  # reset by the peer, or the connection is gone
        stream.answered = True
        sid = stream.id.to_bytes(4, "big")
        size = len(data)
        head = len(headers).to_bytes(3, "big") + bytes((HEADERS, END_HEADERS)) + sid + headers
        if size <= self.send_window and size <= stream.window and size <= self.peer_frame:
            self.send_window -= size
            self.transport.write(  # the common case: the whole answer in one write
                head
                + size.to_bytes(3, "big")
                + bytes((DATA, 0))
                + sid
                + data
                + len(trailers).to_bytes(3, "big")
                + bytes((HEADERS, END_HEADERS | END_STREAM))
                + sid
                + trailers
            )
            self._finish(stream)
            return
        self.transport.write(head)
        stream.pending, stream.trailers = memoryview(data), trailers
        self._send_data(stream)

    def respond_headers_only(self, stream: Stream, headers: bytes) -> None:
        """One HEADERS frame that ends the stream (gRPC's trailers-only answer)."""
        if stream.answered or self.streams.get(stream.id) is not stream:
            return
        stream.answered = True
        self.transport.write(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, headers))
        self._finish(stream)

    def _send_data(self, stream: Stream) -> None:
        pending = stream.pending
        assert pending is not None
        chunks = []
        while len(pending):
            size = min(len(pending), self.send_window, stream.window, self.peer_frame)
            if size <= 0:
                self._blocked[stream.id] = stream
                break
            chunks.append(frame(DATA, 0, stream.id, bytes(pending[:size])))
            pending = pending[size:]
            self.send_window -= size
            stream.window -= size
        else:
            chunks.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            stream.pending = None
            self._blocked.pop(stream.id, None)
        if chunks:
            self.transport.write(b"".join(chunks))
        if stream.pending is None:
            self._finish(stream)
        else:
            stream.pending = pending

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self._send_data(stream)

    def _finish(self, stream: Stream) -> None:
        """Both sides are closed: a request is answered only once its body has ended."""
        self.streams.pop(stream.id, None)
        self._close_if_done()

    # shutdown

    def goaway(self) -> None:
        """Take no new streams; close once the open ones are answered."""
        if self.transport is None or self.transport.is_closing():
            return
        self.draining = True
        self.transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", self.last_stream, NO_ERROR)))
        self._close_if_done()

    def close(self, code: int, message: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if code != NO_ERROR:
            log.warning("closing HTTP/2 connection from %s: %s", self.peer, message)
        payload = struct.pack(">II", self.last_stream, code) + message.encode()[:200]
        self.transport.write(frame(GOAWAY, 0, 0, payload))
        self.transport.close()

    def _close_if_done(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self.transport.close()


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "bad padding")
    return payload[1 : len(payload) - payload[0]]
