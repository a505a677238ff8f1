"""Fuzzing our HTTP/2 stack (coalesce.http2): HPACK decoding and the server's frame layer.

- HPACK, against libnghttp2 through ctypes (tests/support/h2fuzz.py): header lists it
  encodes, with its indexing, eviction, Huffman coding and table-size updates, decode to
  the same lists over a connection's worth of blocks, the dynamic table in step with its
  encoder's; blocks built from HPACK's grammar and mangled decode as libnghttp2's own
  decoder decodes them, or are refused by both; arbitrary bytes decode or raise
  HpackError, nothing else, and the decoder stays usable; Huffman decoding agrees with a
  bit-by-bit decoder of the canonical code and round-trips what it encodes.
- The frame layer: one ServerConnection in process, on a fake transport and a loop
  whose clock moves only when told, fed a preface and random frames of every type
  (random flags, a few stream ids so that states collide, valid-shaped and mangled
  payloads, raw bytes) in random chunks, between loop passes, timers, sweeps and
  GOAWAYs, with an app that answers at once, later or never. What it writes must be
  well-formed frames within the peer's windows; its flow-control and body books must
  balance after every event; no bug may surface as GOAWAY INTERNAL_ERROR.
- A coverage-guided run of the same oracles under atheris, where it is installed.

The five bugs these found are fixed; each test keeps its reproducer as an @example and
says what it was.

CI runs a fixed (derandomized) sample in about 45 s, atheris included. For a deeper run,
`COALESCE_FUZZ_EXAMPLES=5000 pytest tests/test_http2_fuzz.py` draws that many random
examples per test, and COALESCE_ATHERIS_S the seconds each atheris target runs.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from coalesce.http2.hpack import STATIC_TABLE, Decoder, HpackError, _codes, huffman_decode
from coalesce.http2.server import request_problem
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support import h2fuzz
from tests.support import h2peer as h2
from tests.support.h2fuzz import Answer, Scenario

DEEP = int(os.environ.get("COALESCE_FUZZ_EXAMPLES", "0"))
ROOT = Path(__file__).resolve().parents[1]
needs_nghttp2 = pytest.mark.skipif(
    h2fuzz.LIB is None, reason="needs libnghttp2 (make test installs it)"
)


def fuzz(examples: int) -> settings:
    """CI: `examples`, derandomized; COALESCE_FUZZ_EXAMPLES: that many random ones."""
    return settings(
        max_examples=DEEP or examples,
        deadline=None,
        derandomize=not DEEP,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def text(headers) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


# Huffman coding (RFC 7541 5.2, Appendix B), from the canonical code hpack rebuilds.

HUFFMAN = _codes()  # (length, code) -> symbol
SYMBOLS = {symbol: key for key, symbol in HUFFMAN.items()}  # symbol -> (length, code)


def huffman_encode(data: bytes) -> bytes:
    bits = count = 0
    for byte in data:
        length, code = SYMBOLS[byte]
        bits, count = bits << length | code, count + length
    pad = -count % 8  # the most significant bits of EOS: ones
    return (bits << pad | (1 << pad) - 1).to_bytes((count + pad) // 8, "big")


def huffman_reference(data: bytes) -> bytes | None:
    """Bit by bit, straight from the RFC: the decoded bytes, or None where it says the
    string is malformed (EOS inside it; padding over 7 bits or not all ones)."""
    out, code, length = bytearray(), 0, 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, length = code << 1 | byte >> shift & 1, length + 1
            symbol = HUFFMAN.get((length, code))
            if symbol == 256:
                return None
            if symbol is not None:
                out.append(symbol)
                code = length = 0
    if length > 7 or code != (1 << length) - 1:
        return None
    return bytes(out)


def test_the_huffman_code_is_the_rfcs():
    """RFC 7541 C.4: the code hpack rebuilds from lengths encodes as the RFC's examples."""
    for plain, coded in (
        (b"www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
        (b"no-cache", "a8eb10649cbf"),
        (b"custom-key", "25a849e95ba97d7f"),
        (b"custom-value", "25a849e95bb8e8b4bf"),
    ):
        assert huffman_encode(plain).hex() == coded
        assert huffman_decode(bytes.fromhex(coded)) == plain


@fuzz(300)
@given(st.binary(max_size=200))
def test_huffman_round_trips(data):
    assert huffman_decode(huffman_encode(data)) == data


@fuzz(800)
@given(
    st.one_of(
        st.binary(max_size=40),
        # a valid string with its end mangled: padding and EOS are where decoders err
        st.tuples(st.binary(max_size=20), st.binary(min_size=1, max_size=5)).map(
            lambda t: huffman_encode(t[0]) + t[1]
        ),
        st.binary(max_size=20).map(lambda b: huffman_encode(b)[:-1]),
    )
)
@example(b"\xff\xff\xff\xfc")  # EOS (30 one-bits) with 2 of padding
@example(b"\x1f\xff")  # 'a' and 11 bits of padding
@example(b"\x00")  # '0' and 3 zero bits: padding must be ones
@example(b"\x1f\xff\xff\xff\xff")  # 'a', then EOS, completed in a high nibble
def test_huffman_decoding_of_arbitrary_bytes_is_the_rfcs_or_hpack_error(data):
    expected = huffman_reference(data)
    try:
        got = huffman_decode(data)
    except HpackError:
        got = None
    assert got == expected


# HPACK blocks from libnghttp2's encoder.

NAMES = [b":path", b":method", b"content-type", b"te", b"x-a", b"x-b", b"grpc-timeout", b"cookie"]
headers = st.tuples(
    st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=12)),
    st.one_of(
        st.binary(max_size=40),  # every byte value, Huffman-coded or not as nghttp2 likes
        st.sampled_from([b"", b"POST", b"/", b"gzip, deflate", b"application/grpc"]),
        st.text("aeiou0123 /-", max_size=60).map(str.encode),  # Huffman wins
        st.integers(300, 3000).map(lambda n: bytes(i * 7 % 256 for i in range(n))),  # long
    ),
    st.booleans(),  # never indexed
)
blocks = st.tuples(
    st.one_of(st.none(), st.sampled_from([0, 1, 40, 64, 256, 1000, 4096, 8192])),  # new size
    st.one_of(st.lists(headers, max_size=10), st.none()),  # None: the previous list again
)


@needs_nghttp2
@fuzz(150)
@given(st.lists(blocks, min_size=1, max_size=8))
def test_what_libnghttp2_encodes_decodes_to_the_same_fields(script):
    """Over one connection's blocks: the same lists, and the dynamic table in step with
    the encoder's own (entries, size), through indexing, eviction and size updates."""
    deflater, decoder = h2fuzz.Deflater(), Decoder(max_list_size=1 << 30)
    previous: list = []
    for size, fields in script:
        if size is not None:
            deflater.change_table_size(size)
        fields = previous if fields is None else fields
        previous = fields
        listed = [(name, value) for name, value, _ in fields]
        block = deflater.encode(listed, [never for _, _, never in fields])
        assert decoder.decode(block)[0] == text(listed)
        assert list(decoder.table) == text(deflater.table())
        assert decoder.size == deflater.table_size()
        h2fuzz.check_decoder(decoder)


# HPACK blocks from the grammar (RFC 7541 6), honest and mangled.


def _string(data: bytes, huffman: bool, lie: int) -> bytes:
    body = huffman_encode(data) if huffman else data
    return h2.integer(max(len(body) + lie, 0), 7, 0x80 if huffman else 0) + body


strings = st.builds(
    _string,
    st.one_of(st.binary(max_size=12), st.sampled_from([b"", b":path", b"/", b"x-a"])),
    st.booleans(),
    st.sampled_from([0, 0, 0, 0, 1, -1, 100]),  # a length that lies, now and then
)
indexes = st.one_of(st.integers(0, 70), st.sampled_from([127, 1 << 20, (1 << 32) - 1]))


def _literal(first: int, prefix: int, index: int, name: bytes, value: bytes) -> bytes:
    return h2.integer(index, prefix, first) + (b"" if index else name) + value


representations = st.one_of(
    st.builds(h2.integer, indexes, st.just(7), st.just(0x80)),  # indexed
    st.builds(_literal, st.just(0x40), st.just(6), indexes, strings, strings),  # indexing
    st.builds(_literal, st.just(0x00), st.just(4), indexes, strings, strings),  # without
    st.builds(_literal, st.just(0x10), st.just(4), indexes, strings, strings),  # never
    st.builds(  # dynamic table size update
        h2.integer,
        st.one_of(st.integers(0, 4200), st.just(1 << 30)),
        st.just(5),
        st.just(0x20),
    ),
    st.binary(min_size=1, max_size=4),  # garbage
)
grammar_blocks = st.one_of(
    st.lists(representations, max_size=6).map(b"".join),
    st.lists(representations, min_size=1, max_size=6).map(b"".join).map(lambda b: b[:-1]),
)


@needs_nghttp2
@fuzz(300)
@given(st.lists(grammar_blocks, min_size=1, max_size=4))
@example([b"\x3f\xe1\x1f\x82", b"\x40\x01a\x01b\xbe"])  # size update to 4096, then index 62
@example([b"\x82\x20"])  # a size update after a field
@example([b"\xff\x80\x80\x80\x80\x80\x01"])  # an index in 6 continuation bytes
def test_blocks_decode_as_libnghttp2_decodes_them(script):
    """Our decoder and libnghttp2's, block after block: the same fields, or both refuse
    the same block (a COMPRESSION_ERROR, after which the connection is gone)."""
    decoder, inflater = Decoder(max_list_size=1 << 30), h2fuzz.Inflater()
    for block in script:
        theirs = inflater.decode(block)
        try:
            ours = text_bytes(decoder.decode(block)[0])
        except HpackError:
            ours = None
        h2fuzz.check_decoder(decoder)
        assert ours == theirs, f"block {block!r}"
        if ours is None:
            break


def text_bytes(fields: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields]


@fuzz(300)
@given(
    st.lists(st.one_of(grammar_blocks, st.binary(max_size=60)), min_size=1, max_size=4),
    st.sampled_from([100, 1024, 65536]),
)
@example([b"\xff\x80\x80\x80\x80\x80\x01"], 65536)  # an integer too long
def test_any_bytes_decode_or_raise_hpack_error_and_the_decoder_stays_usable(script, limit):
    """Whatever the peer sends: fields (which the server's request check can judge) or
    HpackError, never another exception; the table's books stay right; and a block of
    static indexes still decodes after any error."""
    decoder = Decoder(max_list_size=limit, check=request_problem)
    for block in script:
        try:
            fields, problem = decoder.decode(block)
        except HpackError:
            pass
        else:
            assert all(isinstance(n, str) and isinstance(v, str) for n, v in fields)
            assert problem is None or isinstance(problem, str)
            assert sum(len(n) + len(v) + 32 for n, v in fields) <= limit
        h2fuzz.check_decoder(decoder)
    assert decoder.decode(b"\x83\x84")[0] == [(":method", "POST"), (":path", "/")]


# The frame layer.

WILD_IDS = st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF, 0x80000001])
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a")]
FIELDS = [
    *REQUEST,
    (b":method", b"GET"),
    (b":path", b""),
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"te", b"gzip"),
    (b"content-length", b"0"),
    (b"content-length", b"7"),
    (b"content-length", b"x"),
    (b"connection", b"close"),
    (b"x-a", b"b"),
    (b"X-Up", b"b"),
    (b"x-sp", b" v"),
    (b"x-nul", b"a\0b"),
    (b"", b""),
    (b"grpc-status", b"0"),
    (b"x-big", b"v" * 600),
]
_STATIC = {(n.encode(), v.encode()): i + 1 for i, (n, v) in reversed(list(enumerate(STATIC_TABLE)))}
_STATIC_NAMES = {n.encode(): i + 1 for i, (n, _) in reversed(list(enumerate(STATIC_TABLE)))}


def field_encoding(draw, name: bytes, value: bytes) -> bytes:
    """One field as any representation that carries it (RFC 7541 6)."""
    how = draw(st.sampled_from(["without", "static", "name", "indexing", "never"]))
    if not draw(st.integers(0, 15)):
        how = "dynamic"
    huffman = draw(st.booleans())
    if how == "static" and (name, value) in _STATIC:
        return h2.integer(_STATIC[name, value], 7, 0x80)
    if how == "name" and name in _STATIC_NAMES:
        return h2.integer(_STATIC_NAMES[name], 4) + _string(value, huffman, 0)
    if how == "dynamic":  # whatever the table holds there, if anything
        return h2.integer(draw(st.integers(62, 65)), 7, 0x80)
    first = {"indexing": 0x40, "never": 0x10}.get(how, 0x00)
    return bytes((first,)) + _string(name, huffman, 0) + _string(value, huffman, 0)


def header_block(draw) -> bytes:
    kind = draw(st.sampled_from(["request", "request", "request", "fields", "trailers"]))
    if not draw(st.integers(0, 15)):
        kind = "raw"
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=16), grammar_blocks))
    if kind == "request":
        fields = REQUEST[: draw(st.integers(3, 4))] + draw(
            st.lists(st.sampled_from(FIELDS[7:]), max_size=3)
        )
    elif kind == "trailers":
        fields = draw(st.sampled_from([[(b"grpc-status", b"0")], [(b":path", b"/")], []]))
    else:
        fields = draw(st.lists(st.sampled_from(FIELDS), max_size=8))
    block = b"".join(field_encoding(draw, name, value) for name, value in fields)
    if not draw(st.integers(0, 9)):
        block = h2.integer(draw(st.sampled_from([0, 100, 4096, 4097])), 5, 0x20) + block
    return block


def _pad(payload: bytes, pad: int | None) -> bytes:
    """PADDED's payload: its length byte, the data, the padding (300: a length that lies)."""
    if pad is None:
        return payload
    return bytes((pad % 256,)) + payload + bytes(pad if pad < 256 else 0)


def headers_frames(draw, stream: int, wild: bool) -> bytes:
    block = header_block(draw)
    flags = h2.END_HEADERS | draw(st.sampled_from([0, h2.END_STREAM]))
    if draw(st.integers(0, 3)) == 0:
        flags |= draw(st.sampled_from([h2.PADDED, h2.PRIORITY_FLAG, 0xC2 if wild else 0]))
    if flags & h2.PRIORITY_FLAG:
        depends = draw(st.sampled_from([0, 1, 3, stream])) | draw(st.sampled_from([0, 1 << 31]))
        block = struct.pack(">IB", depends, 15) + block
    pad = draw(st.sampled_from([0, 5, 300] if wild else [0, 5])) if flags & h2.PADDED else None
    split = draw(st.sampled_from([0, 0, 0, 1, 3]))
    if not split or len(block) < 2:
        return h2.frame(h2.HEADERS, flags, stream, _pad(block, pad))
    # the block in pieces: HEADERS without END_HEADERS, then CONTINUATIONs
    cuts = sorted(set(draw(st.lists(st.integers(1, len(block) - 1), min_size=1, max_size=split))))
    pieces = [block[a:b] for a, b in zip([0, *cuts], [*cuts, len(block)], strict=True)]
    out = h2.frame(h2.HEADERS, flags & ~h2.END_HEADERS, stream, _pad(pieces[0], pad))
    for i, piece in enumerate(pieces[1:], 2):
        last = h2.END_HEADERS if i == len(pieces) else 0
        out += h2.frame(h2.CONTINUATION, last, stream, piece)
    return out


data_payloads = st.one_of(
    st.binary(max_size=6).map(h2.grpc_message),
    st.binary(max_size=12),
    st.sampled_from([0, 100, 8000, 16384]).map(bytes),
)
# SETTINGS the RFC allows (key, value), then ones it does not
GOOD_SETTINGS = st.one_of(
    st.tuples(st.just(4), st.sampled_from([65535, 0, 1, 100, 1 << 20, (1 << 31) - 1])),
    st.tuples(st.just(5), st.sampled_from([16384, 65535, (1 << 24) - 1])),
    st.tuples(st.sampled_from([1, 3, 6, 8, 0xFF]), st.sampled_from([0, 1, 4096, (1 << 32) - 1])),
    st.tuples(st.just(2), st.sampled_from([0, 1])),
)
BAD_SETTINGS = st.sampled_from([(2, 2), (4, 1 << 31), (5, 16383), (5, 1 << 24)])


def settings_payload(draw, wild: bool) -> bytes:
    pairs = draw(
        st.lists(st.one_of(GOOD_SETTINGS, BAD_SETTINGS) if wild else GOOD_SETTINGS, max_size=3)
    )
    return b"".join(struct.pack(">HI", key, value) for key, value in pairs)


INCREMENTS = [1, 100, 65535, 1 << 20, (1 << 31) - 1, 0, 1 << 31 | 1]
ERRORS = [struct.pack(">I", code) for code in (8, 0, 1, 2, 7, 11, 0xFF)]  # RST, GOAWAY
KINDS = ["call", "upload", "headers", "data", "window", "ping", "settings", "rst", "priority"]
KINDS += ["goaway"]
WILD_KINDS = [*KINDS, "unknown", "continuation", "push", "raw"]


@st.composite
def peer_frames(draw) -> bytes:
    """What a peer sends after its preface: mostly frames a client would send, HEADERS
    opening streams in order, the rest on the streams it opened (so that states
    collide); one in twenty wild (any type, any stream id, bad lengths and values)."""
    out, opened, next_id = [], [], 1
    for _ in range(draw(st.integers(0, 24))):
        wild = draw(st.integers(0, 20)) == 10
        kind = draw(st.sampled_from(WILD_KINDS if wild else KINDS))
        if not opened and not wild and kind in ("data", "rst", "window"):
            kind = "call"  # on an idle stream these end the connection: leave that to wild ones
        if wild:
            stream = draw(WILD_IDS)
        elif kind in ("call", "upload", "headers") and (not opened or draw(st.integers(0, 7))):
            stream, next_id = next_id, next_id + 2
            opened.append(stream)
        elif opened:  # the stream opened last, mostly
            stream = opened[-1] if draw(st.booleans()) else draw(st.sampled_from(opened))
        else:
            stream = 1
        if kind == "call":
            body = h2.grpc_message(draw(st.binary(max_size=4)))
            out.append(
                h2.frame(h2.HEADERS, h2.END_HEADERS, stream, h2.request_block("/x"))
                + h2.frame(h2.DATA, h2.END_STREAM, stream, body)
            )
        elif kind == "upload":  # a body in DATA frames, ended or not, maybe by trailers
            out.append(h2.frame(h2.HEADERS, h2.END_HEADERS, stream, h2.request_block("/x")))
            sizes = draw(st.lists(st.sampled_from([5, 1000, 16384]), min_size=1, max_size=6))
            end = draw(st.sampled_from(["data", "trailers", "open"]))
            for i, size in enumerate(sizes, 1):
                last = h2.END_STREAM if end == "data" and i == len(sizes) else 0
                out.append(h2.frame(h2.DATA, last, stream, bytes(size)))
            if end == "trailers":
                trailers = h2.literal(b"grpc-status", b"0")
                out.append(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream, trailers))
        elif kind == "headers":
            out.append(headers_frames(draw, stream, wild))
        elif kind == "data":
            pad = draw(st.sampled_from([None, None, 0, 4, 300] if wild else [None, None, 3]))
            flags = draw(st.sampled_from([0, h2.END_STREAM])) | (0 if pad is None else h2.PADDED)
            out.append(h2.frame(h2.DATA, flags, stream, _pad(draw(data_payloads), pad)))
        elif kind == "window":
            increment = draw(st.sampled_from(INCREMENTS[-2:] if wild else INCREMENTS[:-2]))
            payload = struct.pack(">I", increment)
            on = stream if draw(st.booleans()) else 0
            out.append(h2.frame(h2.WINDOW_UPDATE, 0, on, payload[:3] if wild else payload))
        elif kind == "ping":
            data = draw(st.binary(min_size=8, max_size=8) if not wild else st.binary(max_size=9))
            ack = draw(st.sampled_from([0, h2.ACK]))
            out.append(h2.frame(h2.PING, ack, stream if wild else 0, data))
        elif kind == "settings":
            ack = draw(st.integers(0, 3)) == 0
            payload = b"" if ack and not wild else settings_payload(draw, wild)
            out.append(h2.frame(h2.SETTINGS, h2.ACK if ack else 0, stream if wild else 0, payload))
        elif kind == "rst":
            code = draw(st.sampled_from(ERRORS))
            out.append(h2.frame(h2.RST_STREAM, 0, stream, code[:3] if wild else code))
        elif kind == "priority":
            payload = struct.pack(">IB", draw(st.sampled_from([0, 1, 3, stream])), 0)
            out.append(h2.frame(h2.PRIORITY, 0, stream, payload[:4] if wild else payload))
        elif kind == "goaway":
            last = struct.pack(">I", draw(st.sampled_from([0, 1, stream])))
            payload = last + draw(st.sampled_from(ERRORS)) + b"bye"
            out.append(
                h2.frame(h2.GOAWAY, 0, stream if wild else 0, payload[:7] if wild else payload)
            )
        elif kind == "unknown":
            kind_byte, flags = draw(st.integers(10, 255)), draw(st.integers(0, 255))
            out.append(h2.frame(kind_byte, flags, stream, draw(st.binary(max_size=8))))
        elif kind == "continuation":
            flags = draw(st.sampled_from([0, h2.END_HEADERS]))
            out.append(h2.frame(h2.CONTINUATION, flags, stream, header_block(draw)))
        elif kind == "push":
            out.append(h2.frame(h2.PUSH_PROMISE, h2.END_HEADERS, stream, b"\0\0\0\2"))
        else:
            out.append(draw(st.binary(min_size=1, max_size=12)))
    return b"".join(out)


answers = st.builds(
    Answer,
    st.sampled_from([None, None, 0.0, 0.5, 5.0, -1.0]),
    st.sampled_from([0, 0, 3, 20000, 100000]),
    st.booleans(),
    st.sampled_from(["request", "request", "opened", "stream"]),
)
events = st.one_of(
    st.sampled_from(["tick", 0.5, 1.5, "sweep"]),
    st.sampled_from(["goaway", 11.0, 31.0, 301.0]),  # drains, timeouts: the end of it
)


@st.composite
def scenarios(draw) -> Scenario:
    """A peer's bytes, cut into data_received calls with events between them."""
    preface = draw(st.integers(0, 40))
    preface = {10: "no settings", 20: "bad", 30: "raw"}.get(preface, "good")
    if preface == "raw":
        head = draw(st.binary(max_size=30))
    elif preface == "bad":
        head = h2.PREFACE[:-1] + b"!" + h2.settings()
    elif preface == "no settings":
        head = h2.PREFACE + h2.frame(h2.PING, 0, 0, b"pingpong")
    else:
        head = h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, settings_payload(draw, False))
        if draw(st.booleans()):
            head += h2.frame(h2.SETTINGS, h2.ACK, 0)
    data = head + draw(peer_frames())
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=6))))
    steps: list = []
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        if data[start:stop]:
            steps.append(data[start:stop])
        steps += draw(st.lists(events, max_size=2))
    return Scenario(
        steps=steps,
        limits=draw(st.sampled_from(["default", "tight"])),
        max_body=draw(st.sampled_from([1 << 20, 1 << 20, 100])),
        answers=draw(st.lists(answers, min_size=1, max_size=4)),
        can_eof=draw(st.booleans()),
        pool=draw(st.sampled_from([1 << 20, 70000])),
    )


@fuzz(500)
@given(scenarios())
def test_the_frame_layer_writes_well_formed_http2_and_keeps_its_books(scenario):
    """data_received never raises and no bug becomes GOAWAY INTERNAL_ERROR; every write is
    whole frames of types, sizes and streams RFC 9113 allows, answers only on streams
    the peer opened and never after their END_STREAM nor above a GOAWAY's last stream
    id, DATA within the windows the peer gave, nothing after close(); between any two
    events: no more streams than advertised, every stream's held bytes >= 0 and the
    connection's >= their sum, the receive window >= 0 and equal to the window less
    what is uncredited, and the receive pool's credit all accounted for (all back once
    the connection is gone)."""
    h2fuzz.check_wire(h2fuzz.run(scenario))


PREFACE = h2.PREFACE + h2.settings()
HEAD = h2.frame(h2.HEADERS, h2.END_HEADERS, 1, h2.request_block("/x"))
HEAD_END = h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, h2.request_block("/x"))


# Found here: trailing HEADERS whose priority names the stream itself drop the stream
# (endpoint._header_block pops it) without release(): its body bytes stay in connection.held and
# uncredited for the connection's life
@fuzz(100)
@given(scenarios())
@example(
    Scenario(
        [
            PREFACE
            + HEAD
            + h2.frame(h2.DATA, 0, 1, b"abc")
            + h2.frame(
                h2.HEADERS,
                h2.END_HEADERS | h2.END_STREAM | h2.PRIORITY_FLAG,
                1,
                struct.pack(">IB", 1, 0),
            )
        ]
    )
)
def test_body_bytes_held_belong_to_open_streams(scenario):
    """connection.held is what its open streams hold, between any two events."""
    h2fuzz.run(scenario, held=True)


# Found here: DATA on a stream whose request has ended (half-closed remote) is answered
# RST_STREAM(STREAM_CLOSED) but the stream stays open: its handler's answer then goes out on the
# reset stream
@fuzz(100)
@given(scenarios())
@example(Scenario([PREFACE + HEAD_END + h2.frame(h2.DATA, 0, 1, b"x")], answers=[Answer(0.5)]))
def test_nothing_is_sent_on_a_stream_after_we_reset_it(scenario):
    h2fuzz.check_closed_streams(h2fuzz.run(scenario))


@fuzz(60)
@given(scenarios())
@example(  # a handler answers during the linger
    Scenario([PREFACE + HEAD_END + h2.frame(h2.PING, 0, 1, b"pingpong")], answers=[Answer(0.5)])
)
@example(  # Listener.stop() during the linger
    Scenario([PREFACE + h2.frame(h2.PING, 0, 1, b"pingpong"), "goaway"])
)
def test_nothing_is_written_after_a_connection_errors_goaway(scenario):
    """Found here: a lingering connection still wrote (late answers, sweep()'s
    RST_STREAMs, goaway()'s GOAWAY, pool WINDOW_UPDATEs), which asyncio's and uvloop's
    transports refuse with RuntimeError after write_eof() (goaway(): synchronously, out
    of Listener.stop). Endpoint.write now drops what comes while lingering."""
    h2fuzz.check_quiet_after_goaway(h2fuzz.run(scenario))


# Found here: DATA still in flight on a stream we reset (an early answer, a body over max_body, a
# refused stream) draws another RST_STREAM(STREAM_CLOSED) and spends the empty_frame budget,
# where RFC 9113 5.1 says to ignore it: enough oversized calls cost a well-behaved client its
# connection (GOAWAY ENHANCE_YOUR_CALM)
@fuzz(100)
@given(scenarios())
@example(  # a body over max_body: answered, reset NO_ERROR; then the rest of it arrives
    Scenario(
        [PREFACE + HEAD + h2.frame(h2.DATA, 0, 1, bytes(200)) + h2.frame(h2.DATA, 0, 1, b"x")],
        max_body=100,
    )
)
def test_frames_in_flight_on_a_stream_we_reset_are_ignored(scenario):
    h2fuzz.check_resets_are_final(h2fuzz.run(scenario))


# Found here: ServerConnection.on_headers sets last_stream before it refuses a stream opened
# after our GOAWAY, so a later GOAWAY (a connection error's) names a higher last stream id than
# the first did (RFC 9113 6.8: MUST NOT increase)
@fuzz(100)
@given(scenarios())
@example(
    Scenario(
        [
            PREFACE + HEAD,
            "goaway",  # GOAWAY(last 1): stream 1 is still open
            h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 3, h2.request_block("/x"))
            + h2.frame(h2.PING, 0, 1, b"pingpong"),  # refused; then a connection error
        ]
    )
)
def test_goaways_never_name_a_higher_last_stream(scenario):
    h2fuzz.check_goaway_last_stream(h2fuzz.run(scenario))


# Coverage-guided, under atheris (pip install atheris), in subprocesses.

LAUNCH = """
import sys
import atheris
with atheris.instrument_imports(include=["coalesce.http2"]):
    import coalesce.http2.endpoint, coalesce.http2.hpack, coalesce.http2.server
from tests.support import h2fuzz
h2fuzz.fuzz(sys.argv[1], sys.argv[2:])
"""
SEEDS = {
    "hpack": [b"\x82\x86\x84\x41\x0fwww.example.com", b"\x40\x01a\x01b\xff\xbe", b"\x3f\xe1\x1f"],
    "frames": [
        b"\x00" + HEAD + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(b"hi")),
        b"\x05" + HEAD_END + h2.frame(h2.PING, 0, 0, b"pingpong") + b"\xfe\xfe" + HEAD_END,
        b"\x0d" + h2.settings((4, 0)) + HEAD_END + h2.frame(h2.WINDOW_UPDATE, 0, 1, b"\0\0\1\0"),
    ],
}
ATHERIS_S = int(os.environ.get("COALESCE_ATHERIS_S", "8"))


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="needs atheris (pip install atheris)"
)
@pytest.mark.timeout(ATHERIS_S * 3 + 60)
def test_atheris_finds_no_crash(tmp_path):
    """Both targets at once (one core each), `ATHERIS_S` seconds, seeded: the HPACK
    decoder raises only HpackError, keeps its table's books and agrees with libnghttp2
    (h2fuzz.hpack_one_input); no bug escapes the frame layer (data_received, loop
    callbacks, GOAWAY INTERNAL_ERROR), its books balance and its wire is right
    (h2fuzz.frames_one_input). A crash fails the test with its input in the output."""
    runs, path = {}, os.environ.get("PYTHONPATH", "")
    for target, seeds in SEEDS.items():
        corpus = tmp_path / target
        corpus.mkdir()
        for i, seed in enumerate(seeds):
            (corpus / f"seed{i}").write_bytes(seed)
        runs[target] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                target,
                f"-max_total_time={ATHERIS_S}",
                "-seed=1",
                "-max_len=2048",
                "-timeout=10",
                f"-artifact_prefix={tmp_path}/{target}-",
                str(corpus),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), path]))},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    for target, process in runs.items():
        output = process.communicate(timeout=ATHERIS_S * 3 + 30)[0].decode(errors="replace")
        crashes = sorted(p.name for p in tmp_path.glob(f"{target}-*"))
        assert process.returncode == 0 and not crashes, (
            f"atheris {target}: exit {process.returncode}, {crashes}\n{output[-4000:]}"
        )
