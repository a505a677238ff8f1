"""TensorProto <-> numpy without TensorFlow: every dtype both ways, in tensor_content and in
the typed fields (small ones value by value, large ones through the packed-bytes path),
and the TF <-> KServe datatype table."""

from __future__ import annotations

import numpy as np
import pytest
from coalesce.codecs import wire
from coalesce.codecs.tf_tensors import BY_KSERVE, TF_TYPES, fill_proto, kserve_to_tf, to_array
from coalesce.core.tensors import BF16, DTYPES
from coalesce.errors import InvalidArgument


def sample(dtype: np.dtype, size: int) -> np.ndarray:
    values = np.arange(size) % 120
    if dtype == np.dtype(object):
        return np.array([b"v%d" % v for v in values], dtype=object).reshape(-1, 2)
    if dtype == BF16:
        return (values + 0x3F80).astype("<u2").view(BF16).reshape(-1, 2)
    if dtype.kind == "b":
        return (values % 3 == 0).reshape(-1, 2)
    if dtype.kind == "c":
        return (values - 1j * values).astype(dtype).reshape(-1, 2)
    return values.astype(dtype).reshape(-1, 2)


@pytest.mark.parametrize("kind", TF_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("size", [2, 600])
@pytest.mark.parametrize("content", [True, False], ids=["tensor_content", "typed"])
def test_round_trip(kind, size, content):
    array = sample(kind.dtype, size)
    proto = wire.TensorProto()
    fill_proto(proto, array, "t", content=content)
    assert proto.dtype == kind.enum
    sent = wire.TensorProto.FromString(proto.SerializeToString())
    assert bool(sent.tensor_content) == (content and kind.name != "DT_STRING")
    result = to_array(sent, "t")
    assert result.dtype == kind.dtype and result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def test_one_typed_value_fills_the_shape():
    proto = wire.TensorProto(dtype=1, float_val=[2.5])
    proto.tensor_shape.dim.add(size=3)
    np.testing.assert_array_equal(to_array(proto, "t"), [2.5, 2.5, 2.5])


def test_an_array_tensorflow_cannot_carry_is_an_error_naming_it():
    with pytest.raises(InvalidArgument, match=r"tensor 'u': dtype .* has no TensorFlow dtype"):
        fill_proto(wire.TensorProto(), np.zeros(2, dtype="datetime64[s]"), "u", content=True)


def test_every_kserve_datatype_has_one_tf_dtype_and_back():
    assert set(BY_KSERVE) == set(DTYPES)
    for datatype, kind in BY_KSERVE.items():
        assert kind.dtype == DTYPES[datatype]
        assert kserve_to_tf(datatype) == kind.enum
    assert kserve_to_tf("NOPE") == 0


def test_a_string_tensor_holding_other_objects_is_an_error_not_garbage():
    with pytest.raises(InvalidArgument, match="tensor 's': a DT_STRING element is int"):
        fill_proto(wire.TensorProto(), np.array([b"a", 5], dtype=object), "s", content=False)
