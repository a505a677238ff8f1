"""Hand-written protobuf encoding for the one message on the hot path.

Building a ModelInferResponse through upb objects costs more than the answer's
bytes themselves; the parts that repeat (model name, output names, datatypes,
shapes) are encoded once and cached, and each answer is one `b"".join`.
Only length-delimited fields and packed varints are needed.
"""

from __future__ import annotations

from functools import lru_cache


def varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


@lru_cache(maxsize=64)
def key(field: int) -> bytes:
    """The key of a length-delimited field (wire type 2)."""
    return varint(field << 3 | 2)


def delimited(field: int, payload: bytes) -> bytes:
    return key(field) + varint(len(payload)) + payload


def prefix(field: int, size: int) -> bytes:
    """Key and length of a length-delimited field whose payload is joined on later."""
    return key(field) + varint(size)


@lru_cache(maxsize=4096)
def output_tensor(field: int, name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """A KServe InferOutputTensor {1: name, 2: datatype, 3: packed shape} as a field."""
    dims = b"".join(varint(d) for d in shape)
    body = delimited(1, name.encode()) + delimited(2, datatype.encode()) + delimited(3, dims)
    return delimited(field, body)


@lru_cache(maxsize=1024)
def strings(*fields: tuple[int, str]) -> bytes:
    """Several string fields, skipping empty ones as proto3 does."""
    return b"".join(delimited(f, s.encode()) for f, s in fields if s)
