"""HPACK decoding (coalesce.http2.hpack) against a real encoder: libnghttp2's, through ctypes.

gRPC clients (tritonclient, grpcio) encode through the same RFC; test_kserve_grpc and
test_http2_grpc cover them end to end. Here: random header lists, every byte value
through Huffman coding, table eviction and size updates, and malformed blocks.
"""

from __future__ import annotations

import random

import pytest
from coalesce.http2.hpack import STATIC_TABLE, Decoder, HpackError, huffman_decode

from tests.support.h2fuzz import LIB, Deflater

pytestmark = pytest.mark.skipif(LIB is None, reason="needs libnghttp2 (make test installs it)")
Encoder = Deflater  # libnghttp2's HPACK encoder (tests/support/h2fuzz.py)


GRPC = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def text(headers):
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


def test_random_header_lists_decode_as_sent_while_the_table_fills_and_evicts():
    rng = random.Random(7)
    encoder, decoder = Encoder(), Decoder()
    for _ in range(1500):
        headers = list(GRPC)
        for _ in range(rng.randrange(6)):
            name = b"x-" + bytes(rng.choice(b"abcdefghij-") for _ in range(rng.randrange(1, 12)))
            headers.append((name, bytes(rng.randrange(256) for _ in range(rng.randrange(60)))))
        block = encoder.encode(headers, never=[rng.random() < 0.3] * len(headers))
        assert decoder.decode(block)[0] == text(headers)
    assert decoder.size <= 4096 and len(decoder.table) > 10


def test_every_byte_value_survives_huffman_coding():
    encoder, decoder = Encoder(), Decoder()
    for symbol in range(256):
        value = bytes([symbol]) * 3 + b"eeeeeeeeeeeeeeeeeeeeeeee" + bytes([symbol])  # Huffman wins
        assert decoder.decode(encoder.encode([(b"x-v", value)]))[0] == text([(b"x-v", value)])


def test_a_repeated_block_is_served_from_the_cache_until_the_table_changes():
    encoder, decoder = Encoder(), Decoder()
    decoder.decode(encoder.encode(GRPC))
    block = encoder.encode(GRPC)
    first = decoder.decode(block)[0]
    assert decoder.decode(block)[0] is first  # the same list object: no decoding done
    decoder.decode(encoder.encode([(b"x-new", b"entry")]))  # adds to the dynamic table
    assert decoder.decode(block)[0] is not first


def test_table_size_updates_are_followed():
    encoder, decoder = Encoder(), Decoder()
    decoder.decode(encoder.encode([*GRPC, (b"x-a", b"1" * 100)]))
    encoder.change_table_size(64)
    block = encoder.encode(GRPC)
    assert block[0] & 0xE0 == 0x20  # the block opens with the size update
    assert decoder.decode(block)[0] == text(GRPC)
    assert decoder.capacity == 64 and decoder.size <= 64


def test_the_static_table_has_its_61_entries():
    assert len(STATIC_TABLE) == 61
    assert STATIC_TABLE[1] == (":method", "GET") and STATIC_TABLE[60] == ("www-authenticate", "")


@pytest.mark.parametrize(
    "block",
    [
        b"\xbf",  # index 63: the dynamic table is empty
        b"\xfe",  # index 126: not in the table
        b"\x00\x85abc",  # a string longer than the block
        b"\x3f\xe2\x1f",  # a size update to 4097, above our limit
        b"\x00\x01a\x81\x00",  # Huffman value: 8 zero bits is no code, and bad padding
        b"\x80",  # index 0
    ],
)
def test_malformed_blocks_raise_hpack_error(block):
    with pytest.raises(HpackError):
        Decoder().decode(block)


def test_huffman_padding_longer_than_7_bits_is_refused():
    assert huffman_decode(b"\x1f") == b"a"  # 'a' is 00011, then 111 padding
    with pytest.raises(HpackError):
        huffman_decode(b"\x1f\xff")  # 11 bits of padding
