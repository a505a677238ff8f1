"""JSON values <-> numpy arrays, for the HTTP/JSON front ends.

JSON has no datatypes, so a value is checked against the datatype it must become:
a float for an integer tensor, a string for a numeric one or a ragged nesting is an
InvalidArgument naming the tensor, never a silent cast. BYTES elements arrive as
strings (UTF-8) or, where the protocol allows it, as {"b64": "..."} objects.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
import orjson
from coalesce.core.tensors import BF16, DTYPES, dtype_of
from coalesce.errors import InvalidArgument

# numpy's kind for what json.loads gives, per datatype: b bool, i/u int, f float.
_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf", "BF16": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers", "U": "strings"}


def parse(body: bytes, what: str = "request body") -> Any:
    """A JSON document; anything else is a 400 naming the problem and where it is.

    orjson first: a one-row KServe body of 64 floats parses in 3 us instead of the
    standard library's 19 (measured). What orjson refuses (NaN and Infinity, which TF
    Serving's REST API accepts, lone surrogates, nesting past 1024) the standard
    library reads as before. One difference: orjson reads an integer beyond 64 bits as
    a float, which an integer tensor refuses as it refused the out-of-range integer."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} nests too deeply to be parsed") from None


def dumps(document: Any) -> bytes:
    """The standard library's compact JSON. (orjson wrote a one-row answer in 4 us
    instead of 12, but raised the pipelines' peak RSS on a backlog of 570 KB answers
    by 25 MiB, measured, and writes NaN as null.)"""
    return json.dumps(document, separators=(",", ":")).encode()


def to_array(data: Any, datatype: str, tensor: str, *, b64: bool = False) -> np.ndarray:
    """Nested lists (or a scalar) as an array of `datatype`, shaped as nested."""
    dtype_of(datatype, tensor)  # an unknown datatype is a 400 naming the tensor
    if datatype == "BYTES":
        return _strings(data, tensor, b64)
    with np.errstate(over="ignore"):  # beyond FP16's or FP32's range is inf, as in to_bf16
        return _numbers(data, datatype, tensor)


def to_arrays(datas: list[Any], size: int, datatype: str, tensor: str) -> np.ndarray:
    """Several requests' flat data lists of `size` numbers each, every one read as
    to_array reads it, as one array: numpy's error state is set once for them all
    (2.4 us of the 3 a one-row list costs, measured)."""
    dtype_of(datatype, tensor)
    if datatype == "BYTES":
        raise InvalidArgument(f"tensor '{tensor}': BYTES data is read request by request")
    with np.errstate(over="ignore"):
        parts = [_numbers(data, datatype, tensor) for data in datas]
    for part in parts:
        if part.ndim != 1 or part.size != size:
            raise InvalidArgument(f"tensor '{tensor}': data must be a flat list of {size} values")
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _numbers(data: Any, datatype: str, tensor: str) -> np.ndarray:
    try:
        values = np.array(data)
    except ValueError:
        raise InvalidArgument(
            f"tensor '{tensor}': data is ragged (rows of unequal length)"
        ) from None
    kinds = _KINDS.get(datatype, "iu")
    if values.size and values.dtype.kind not in kinds:
        found = _KIND_NAMES.get(values.dtype.kind, "mixed or non-numeric values")
        raise InvalidArgument(f"tensor '{tensor}': {found} in data for datatype {datatype}")
    if datatype == "BF16":
        return to_bf16(values)
    dtype = DTYPES[datatype]
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidArgument(f"tensor '{tensor}': data out of range for {datatype}")
    return values.astype(dtype)


def infer_datatype(data: Any) -> str:
    """The datatype JSON data suggests when the model declares none (TF Serving REST)."""
    first = data
    while isinstance(first, list) and first:
        first = first[0]
    if isinstance(first, bool):
        return "BOOL"
    if isinstance(first, int):
        try:  # integers until a float shows up anywhere
            return "FP32" if np.array(data).dtype.kind == "f" else "INT64"
        except ValueError:
            return "INT64"  # ragged: to_array says so
    if isinstance(first, float):
        return "FP32"
    return "BYTES"


def _strings(data: Any, tensor: str, b64: bool) -> np.ndarray:
    try:
        values = np.array(data, dtype=object)
    except ValueError:
        raise InvalidArgument(
            f"tensor '{tensor}': data is ragged (rows of unequal length)"
        ) from None
    flat = values.reshape(-1)
    for i, item in enumerate(flat):
        flat[i] = _string(item, tensor, b64)
    return values


def _string(item: Any, tensor: str, b64: bool) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if b64 and isinstance(item, dict) and item.keys() == {"b64"}:
        try:
            return base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidArgument(f"tensor '{tensor}': 'b64' value is not base64") from None
    expected = 'strings or {"b64": ...} objects' if b64 else "strings"
    raise InvalidArgument(f"tensor '{tensor}': BYTES data must be {expected}, got {item!r:.40}")


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float values rounded to the nearest bfloat16 (ties to even); NaN stays NaN."""
    with np.errstate(over="ignore"):  # beyond float32's range is inf, as it should be
        bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(values), 0x7FC0, rounded).astype("<u2").view(BF16)


def from_bf16(array: np.ndarray) -> np.ndarray:
    return (array.view("<u2").astype("<u4") << 16).view("<f4")


def to_json(array: np.ndarray, tensor: str, *, b64: bool | None = False) -> Any:
    """An output as nested lists. BYTES: UTF-8 strings; with `b64` True as {"b64": ...}
    objects, with `b64` None only the elements that are not valid UTF-8."""
    if array.dtype == BF16:
        return from_bf16(array).tolist()
    if array.dtype.kind not in "OSU":
        return array.tolist()
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        flat[i] = _json_string(item, tensor, b64)
    return out.tolist()


def _json_string(item: Any, tensor: str, b64: bool | None) -> Any:
    if isinstance(item, str):
        return item
    data = bytes(item)
    if not b64:
        try:
            return data.decode()
        except UnicodeDecodeError:
            if b64 is False:
                raise InvalidArgument(
                    f"output '{tensor}': BYTES element is not UTF-8; ask for it as binary data"
                ) from None
    return {"b64": base64.b64encode(data).decode()}
