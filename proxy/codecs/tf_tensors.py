"""TensorFlow tensors (`tensorflow.TensorProto`) <-> numpy, and the TF <-> KServe type table.

Every front end reaches every backend, so a tensor changes protocol on the way:
the table below says, for each TF dtype, the KServe datatype, the numpy dtype and
the typed `*_val` field that carries it, and nothing is ever cast silently. A TF
dtype without a KServe twin (complex) keeps its numpy dtype and fails, naming the
tensor, only at a backend that cannot take it (`tensors.datatype_of`).

TensorProto carries values either as `tensor_content` (raw little-endian bytes;
for DT_STRING, TF's varint-length list) or in one typed field. For the typed
fields TF's rule is that one value fills the whole shape; unlike TF, any other
count that does not match the shape is an error here, not padded with the last
value, because it is almost always a client bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
from coalesce.core.tensors import BF16, check_dims
from coalesce.errors import InvalidArgument, TooLarge

from . import protowire, wire


@dataclass(frozen=True, slots=True)
class TFType:
    """One TF dtype: its enum value, KServe datatype (None: none), numpy dtype, typed field."""

    name: str
    enum: int
    kserve: str | None
    dtype: np.dtype
    field: str


TF_TYPES: tuple[TFType, ...] = (
    TFType("DT_FLOAT", 1, "FP32", np.dtype("<f4"), "float_val"),
    TFType("DT_DOUBLE", 2, "FP64", np.dtype("<f8"), "double_val"),
    TFType("DT_INT32", 3, "INT32", np.dtype("<i4"), "int_val"),
    TFType("DT_UINT8", 4, "UINT8", np.dtype("<u1"), "int_val"),
    TFType("DT_INT16", 5, "INT16", np.dtype("<i2"), "int_val"),
    TFType("DT_INT8", 6, "INT8", np.dtype("<i1"), "int_val"),
    TFType("DT_STRING", 7, "BYTES", np.dtype(object), "string_val"),
    TFType("DT_COMPLEX64", 8, None, np.dtype("<c8"), "scomplex_val"),
    TFType("DT_INT64", 9, "INT64", np.dtype("<i8"), "int64_val"),
    TFType("DT_BOOL", 10, "BOOL", np.dtype(np.bool_), "bool_val"),
    TFType("DT_BFLOAT16", 14, "BF16", BF16, "half_val"),
    TFType("DT_UINT16", 17, "UINT16", np.dtype("<u2"), "int_val"),
    TFType("DT_COMPLEX128", 18, None, np.dtype("<c16"), "dcomplex_val"),
    TFType("DT_HALF", 19, "FP16", np.dtype("<f2"), "half_val"),
    TFType("DT_UINT32", 22, "UINT32", np.dtype("<u4"), "uint32_val"),
    TFType("DT_UINT64", 23, "UINT64", np.dtype("<u8"), "uint64_val"),
)
BY_ENUM = {t.enum: t for t in TF_TYPES}
BY_KSERVE = {t.kserve: t for t in TF_TYPES if t.kserve}
_BY_DTYPE = {t.dtype: t for t in TF_TYPES if t.enum != 7}
DT_STRING = BY_ENUM[7]
TYPED_FIELDS = frozenset(t.field for t in TF_TYPES)
# Fixed-width typed fields: written as one packed field built from the array's bytes.
_PACKED = {"float_val": 5, "double_val": 6, "scomplex_val": 9, "dcomplex_val": 12}
_LARGE = 256  # elements from which the packed-bytes paths beat per-value conversion
_INT_RANGE = {t.dtype: np.iinfo(t.dtype) for t in TF_TYPES if t.field == "int_val"}
MAX_FILL_BYTES = 64 << 20  # one value fills at most what a default-sized message carries


def tf_type(enum: int, tensor: str) -> TFType:
    kind = BY_ENUM.get(enum)
    if kind is None:
        supported = ", ".join(t.name for t in TF_TYPES)
        raise InvalidArgument(
            f"tensor '{tensor}': dtype {_enum_name(enum)} is not supported (supported: {supported})"
        )
    return kind


def _enum_name(enum: int) -> str:
    value = wire.DataType.values_by_number
    return value[enum].name if enum in value else str(enum)


def type_of_array(array: np.ndarray, tensor: str) -> TFType:
    """The TF dtype for an array; an array TF cannot carry is an error, never a cast."""
    kind = array.dtype.kind
    if kind in "SUO":
        return DT_STRING
    dtype = array.dtype.newbyteorder("<") if kind in "iufc" else array.dtype
    found = _BY_DTYPE.get(dtype)
    if found is None:
        raise InvalidArgument(f"tensor '{tensor}': dtype {array.dtype} has no TensorFlow dtype")
    return found


def kserve_to_tf(datatype: str) -> int:
    """The DataType enum for a KServe datatype (DT_INVALID for one TF lacks)."""
    kind = BY_KSERVE.get(datatype)
    return kind.enum if kind else 0


def shape_of(proto: Any, tensor: str) -> tuple[int, ...]:
    shape = proto.tensor_shape
    if shape.unknown_rank:
        raise InvalidArgument(f"tensor '{tensor}': tensor_shape has unknown_rank set")
    return check_dims(tuple(d.size for d in shape.dim), tensor)


def to_array(proto: Any, tensor: str) -> np.ndarray:
    """A TensorProto as an array: every problem is INVALID_ARGUMENT naming the tensor."""
    kind = tf_type(proto.dtype, tensor)
    shape = shape_of(proto, tensor)
    if proto.tensor_content:
        return _from_content(proto.tensor_content, kind, shape, tensor)
    return _from_values(proto, kind, shape, tensor)


def _from_content(content: bytes, kind: TFType, shape: tuple[int, ...], tensor: str) -> np.ndarray:
    count = prod(shape)
    if kind is DT_STRING:
        return _decode_strings(content, count, tensor).reshape(shape)
    need = count * kind.dtype.itemsize
    if len(content) != need:
        raise InvalidArgument(
            f"tensor '{tensor}': tensor_content has {len(content)} bytes, "
            f"shape {list(shape)} of {kind.name} needs {need}"
        )
    return np.frombuffer(content, dtype=kind.dtype).reshape(shape)


def _decode_strings(content: bytes, count: int, tensor: str) -> np.ndarray:
    """TF's string list encoding: `count` varint lengths, then the strings back to back."""
    lengths, pos = [], 0
    try:
        for _ in range(count):
            length, pos = _varint(content, pos)
            lengths.append(length)
    except IndexError:
        raise InvalidArgument(f"tensor '{tensor}': DT_STRING tensor_content is truncated") from None
    if pos + sum(lengths) != len(content):
        raise InvalidArgument(
            f"tensor '{tensor}': DT_STRING tensor_content has {len(content) - pos} bytes of "
            f"data, its lengths say {sum(lengths)}"
        )
    items = []
    for length in lengths:
        items.append(content[pos : pos + length])
        pos += length
    return _objects(items)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _objects(items: Any) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def _from_values(proto: Any, kind: TFType, shape: tuple[int, ...], tensor: str) -> np.ndarray:
    for field, _ in proto.ListFields():
        if field.name in TYPED_FIELDS and field.name != kind.field:
            raise InvalidArgument(
                f"tensor '{tensor}': {kind.name} values belong in {kind.field}, not {field.name}"
            )
    values = getattr(proto, kind.field)
    per = 2 if kind.dtype.kind == "c" else 1
    count, sent = prod(shape), len(values)
    if sent != count * per and not (sent == per and count > 0):
        raise InvalidArgument(
            f"tensor '{tensor}': {kind.field} holds {sent // per} values, shape {list(shape)} "
            f"needs {count} (or 1, which fills the shape)"
        )
    if sent != count * per and count * kind.dtype.itemsize > MAX_FILL_BYTES:
        raise TooLarge(
            f"tensor '{tensor}': filling shape {list(shape)} from one value makes "
            f"{count * kind.dtype.itemsize} bytes, over the {MAX_FILL_BYTES} allowed"
        )
    flat = _convert(proto, values, kind, tensor)
    if len(flat) != count:
        flat = np.broadcast_to(flat, (count,))
    return flat.reshape(shape)


def _convert(proto: Any, values: Any, kind: TFType, tensor: str) -> np.ndarray:
    if kind is DT_STRING:
        return _objects(values)
    if kind.field == "half_val":
        bits = _checked(values, np.dtype("<u2"), kind, tensor)
        return bits.view(kind.dtype)
    if kind.field in _PACKED:
        part = _part(kind.dtype)
        parts = _packed(proto, kind.field, part) if len(values) > _LARGE else None
        if parts is None:
            parts = np.fromiter(values, dtype=part, count=len(values))
        return parts.view(kind.dtype)
    if kind.dtype in _INT_RANGE and kind.dtype.itemsize < 4:
        return _checked(values, kind.dtype, kind, tensor)
    return np.fromiter(values, dtype=kind.dtype, count=len(values))


def _part(dtype: np.dtype) -> np.dtype:
    """What a packed field holds: the dtype itself, or a complex dtype's float halves."""
    return np.dtype(f"<f{dtype.itemsize // 2}") if dtype.kind == "c" else dtype


def _packed(proto: Any, field: str, dtype: np.dtype) -> np.ndarray | None:
    """A fixed-width packed field as a view of the serialized message: upb writes each
    packed field as one run of raw little-endian values, so no per-value Python work."""
    data, pos, number = proto.SerializeToString(), 0, _PACKED[field]
    while pos < len(data):
        key, pos = _varint(data, pos)
        kind = key & 7
        if kind == 2:
            length, pos = _varint(data, pos)
            if key >> 3 == number:
                return np.frombuffer(data, dtype=dtype, count=length // dtype.itemsize, offset=pos)
            pos += length
        elif kind == 0:
            pos = _varint(data, pos)[1]
        else:
            pos += {1: 8, 5: 4}.get(kind, len(data))
    return None


def _checked(values: Any, dtype: np.dtype, kind: TFType, tensor: str) -> np.ndarray:
    """Narrow integers from an int32 field: out of range is an error, not wrapped."""
    wide = np.asarray(values, dtype=np.int64)
    info = np.iinfo(dtype)
    if len(wide) and (wide.min() < info.min or wide.max() > info.max):
        raise InvalidArgument(
            f"tensor '{tensor}': {kind.field} values out of range for {kind.name} "
            f"({info.min}..{info.max})"
        )
    return wide.astype(dtype)


def fill_proto(proto: Any, array: np.ndarray, tensor: str, *, content: bool) -> None:
    """Write an array into an empty TensorProto: `tensor_content` when `content` (as
    tf.make_tensor_proto does), else the typed field (as TF Serving answers Predict)."""
    kind = type_of_array(array, tensor)
    proto.dtype = kind.enum
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if kind is DT_STRING:
        proto.string_val.extend(_as_bytes(item, tensor) for item in array.reshape(-1))
    elif content:
        proto.tensor_content = np.ascontiguousarray(array, dtype=kind.dtype).tobytes()
    elif kind.field in _PACKED:
        flat = np.ascontiguousarray(array, dtype=kind.dtype).reshape(-1).view(_part(kind.dtype))
        if flat.size > _LARGE:
            proto.MergeFromString(protowire.delimited(_PACKED[kind.field], flat.tobytes()))
        else:
            getattr(proto, kind.field).extend(flat.tolist())
    elif kind.field == "half_val":
        bits = np.ascontiguousarray(array, dtype=kind.dtype).view("<u2")
        proto.half_val.extend(bits.reshape(-1).tolist())
    else:
        getattr(proto, kind.field).extend(array.reshape(-1).tolist())


def _as_bytes(item: Any, tensor: str) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    raise InvalidArgument(
        f"tensor '{tensor}': a DT_STRING element is {type(item).__name__}, not bytes or str"
    )
