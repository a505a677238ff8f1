"""The server side of coalesce.http2.endpoint: requests in, answers out.

A complete request (headers, body, END_STREAM) goes to `app.request(connection,
stream)`; `answer(...)` or `answer_headers_only(...)` sends its response. gRPC's
rules live in coalesce.http2.grpc_server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .endpoint import (
    GOAWAY,
    MAX_STREAMS,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    Endpoint,
    ProtocolError,
    Stream,
    frame,
)


class App(Protocol):
    def request(self, connection: ServerConnection, stream: Stream) -> None: ...


class ServerConnection(Endpoint):
    expects_preface = True

    def __init__(
        self, app: App, max_body: int, on_close: Callable[[ServerConnection], None]
    ) -> None:
        super().__init__()
        self.app = app
        self.max_body = max_body
        self._on_close = on_close
        self.peer = ""
        self.last_stream = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"ipv4:{peer[0]}:{peer[1]}" if peer else ""

    def on_headers(self, stream_id: int, fields: list[tuple[str, str]], end: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers after the body: they must end the stream
            if not end:
                raise ProtocolError(PROTOCOL_ERROR, "trailers without END_STREAM")
            self._complete(stream)
            return
        if stream_id <= self.last_stream and stream_id % 2 and end:
            return  # trailers of a stream we already answered (or reset)
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise ProtocolError(PROTOCOL_ERROR, f"stream id {stream_id} out of order")
        self.last_stream = stream_id
        if self.draining or len(self.streams) >= MAX_STREAMS:
            self.reset(stream_id, REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = Stream(stream_id, self.peer_window)
        stream.headers = fields
        if end:
            self._complete(stream)

    def on_data(self, stream: Stream, end: bool) -> None:
        if stream.task is not None or stream.sent:
            stream.body = bytearray()  # data after END_STREAM or after we answered: dropped
            return
        if len(stream.body) > self.max_body:
            stream.too_big = True  # answered RESOURCE_EXHAUSTED at the end; keep no bytes
            stream.body = bytearray()
        if end:
            self._complete(stream)

    def _complete(self, stream: Stream) -> None:
        if stream.task is None and not stream.sent:
            self.app.request(self, stream)

    def on_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()
        self._close_if_done()

    def on_goaway(self, last_stream: int, code: int) -> None:
        self._close_if_done()

    def on_sent(self, stream: Stream) -> None:
        """Both sides are closed: a request is answered only once its body has ended."""
        self.streams.pop(stream.id, None)
        self._close_if_done()

    def on_lost(self) -> None:
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self._on_close(self)

    def answer(self, stream: Stream, headers: bytes, data: bytes, trailers: bytes) -> None:
        if self._open(stream):
            self.send(stream, headers, data, trailers)

    def answer_headers_only(self, stream: Stream, headers: bytes) -> None:
        if self._open(stream):
            self.send_headers_only(stream, headers)

    def _open(self, stream: Stream) -> bool:
        """Not reset by the peer, not answered yet, and the connection still up."""
        return not stream.sent and self.streams.get(stream.id) is stream

    def goaway(self) -> None:
        """Take no new streams; close once the open ones are answered."""
        if self.transport is None or self.transport.is_closing():
            return
        self.draining = True
        self.write(frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + bytes(4)))
        self._close_if_done()

    def close(self, code: int, message: str, last_stream: int = 0) -> None:
        super().close(code, message, last_stream or self.last_stream)

    def _close_if_done(self) -> None:
        if self.draining and not self.streams and self.transport is not None:
            self.flush()
            self.transport.close()
