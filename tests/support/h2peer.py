"""A raw HTTP/2 peer for conformance and attack tests: it writes whatever frames a test
asks for, valid or not, and reads what the server answers.

Written from RFC 9113 and RFC 7541 alone (it shares no code with coalesce.http2), so a
mistake in our stack is not mirrored here. Blocking sockets: tests run it in threads
or beside an in-process server's loop through `asyncio.to_thread`.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import struct
import time
from typing import NamedTuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x4, 0x5, 0x6, 0x7
CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x8, 0x9, 0xB
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3  # SETTINGS ids
INITIAL_WINDOW_SIZE = 0x4


class Frame(NamedTuple):
    kind: int
    flags: int
    stream: int
    payload: bytes


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


# HPACK, encoder side, without Huffman coding.


def integer(value: int, prefix: int, first: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def string(text: bytes) -> bytes:
    return integer(len(text), 7) + text


def literal(name: bytes, value: bytes, indexed: bool = False) -> bytes:
    """Literal with a new name: with incremental indexing (added to the peer's table) or
    without indexing."""
    return (b"\x40" if indexed else b"\x00") + string(name) + string(value)


def indexed(index: int) -> bytes:
    return integer(index, 7, 0x80)


def request_block(path: str = "/inference.GRPCInferenceService/ServerLive", **extra) -> bytes:
    """A gRPC request's header block: POST, http, the path, content-type, te."""
    block = b"\x83\x86" + literal(b":path", path.encode()) + literal(b":authority", b"x")
    block += literal(b"content-type", b"application/grpc") + literal(b"te", b"trailers")
    for name, value in extra.items():
        block += literal(name.replace("_", "-").encode(), value.encode())
    return block


def grpc_message(body: bytes = b"") -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


_own = itertools.count()


def own_address() -> str:
    """A loopback address no other Peer of this process had (127.100.0.2 onwards)."""
    n = next(_own)
    return f"127.{100 + n // 62500 % 100}.{n // 250 % 250}.{n % 250 + 2}"


class Peer:
    """One client connection, preface and SETTINGS sent by `connect`."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 5.0,
        source: str = "",
        tls: str = "",
    ) -> None:
        """`source`: the local address to connect from (any 127.x.y.z is loopback); by
        default one of its own for each peer, as if each were another host: a server
        penalises the address of a peer it closes for misbehaving, and the peers that
        misbehave on purpose must not slow the next test's. `tls`: a CA file; the
        connection is then TLS (ALPN h2, the server's certificate verified against it)."""
        if not source and host == "127.0.0.1":
            source = own_address()
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        if tls:
            context = ssl.create_default_context(cafile=tls)
            context.set_alpn_protocols(["h2"])
            sock = context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self.frames: list[Frame] = []  # everything read so far

    def connect(self, *pairs: tuple[int, int]) -> Peer:
        self.send(PREFACE + settings(*pairs))
        return self

    def handshake(self) -> Peer:
        """Preface, SETTINGS, ACK of the server's SETTINGS: a connection ready for use."""
        self.connect()
        self.expect(lambda f: f.kind == SETTINGS and not f.flags & ACK)
        self.send(frame(SETTINGS, ACK, 0))
        return self

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None when the server closed the connection."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    head, self._buffer = self._buffer[: 9 + length], self._buffer[9 + length :]
                    got = Frame(
                        head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, head[9:]
                    )
                    self.frames.append(got)
                    return got
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk

    def expect(self, match, timeout: float = 5.0) -> Frame:
        """Read until a frame for which `match(frame)` holds; fail on close or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching frame; got {self.frames[-5:]}")
            got = self.read(left)
            if got is None:
                raise ConnectionError(f"closed without a matching frame; got {self.frames[-5:]}")
            if match(got):
                return got

    def goaway(self, timeout: float = 5.0) -> int:
        """The error code of the GOAWAY the server sends; the connection then closes."""
        got = self.expect(lambda f: f.kind == GOAWAY, timeout)
        return struct.unpack(">I", got.payload[4:8])[0]

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within `timeout` (frames skipped)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.read(max(deadline - time.monotonic(), 0.01)) is None:
                    return True
        except TimeoutError:
            return False
        return False

    def ping(self, data: bytes = b"pingpong", timeout: float = 5.0) -> float:
        """Round trip of a PING: how long the server's loop took to answer it."""
        start = time.perf_counter()
        self.send(frame(PING, 0, 0, data))
        self.expect(lambda f: f.kind == PING and f.flags & ACK and f.payload == data, timeout)
        return time.perf_counter() - start

    def call(self, stream: int, block: bytes | None = None, body: bytes = b"") -> list[Frame]:
        """One unary gRPC call on `stream`: the frames the server answered on it."""
        self.send(
            frame(HEADERS, END_HEADERS, stream, block or request_block())
            + frame(DATA, END_STREAM, stream, grpc_message(body))
        )
        out = []
        while True:
            got = self.expect(lambda f: f.stream == stream)
            out.append(got)
            if got.kind == RST_STREAM or got.flags & END_STREAM:
                return out


def grpc_status(frames: list[Frame]) -> str | None:
    """grpc-status from the answer's header blocks, as our server encodes them (literals)."""
    for got in frames:
        if got.kind == HEADERS:
            at = got.payload.find(b"grpc-status")
            if at >= 0:
                size = got.payload[at + 11]
                return got.payload[at + 12 : at + 12 + size].decode()
    return None
