"""Small helpers around the official tritonclient, shared by the tests."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as tc
from coalesce.codecs import wire

METHOD = "/inference.GRPCInferenceService/ModelInfer"

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
"""KServe numeric datatypes and their numpy types, as the tests expect them."""


def inputs(**arrays: np.ndarray) -> list[tc.InferInput]:
    """tritonclient InferInputs from named arrays (datatype from the dtype)."""
    from tritonclient.utils import np_to_triton_dtype

    result = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        result.append(tensor)
    return result


def raw_infer(channel, request, timeout: float = 10):
    """Send a hand-built ModelInferRequest (for inputs no well-behaved client would send)."""
    call = channel.unary_unary(
        METHOD,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=wire.ModelInferResponse.FromString,
    )
    return call(request, timeout=timeout)


def affine_expected(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": 2 * x + 1, "s": x.sum(axis=1, keepdims=True)}
