"""KServe v2 tensors <-> numpy arrays, without copies where the wire allows.

Raw contents become read-only `numpy.frombuffer` views of the request bytes;
BYTES tensors are object arrays of `bytes`; BF16 (which numpy lacks) travels as
a one-field structured dtype so it cannot be mistaken for UINT16.
"""

from __future__ import annotations

import struct
from math import prod

import numpy as np
from coalesce.errors import InvalidArgument

from .request import InferRequest, Tensors, TensorSpec

BF16 = np.dtype([("bf16", "<u2")])

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": BF16,
    "BYTES": np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Which InferTensorContents field carries each datatype (FP16 and BF16: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")
MAX_RANK = 32  # numpy 1.x's limit (2.x allows 64)
MAX_ELEMENTS = 2**31 - 1


def dtype_of(datatype: str, tensor: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise InvalidArgument(
            f"tensor '{tensor}': unknown datatype '{datatype}' "
            f"(expected one of {', '.join(DTYPES)})"
        ) from None


def datatype_of(array: np.ndarray, tensor: str) -> str:
    """The KServe datatype for an array; a dtype KServe cannot carry is an error, not a cast."""
    name = _NAMES.get(array.dtype)  # little-endian or byte-sized, as nearly all are
    if name is not None:
        return name
    kind = array.dtype.kind
    if kind in "SU":
        return "BYTES"
    name = _NAMES.get(array.dtype.newbyteorder("<") if kind in "iuf" else array.dtype)
    if name is None:
        raise InvalidArgument(f"tensor '{tensor}': dtype {array.dtype} has no KServe v2 datatype")
    return name


def check_shape(shape: list[int] | tuple[int, ...], tensor: str) -> tuple[int, ...]:
    if not shape:
        raise InvalidArgument(f"tensor '{tensor}': needs a batch dimension (shape is [])")
    return check_dims(shape, tensor)


def check_dims(shape: list[int] | tuple[int, ...], tensor: str) -> tuple[int, ...]:
    """Dimensions numpy can hold and a message can carry, refused before anything is
    allocated: no tensor of a 2 GiB message has 2**31 elements, even next to a 0."""
    dims = tuple(shape)
    smallest = min(dims, default=1)
    if smallest < 0:
        raise InvalidArgument(f"tensor '{tensor}': shape {list(dims)} has a negative dimension")
    if len(dims) > MAX_RANK:
        raise InvalidArgument(
            f"tensor '{tensor}': {len(dims)} dimensions, at most {MAX_RANK} are supported"
        )
    if (prod(dims) if smallest else prod(d for d in dims if d)) > MAX_ELEMENTS:
        raise InvalidArgument(
            f"tensor '{tensor}': shape {list(dims)} is too large (over {MAX_ELEMENTS} elements)"
        )
    return dims


def decode_bytes(raw: bytes, count: int, tensor: str) -> np.ndarray:
    """BYTES raw contents: each element is a 4-byte little-endian length, then the bytes."""
    items, pos, end = [], 0, len(raw)
    view = memoryview(raw)
    while pos < end:
        if pos + 4 > end:
            raise InvalidArgument(f"tensor '{tensor}': BYTES raw contents are truncated")
        (length,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + length > end:
            raise InvalidArgument(f"tensor '{tensor}': BYTES element overruns the raw contents")
        items.append(bytes(view[pos : pos + length]))
        pos += length
    if len(items) != count:
        raise InvalidArgument(
            f"tensor '{tensor}': BYTES raw contents hold {len(items)} elements, shape needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def encode_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def from_raw(raw: bytes, datatype: str, shape: tuple[int, ...], tensor: str) -> np.ndarray:
    dtype = dtype_of(datatype, tensor)
    count = prod(shape)
    if datatype == "BYTES":
        return decode_bytes(raw, count, tensor).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"tensor '{tensor}': raw contents have {len(raw)} bytes, "
            f"shape {list(shape)} of {datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_contents(values: list, datatype: str, shape: tuple[int, ...], tensor: str) -> np.ndarray:
    """Typed `contents`: integer values out of the datatype's range are errors, not wrapped."""
    dtype = dtype_of(datatype, tensor)
    if datatype not in CONTENTS_FIELD:
        raise InvalidArgument(f"tensor '{tensor}': {datatype} can only be sent as raw contents")
    if len(values) != prod(shape):
        raise InvalidArgument(
            f"tensor '{tensor}': contents hold {len(values)} values, shape {list(shape)} needs "
            f"{prod(shape)}"
        )
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    if dtype.kind in "iu" and dtype.itemsize < 4 and len(values):
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"tensor '{tensor}': contents out of range for {datatype}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def to_raw(array: np.ndarray, tensor: str) -> tuple[str, bytes]:
    """(datatype, raw bytes) for an output array."""
    datatype = datatype_of(array, tensor)
    if datatype == "BYTES":
        return datatype, encode_bytes(array)
    return datatype, np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def check_inputs(inputs: Tensors, specs: tuple[TensorSpec, ...], model: str) -> None:
    """Names, datatypes and non-batch dimensions against the model's declared inputs."""
    expected = {spec.name: spec for spec in specs}
    for name in inputs.keys() - expected.keys():
        raise InvalidArgument(
            f"tensor '{name}': not an input of model '{model}' (inputs: {', '.join(expected)})"
        )
    for name in expected.keys() - inputs.keys():
        raise InvalidArgument(f"tensor '{name}': input of model '{model}' is missing")
    for name, array in inputs.items():
        spec = expected[name]
        datatype = datatype_of(array, name)
        if datatype != spec.datatype:
            raise InvalidArgument(
                f"tensor '{name}': datatype {datatype}, model '{model}' expects {spec.datatype}"
            )
        dims = spec.shape[1:]
        if array.ndim != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(dims, array.shape[1:], strict=True)
        ):
            raise InvalidArgument(
                f"tensor '{name}': shape {list(array.shape)}, model '{model}' expects "
                f"{list(spec.shape)}"
            )


def request_of(tensors: Tensors, deadline: float | None, request_id: str = "") -> InferRequest:
    """The internal request, once every input agrees on a non-zero batch dimension."""
    if not tensors:
        raise InvalidArgument("inputs: the request has no input tensors")
    for name, array in tensors.items():
        if array.ndim == 0:
            raise InvalidArgument(f"tensor '{name}': needs a batch dimension (shape is [])")
    rows = {len(a) for a in tensors.values()}
    if len(rows) > 1:
        sizes = ", ".join(f"{n}: {len(a)}" for n, a in tensors.items())
        raise InvalidArgument(f"inputs disagree on the batch dimension ({sizes})")
    count = rows.pop()
    if count == 0:
        raise InvalidArgument(f"tensor '{next(iter(tensors))}': batch dimension is 0")
    return InferRequest(tensors, count, deadline, request_id)
