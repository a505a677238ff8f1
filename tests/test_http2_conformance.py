"""RFC 9113 and RFC 7541 rules, one test each, in raw frames against `coalesce serve`'s gRPC
listener (our own HTTP/2): the rules h2spec checks (146/146 there), kept in CI.

Each test says what the peer does and what the RFC requires of the server: a connection
error (GOAWAY with a code), a stream error (RST_STREAM with a code), or an answer. After
each, the same server still answers a well-formed call.
"""

from __future__ import annotations

import struct

import pytest

from tests.support import h2peer as h2
from tests.support.coalesce import Process, free_port

CALL = "/inference.GRPCInferenceService/ServerLive"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    process = Process(
        {
            "listen": f"127.0.0.1:{port}",
            "admin": None,
            "backends": {"example": {"type": "local", "model": "coalesce.example_model:load"}},
            "routes": [{"model": "example", "backend": "example"}],
        },
        tmp_path_factory.mktemp("conformance"),
    )
    yield process
    process.terminate()


def peer(server) -> h2.Peer:
    return h2.Peer(server.port).handshake()


def still_serving(server) -> None:
    with peer(server) as p:
        assert h2.grpc_status(p.call(1)) == "0"


def goaway_after(server, data: bytes) -> int:
    with peer(server) as p:
        p.send(data)
        code = p.goaway()
        assert p.closed()
    still_serving(server)
    return code


def reset_after(server, data: bytes, stream: int = 1) -> int:
    with peer(server) as p:
        p.send(data)
        got = p.expect(lambda f: f.kind in (h2.RST_STREAM, h2.GOAWAY) and f.stream in (0, stream))
        assert got.kind == h2.RST_STREAM, f"a connection error, not a stream error: {got}"
        code = struct.unpack(">I", got.payload)[0]
        assert h2.grpc_status(p.call(stream + 2)) == "0"  # the connection goes on
    return code


HEAD = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.request_block(CALL))
HEAD_END = h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, h2.request_block(CALL))
MESSAGE = h2.grpc_message()


# Connection errors: GOAWAY with the code the RFC names, then close.

CONNECTION_ERRORS = {
    "DATA on stream 0 (6.1)": (h2.frame(h2.DATA, 0, 0, b"x"), h2.PROTOCOL_ERROR),
    "HEADERS on stream 0 (6.2)": (
        h2.frame(h2.HEADERS, h2.END_HEADERS, 0, h2.request_block()),
        h2.PROTOCOL_ERROR,
    ),
    "DATA on an idle stream (5.1)": (h2.frame(h2.DATA, 0, 1, b"x"), h2.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream (5.1, 6.4)": (
        h2.frame(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.CANCEL)),
        h2.PROTOCOL_ERROR,
    ),
    "WINDOW_UPDATE on an idle stream (5.1)": (
        h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1)),
        h2.PROTOCOL_ERROR,
    ),
    "an even stream id (5.1.1)": (
        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 2, h2.request_block()),
        h2.PROTOCOL_ERROR,
    ),
    "a stream id lower than one used (5.1.1)": (
        h2.frame(h2.HEADERS, h2.END_HEADERS, 5, h2.request_block())
        + h2.frame(h2.HEADERS, h2.END_HEADERS, 3, h2.request_block()),
        h2.PROTOCOL_ERROR,
    ),
    "SETTINGS ACK with a payload (6.5)": (
        h2.frame(h2.SETTINGS, h2.ACK, 0, struct.pack(">HI", 4, 1)),
        h2.FRAME_SIZE_ERROR,
    ),
    "SETTINGS of a length not a multiple of 6 (6.5)": (
        h2.frame(h2.SETTINGS, 0, 0, b"\0\x04\0\0"),
        h2.FRAME_SIZE_ERROR,
    ),
    "SETTINGS on a stream (6.5)": (
        h2.frame(h2.SETTINGS, 0, 1, struct.pack(">HI", 4, 1)),
        h2.PROTOCOL_ERROR,
    ),
    "ENABLE_PUSH 2 (6.5.2)": (h2.settings((2, 2)), h2.PROTOCOL_ERROR),
    "INITIAL_WINDOW_SIZE above 2^31-1 (6.5.2)": (h2.settings((4, 1 << 31)), h2.FLOW_CONTROL_ERROR),
    "MAX_FRAME_SIZE below 16384 (6.5.2)": (h2.settings((5, 16383)), h2.PROTOCOL_ERROR),
    "WINDOW_UPDATE of 0 on the connection (6.9)": (
        h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
        h2.PROTOCOL_ERROR,
    ),
    "the connection window above 2^31-1 (6.9.1)": (
        h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1)),
        h2.FLOW_CONTROL_ERROR,
    ),
    "WINDOW_UPDATE of 3 bytes (6.9)": (h2.frame(h2.WINDOW_UPDATE, 0, 0, b"\0\0\1"), 6),
    "PING of 7 bytes (6.7)": (h2.frame(h2.PING, 0, 0, b"1234567"), h2.FRAME_SIZE_ERROR),
    "PING on a stream (6.7)": (h2.frame(h2.PING, 0, 1, b"12345678"), h2.PROTOCOL_ERROR),
    "PRIORITY on stream 0 (6.3)": (
        h2.frame(h2.PRIORITY, 0, 0, b"\0\0\0\1\x10"),
        h2.PROTOCOL_ERROR,
    ),
    "GOAWAY on a stream (6.8)": (h2.frame(h2.GOAWAY, 0, 1, bytes(8)), h2.PROTOCOL_ERROR),
    "a frame over SETTINGS_MAX_FRAME_SIZE (4.2)": (
        h2.frame(h2.DATA, 0, 1, bytes(16385)),
        h2.FRAME_SIZE_ERROR,
    ),
    "PUSH_PROMISE from a client (8.4)": (
        h2.frame(h2.PUSH_PROMISE, h2.END_HEADERS, 1, b"\0\0\0\2"),
        h2.PROTOCOL_ERROR,
    ),
    "CONTINUATION without HEADERS (6.10)": (
        h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, h2.request_block()),
        h2.PROTOCOL_ERROR,
    ),
    "a header block interrupted by another frame (6.10)": (
        h2.frame(h2.HEADERS, 0, 1, h2.request_block()) + h2.frame(h2.PING, 0, 0, bytes(8)),
        h2.PROTOCOL_ERROR,
    ),
    "a header block continued on another stream (6.10)": (
        h2.frame(h2.HEADERS, 0, 1, h2.request_block())
        + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 3, b""),
        h2.PROTOCOL_ERROR,
    ),
    "HEADERS on a closed stream (5.1)": (
        HEAD_END + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.request_block()),
        h2.STREAM_CLOSED,
    ),
    "an HPACK table size update after a field (RFC 7541 4.2)": (
        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, h2.request_block() + b"\x20"),
        h2.COMPRESSION_ERROR,
    ),
    "an HPACK index beyond the tables (RFC 7541 2.3.3)": (
        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, b"\xff\x10"),
        h2.COMPRESSION_ERROR,
    ),
    "invalid Huffman padding (RFC 7541 5.2)": (
        h2.frame(
            h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, h2.request_block() + b"\0\x81\x1f\x81\0"
        ),
        h2.COMPRESSION_ERROR,
    ),
}


@pytest.mark.parametrize("data, code", CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS.keys())
def test_a_connection_error_is_goaway_with_its_code(server, data, code):
    assert goaway_after(server, data) == code


def test_what_is_not_the_preface_closes_the_connection(server):
    with h2.Peer(server.port) as p:
        p.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert p.goaway() == h2.PROTOCOL_ERROR
    still_serving(server)


def test_the_preface_must_be_followed_by_settings(server):
    with h2.Peer(server.port) as p:
        p.send(h2.PREFACE + h2.frame(h2.PING, 0, 0, bytes(8)))
        assert p.goaway() == h2.PROTOCOL_ERROR


# Stream errors: RST_STREAM with the code, and the connection goes on.

MALFORMED = {
    "an uppercase header name (8.2.1)": h2.request_block(CALL) + h2.literal(b"X-Up", b"1"),
    "an empty header name (8.2.1)": h2.request_block(CALL) + h2.literal(b"", b"1"),
    "an unknown pseudo-header (8.3)": h2.request_block(CALL) + h2.literal(b":who", b"1"),
    "a response pseudo-header in a request (8.3.1)": h2.literal(b":status", b"200")
    + h2.request_block(CALL),
    "a pseudo-header after a regular one (8.3)": h2.request_block(CALL)
    + h2.literal(b":authority", b"y"),
    "a connection-specific header (8.2.2)": h2.request_block(CALL)
    + h2.literal(b"connection", b"keep-alive"),
    "te other than trailers (8.2.2)": h2.request_block(CALL).replace(b"trailers", b"gzip,dfl"),
    "an empty :path (8.3.1)": b"\x83\x86" + h2.literal(b":path", b""),
    "no :method (8.3.1)": b"\x86" + h2.literal(b":path", CALL.encode()),
    "no :scheme (8.3.1)": b"\x83" + h2.literal(b":path", CALL.encode()),
    "no :path (8.3.1)": b"\x83\x86",
    "a :method twice (8.3.1)": b"\x83" + h2.request_block(CALL),
    "a :path twice (8.3.1)": h2.literal(b":path", b"/") + h2.request_block(CALL),
    "a newline in a value (8.2.1)": h2.request_block(CALL) + h2.literal(b"x-a", b"a\nb"),
}


@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_reset_with_protocol_error(server, block):
    data = h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, block)
    assert reset_after(server, data) == h2.PROTOCOL_ERROR


STREAM_ERRORS = {
    "DATA on a half-closed (remote) stream (5.1)": (
        h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, h2.request_block("/slow/x"))
        + h2.frame(h2.DATA, 0, 1, b"x"),
        h2.STREAM_CLOSED,
    ),
    "a stream depending on itself in HEADERS (5.3.1)": (
        h2.frame(
            h2.HEADERS,
            h2.END_HEADERS | h2.END_STREAM | h2.PRIORITY_FLAG,
            1,
            b"\0\0\0\1\x10" + h2.request_block(CALL),
        ),
        h2.PROTOCOL_ERROR,
    ),
    "a stream depending on itself in PRIORITY (5.3.1)": (
        HEAD + h2.frame(h2.PRIORITY, 0, 1, b"\0\0\0\1\x10"),
        h2.PROTOCOL_ERROR,
    ),
    "PRIORITY of 4 bytes (6.3)": (HEAD + h2.frame(h2.PRIORITY, 0, 1, b"\0\0\0\3"), 6),
    "WINDOW_UPDATE of 0 on a stream (6.9)": (
        HEAD + h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)),
        h2.PROTOCOL_ERROR,
    ),
    "a stream window above 2^31-1 (6.9.1)": (
        HEAD + h2.frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", (1 << 31) - 1)),
        h2.FLOW_CONTROL_ERROR,
    ),
    "content-length other than the body's (8.1.1)": (
        h2.frame(
            h2.HEADERS,
            h2.END_HEADERS,
            1,
            h2.request_block(CALL) + h2.literal(b"content-length", b"9"),
        )
        + h2.frame(h2.DATA, h2.END_STREAM, 1, MESSAGE),
        h2.PROTOCOL_ERROR,
    ),
    "content-length other than the body's, on no gRPC call (8.1.1)": (
        h2.frame(
            h2.HEADERS,
            h2.END_HEADERS,
            1,
            b"\x83\x86\x84" + h2.literal(b"content-length", b"10"),  # POST /, no content-type
        )
        + h2.frame(h2.DATA, 0, 1, b"text")  # no gRPC length prefix (it would read ~1.9 GB)
        + h2.frame(h2.DATA, h2.END_STREAM, 1, b"plain"),
        h2.PROTOCOL_ERROR,
    ),
    "trailers without END_STREAM (8.1)": (
        HEAD + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.literal(b"x-t", b"1")),
        h2.PROTOCOL_ERROR,
    ),
    "a pseudo-header in trailers (8.1)": (
        HEAD + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, b"\x83"),
        h2.PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize("data, code", STREAM_ERRORS.values(), ids=STREAM_ERRORS.keys())
def test_a_stream_error_is_rst_stream_with_its_code(server, data, code):
    assert reset_after(server, data) == code


def test_streams_beyond_max_concurrent_streams_are_refused(server):
    with peer(server) as p:
        (limit,) = [
            struct.unpack(">I", f.payload[i + 2 : i + 6])[0]
            for f in p.frames
            if f.kind == h2.SETTINGS and not f.flags & h2.ACK
            for i in range(0, len(f.payload), 6)
            if f.payload[i : i + 2] == b"\0\x03"
        ]
        block = h2.request_block(CALL)
        p.send(
            b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * i + 1, block) for i in range(limit))
        )
        p.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 2 * limit + 1, block))
        got = p.expect(lambda f: f.kind == h2.RST_STREAM)
        assert got.stream == 2 * limit + 1
        assert struct.unpack(">I", got.payload)[0] == h2.REFUSED_STREAM


# What a server must accept.


def test_unknown_frames_and_advice_are_ignored_and_pings_answered(server):
    with peer(server) as p:
        p.send(h2.frame(0x77, 0xFF, 0, b"extension") + h2.frame(h2.PRIORITY, 0, 9, b"\0\0\0\0\x10"))
        assert p.ping(b"abcdefgh") < 5
        p.send(h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1000)))
        p.send(h2.settings((4, 1 << 20), (5, 1 << 20), (0x99, 7)))
        p.expect(lambda f: f.kind == h2.SETTINGS and f.flags & h2.ACK)
        assert h2.grpc_status(p.call(11)) == "0"


def test_a_request_split_over_continuation_and_padded_frames_is_answered(server):
    block = h2.request_block(CALL)
    padded = b"\x03" + h2.grpc_message() + b"\0\0\0"
    with peer(server) as p:
        p.send(
            h2.frame(h2.HEADERS, 0, 1, block[:5])
            + h2.frame(h2.CONTINUATION, 0, 1, block[5:20])
            + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, block[20:])
            + h2.frame(h2.DATA, h2.END_STREAM | h2.PADDED, 1, padded)
        )
        answer = []
        while not answer or not answer[-1].flags & h2.END_STREAM:
            answer.append(p.expect(lambda f: f.stream == 1))
        assert h2.grpc_status(answer) == "0"


def test_what_is_no_grpc_call_gets_an_http_answer_with_a_body(server):
    with peer(server) as p:
        p.send(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, b"\x82\x86\x84"))  # GET /
        head = p.expect(lambda f: f.stream == 1 and f.kind == h2.HEADERS)
        assert b"405" in head.payload
        body = p.expect(lambda f: f.stream == 1 and f.kind == h2.DATA)
        assert b"POST" in body.payload and body.flags & h2.END_STREAM
