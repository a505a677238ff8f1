"""The TF Serving gRPC front end with the official tensorflow-serving-api stubs against a
real `coalesce serve`: every dtype both ways (tensor_content and typed fields), the
scalar-broadcast rule, output_filter, version and label routing, metadata, model status,
and a clear status for every malformed request, after which the server goes on serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from tensorflow.core.framework import tensor_pb2  # noqa: E402  (after the skip)
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.client import affine_expected  # noqa: E402
from tests.conftest import local_backend  # noqa: E402

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.support.coalesce import Process

    affine, echo = local_backend("affine"), local_backend("echo")
    process = Process(
        {
            "backends": {"affine": affine, "echo": echo},
            "routes": [
                {"model": "affine", "backend": "affine"},
                {"model": "echo", "backend": "echo"},
                {"model": "versioned", "version": 1, "label": "stable", "backend": "affine"},
                {"model": "versioned", "version": 2, "label": "canary", "backend": "echo"},
                {"model": "rows", "backend": "affine", "signature": "predict_rows"},
            ],
        },
        tmp_path_factory.mktemp("tfserving"),
    )
    yield process
    assert process.terminate() == 0, process.output()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.url) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def request_for(model: str, version=None, label=None, signature="", **inputs):
    """A PredictRequest; arrays become TensorProtos the way tf.make_tensor_proto makes them."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for name, value in inputs.items():
        is_proto = isinstance(value, tensor_pb2.TensorProto)
        request.inputs[name].CopyFrom(value if is_proto else tf.make_tensor_proto(value))
    return request


def arrays(response) -> dict[str, np.ndarray]:
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


# The typed field TF's tensor.proto documents for each dtype (written out here, not taken
# from Coalesce's table, so that the test checks the table).
TYPED = {
    np.float16: "half_val",
    np.float32: "float_val",
    np.float64: "double_val",
    np.int8: "int_val",
    np.int16: "int_val",
    np.int32: "int_val",
    np.int64: "int64_val",
    np.uint8: "int_val",
    np.uint16: "int_val",
    np.uint32: "uint32_val",
    np.uint64: "uint64_val",
    np.bool_: "bool_val",
    np.complex64: "scomplex_val",
    np.complex128: "dcomplex_val",
    tf.bfloat16.as_numpy_dtype: "half_val",
}


def sample(dtype) -> np.ndarray:
    values = np.array([[0, 1, 2], [3, 125, 7]])
    if dtype is np.bool_:
        return values % 2 == 1
    if np.dtype(dtype).kind == "c":
        return (values + 1j * values[::-1]).astype(dtype)
    return values.astype(dtype)


def typed(array: np.ndarray):
    """A TensorProto with the values in the dtype's typed field, as a hand-written client would."""
    proto = tf.make_tensor_proto(np.zeros(0, array.dtype))
    proto.tensor_shape.Clear()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    field = TYPED[array.dtype.type]
    flat = array.reshape(-1)
    if field == "half_val":
        values = flat.view(np.uint16).tolist()
    elif array.dtype.kind == "c":
        values = np.stack([flat.real, flat.imag], axis=1).reshape(-1).tolist()
    else:
        values = flat.tolist()
    getattr(proto, field).extend(values)
    return proto


def test_predict_with_tensor_content_answers_in_typed_fields_as_tf_serving_does(stub):
    proto = tf.make_tensor_proto(X)
    assert proto.tensor_content  # what tf.make_tensor_proto sends for a float matrix
    response = stub.Predict(request_for("affine", x=proto), timeout=10)
    assert response.model_spec.name == "affine"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs["y"].float_val) == (2 * X + 1).reshape(-1).tolist()
    assert not response.outputs["y"].tensor_content
    for name, expected in affine_expected(X).items():
        np.testing.assert_array_equal(arrays(response)[name], expected)


def test_predict_with_typed_float_val(stub):
    response = stub.Predict(request_for("affine", x=typed(X)), timeout=10)
    np.testing.assert_array_equal(arrays(response)["y"], 2 * X + 1)


@pytest.mark.parametrize("dtype", list(TYPED), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("encoding", ["tensor_content", "typed"])
def test_every_dtype_goes_through_unchanged(stub, dtype, encoding):
    array = sample(dtype)
    proto = tf.make_tensor_proto(array) if encoding == "tensor_content" else typed(array)
    response = stub.Predict(request_for("echo", v=proto), timeout=10)
    out = response.outputs["v"]
    assert out.dtype == proto.dtype
    assert not out.tensor_content
    result = tf.make_ndarray(out)
    assert result.dtype == array.dtype
    np.testing.assert_array_equal(result, array)


def test_dt_string_both_ways(stub):
    text = np.array([[b"a", b"bc"], [b"", b"\xff\x00 binary"]], dtype=object)
    response = stub.Predict(request_for("echo", s=text), timeout=10)
    assert response.outputs["s"].dtype == tf.string.as_datatype_enum
    assert list(response.outputs["s"].string_val) == text.reshape(-1).tolist()
    np.testing.assert_array_equal(arrays(response)["s"], text)


def test_dt_string_in_tensor_content_uses_tfs_varint_list_encoding(stub):
    proto = tf.make_tensor_proto(np.array([b"x"], dtype=object))
    proto.ClearField("string_val")
    proto.tensor_shape.dim[0].size = 2
    proto.tensor_content = bytes([1, 3]) + b"a" + b"bcd"  # lengths, then the bytes
    response = stub.Predict(request_for("echo", s=proto), timeout=10)
    assert list(response.outputs["s"].string_val) == [b"a", b"bcd"]


def test_dt_half_in_half_val_carries_the_bit_patterns(stub):
    half = np.array([[1.5, -2.0], [65504, 0.0009765625]], dtype=np.float16)
    proto = tf.make_tensor_proto(half)
    proto.ClearField("tensor_content")
    proto.half_val.extend(half.view(np.uint16).reshape(-1).tolist())
    response = stub.Predict(request_for("echo", h=proto), timeout=10)
    assert response.outputs["h"].dtype == tf.float16.as_datatype_enum
    assert list(response.outputs["h"].half_val) == half.view(np.uint16).reshape(-1).tolist()
    np.testing.assert_array_equal(arrays(response)["h"], half)


@pytest.mark.parametrize(
    ("value", "dtype"), [(3.0, tf.float32), (b"z", tf.string), (True, tf.bool), (7, tf.int64)]
)
def test_one_typed_value_fills_the_whole_shape(stub, value, dtype):
    proto = tf.make_tensor_proto(value, shape=[2, 4], dtype=dtype)
    assert len(proto.ListFields()) == 3  # dtype, shape and a single typed value
    response = stub.Predict(request_for("echo", v=proto), timeout=10)
    np.testing.assert_array_equal(
        arrays(response)["v"],
        np.full((2, 4), value, dtype=object if dtype == tf.string else dtype.as_numpy_dtype),
    )


def test_scalar_broadcast_reaches_the_model_as_a_full_tensor(stub):
    proto = tf.make_tensor_proto(3.0, shape=[2, 4], dtype=tf.float32)
    response = stub.Predict(request_for("affine", x=proto), timeout=10)
    np.testing.assert_array_equal(arrays(response)["y"], np.full((2, 4), 7, np.float32))
    np.testing.assert_array_equal(arrays(response)["s"], np.full((2, 1), 12, np.float32))


def test_output_filter(stub):
    request = request_for("affine", x=X)
    request.output_filter.append("s")
    response = stub.Predict(request, timeout=10)
    assert list(response.outputs) == ["s"]
    np.testing.assert_array_equal(arrays(response)["s"], X.sum(axis=1, keepdims=True))


@pytest.mark.parametrize(
    ("spec", "version", "outputs"),
    [
        ({}, 2, ["x"]),  # no version: the highest routed one
        ({"version": 1}, 1, ["s", "y"]),
        ({"version": 2}, 2, ["x"]),
        ({"label": "stable"}, 1, ["s", "y"]),
        ({"label": "canary"}, 2, ["x"]),
    ],
)
def test_version_and_label_pick_the_route(stub, spec, version, outputs):
    response = stub.Predict(request_for("versioned", x=X, **spec), timeout=10)
    assert response.model_spec.version.value == version
    assert sorted(response.outputs) == outputs


def test_a_plain_route_serves_the_backend_version(stub):
    response = stub.Predict(request_for("affine", version=1, x=X), timeout=10)
    assert response.model_spec.version.value == 1


def test_a_route_serves_its_own_signature_name(stub):
    response = stub.Predict(request_for("rows", signature="predict_rows", x=X), timeout=10)
    assert response.model_spec.signature_name == "predict_rows"
    np.testing.assert_array_equal(arrays(response)["y"], 2 * X + 1)


def metadata(stub, model: str, fields=("signature_def",), **spec):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = model
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    request.metadata_field.extend(fields)
    return stub.GetModelMetadata(request, timeout=10)


def test_get_model_metadata_packs_a_signature_def_map(stub):
    response = metadata(stub, "affine")
    assert response.model_spec.name == "affine"
    assert response.model_spec.version.value == 1
    packed = response.metadata["signature_def"]
    assert packed.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert packed.Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    x = signature.inputs["x"]
    assert x.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in x.tensor_shape.dim] == [-1, 4]
    assert sorted(signature.outputs) == ["s", "y"]
    assert [d.size for d in signature.outputs["s"].tensor_shape.dim] == [-1, 1]


def test_get_model_metadata_without_signature_def_field_is_invalid(stub):
    for fields, fragment in [((), "at least one metadata_field"), (("x",), "'x'")]:
        with pytest.raises(grpc.RpcError) as caught:
            metadata(stub, "affine", fields)
        assert caught.value.code() == INVALID
        assert fragment in caught.value.details()


def model_status(channel, model: str, **spec):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    return stub.GetModelStatus(request, timeout=10)


def test_get_model_status_lists_every_routed_version(channel):
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    statuses = model_status(channel, "versioned").model_version_status
    assert [(s.version, s.state) for s in statuses] == [(1, available), (2, available)]
    assert [
        s.version for s in model_status(channel, "versioned", label="canary").model_version_status
    ] == [2]
    assert [s.version for s in model_status(channel, "affine").model_version_status] == [1]
    with pytest.raises(grpc.RpcError) as caught:
        model_status(channel, "nope")
    assert caught.value.code() == NOT_FOUND


def test_classify_is_unimplemented_with_a_clear_message(stub):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "affine"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Classify" in caught.value.details()


def test_reload_config_request_says_coalesce_reloads_its_own_config(channel):
    from tensorflow_serving.apis import model_management_pb2

    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "edit it and reload it (SIGHUP" in caught.value.details()


def _content(length: int):
    proto = tf.make_tensor_proto(X)
    proto.tensor_content = proto.tensor_content[:length]
    return proto


def _field(**values):
    proto = tf.make_tensor_proto(X)
    proto.ClearField("tensor_content")
    for field, items in values.items():
        getattr(proto, field).extend(items)
    return proto


def _dtype(dtype: int, **values):
    proto = _field(**values)
    proto.dtype = dtype
    return proto


def _strings(content: bytes):
    proto = _dtype(7)
    proto.tensor_content = content
    return proto


def _filtered(*names: str):
    request = request_for("affine", x=X)
    request.output_filter.extend(names)
    return request


# case: (request builder, status, a fragment of the message)
BAD = {
    "unknown model": (lambda: request_for("nope", x=X), NOT_FOUND, "model 'nope'"),
    "unknown version": (lambda: request_for("versioned", version=7, x=X), NOT_FOUND, "'7'"),
    "unknown version of a plain route": (
        lambda: request_for("affine", version=7, x=X),
        NOT_FOUND,
        "version '7'",
    ),
    "unknown label": (
        lambda: request_for("versioned", label="beta", x=X),
        NOT_FOUND,
        "label 'beta'",
    ),
    "unknown signature": (
        lambda: request_for("affine", signature="nope_sig", x=X),
        grpc.StatusCode.FAILED_PRECONDITION,
        '"nope_sig" not found',
    ),
    "no model name": (lambda: request_for("", x=X), INVALID, "model_spec.name"),
    "no inputs": (lambda: request_for("affine"), INVALID, "no input tensors"),
    "wrong dtype": (
        lambda: request_for("affine", x=X.astype(np.int32)),
        INVALID,
        "tensor 'x': datatype INT32, model 'affine' expects FP32",
    ),
    "wrong input name": (lambda: request_for("affine", z=X), INVALID, "tensor 'z'"),
    "shape mismatch": (
        lambda: request_for("affine", x=X[:, :3]),
        INVALID,
        "tensor 'x': shape [2, 3]",
    ),
    "no batch dimension": (
        lambda: request_for("echo", x=np.float32(1)),
        INVALID,
        "tensor 'x': needs a batch dimension",
    ),
    "batch sizes disagree": (
        lambda: request_for("echo", a=X, b=X[:1]),
        INVALID,
        "disagree on the batch dimension",
    ),
    "malformed tensor_content length": (
        lambda: request_for("affine", x=_content(31)),
        INVALID,
        "tensor 'x': tensor_content has 31 bytes, shape [2, 4] of DT_FLOAT needs 32",
    ),
    "too few typed values": (
        lambda: request_for("affine", x=_field(float_val=[1.0] * 5)),
        INVALID,
        "tensor 'x': float_val holds 5 values, shape [2, 4] needs 8",
    ),
    "values in another dtype's field": (
        lambda: request_for("affine", x=_field(int_val=[1] * 8)),
        INVALID,
        "tensor 'x': DT_FLOAT values belong in float_val, not int_val",
    ),
    "unsupported dtype": (
        lambda: request_for("echo", q=_dtype(11, int_val=[1])),
        INVALID,
        "tensor 'q': dtype DT_QINT8 is not supported",
    ),
    "half_val out of range": (
        lambda: request_for("echo", h=_dtype(19, half_val=[70000])),
        INVALID,
        "tensor 'h': half_val values out of range",
    ),
    "int8 out of range": (
        lambda: request_for("echo", i=_dtype(6, int_val=[300])),
        INVALID,
        "tensor 'i': int_val values out of range for DT_INT8",
    ),
    "truncated string tensor_content": (
        lambda: request_for("echo", s=_strings(bytes([5]) + b"ab")),
        INVALID,
        "tensor 's': DT_STRING tensor_content is truncated",
    ),
    "unknown output_filter": (
        lambda: _filtered("z"),
        INVALID,
        "output_filter: 'z' is not an output of model 'affine'",
    ),
    "output_filter twice": (lambda: _filtered("y", "y"), INVALID, "'y' is asked for twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_their_status_and_the_server_goes_on(stub, case):
    build, code, fragment = BAD[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(build(), timeout=10)
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details()
    response = stub.Predict(request_for("affine", x=X), timeout=10)
    np.testing.assert_array_equal(arrays(response)["y"], 2 * X + 1)
