"""The KServe v2 gRPC front end with the official tritonclient: every datatype both
ways, metadata, health, and a clear status for every malformed request."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from coalesce.codecs import wire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.client import NUMERIC as NUMERIC_TYPES
from tests.client import inputs, raw_infer
from tests.conftest import local_backend

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `coalesce serve` process for the whole module (the sync client needs its own loop)."""
    from tests.support.coalesce import Process, free_port

    process = Process(
        {
            "grpc_aio_listen": f"127.0.0.1:{free_port()}",
            "backends": {
                "echo": local_backend("echo"),
                "affine": local_backend("affine"),
            },
            "routes": [
                {"model": "echo", "backend": "echo"},
                {"model": "affine", "backend": "affine"},
                {"model": "affine-v2", "backend": "affine"},
            ],
        },
        tmp_path_factory.mktemp("kserve"),
    )
    yield process
    assert process.terminate() == 0


@pytest.fixture(scope="module", params=["listen", "grpc_aio_listen"])
def url(server, request) -> str:
    """Every test runs against both gRPC front ends: our own HTTP/2 and grpc.aio."""
    if request.param == "listen":
        return server.url
    return yaml.safe_load(server.config.read_text())["grpc_aio_listen"]


@pytest.fixture(scope="module")
def client(url):
    with tc.InferenceServerClient(url) as client:
        yield client


@pytest.fixture(scope="module")
def channel(url):
    with grpc.insecure_channel(url) as channel:
        yield channel


def sample(datatype: str, shape=(3, 2)) -> np.ndarray:
    values = (
        np.arange(np.prod(shape)).reshape(shape) % 2
        if datatype == "BOOL"
        else (np.arange(np.prod(shape)).reshape(shape) * 3 + 1)
    )
    return values.astype(NUMERIC_TYPES[datatype])


@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_numeric_datatype_round_trips_raw(client, datatype):
    x = sample(datatype)
    result = client.infer("echo", inputs(x=x))
    out = result.as_numpy("x")
    assert result.get_output("x").datatype == datatype
    np.testing.assert_array_equal(out, x)
    assert out.dtype == x.dtype


CONTENTS = {
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
}


@pytest.mark.parametrize("datatype", sorted(CONTENTS))
def test_typed_contents_are_accepted_and_answered_raw(channel, datatype):
    x = sample(datatype, (2, 3))
    request = wire.ModelInferRequest(model_name="echo", id="typed")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, CONTENTS[datatype]).extend(x.reshape(-1).tolist())
    response = raw_infer(channel, request)
    assert response.id == "typed"
    assert list(response.outputs[0].shape) == [2, 3]
    out = np.frombuffer(response.raw_output_contents[0], dtype=NUMERIC_TYPES[datatype]).reshape(
        2, 3
    )
    np.testing.assert_array_equal(out, x)


def test_bytes_round_trip_raw_and_typed(client, channel):
    text = np.array([[b"alpha"], [b""], ["\u00e9t\u00e9".encode()]], dtype=object)
    result = client.infer("echo", inputs(t=text))
    np.testing.assert_array_equal(result.as_numpy("t"), text)
    request = wire.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="t", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"one", b"\x00two"])
    response = raw_infer(channel, request)
    assert response.outputs[0].datatype == "BYTES"
    assert response.raw_output_contents[0] == b"\x03\x00\x00\x00one\x04\x00\x00\x00\x00two"


def test_requested_outputs_and_request_id_are_honoured(client):
    x = np.ones((2, 4), dtype=np.float32)
    result = client.infer(
        "affine", inputs(x=x), outputs=[tc.InferRequestedOutput("s")], request_id="req-42"
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["s"]
    assert response.id == "req-42" and response.model_name == "affine"
    np.testing.assert_array_equal(result.as_numpy("s"), [[4.0], [4.0]])


def test_metadata_reports_the_route_name_and_the_backend_tensors(client):
    meta = client.get_model_metadata("affine-v2")
    assert meta.name == "affine-v2"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [t.name for t in meta.outputs] == ["y", "s"]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("affine") and client.get_server_metadata().name == "coalesce"


def test_health_service_has_the_server_and_one_name_per_route(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "echo", "affine", "affine-v2"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def bad(**fields) -> wire.ModelInferRequest:
    request = wire.ModelInferRequest(model_name=fields.pop("model", "affine"))
    for name, datatype, shape in fields.pop("tensors", [("x", "FP32", [1, 4])]):
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    raw = fields.pop("raw", [np.zeros((1, 4), np.float32).tobytes()])
    request.raw_input_contents.extend(raw)
    return request


F32 = np.zeros((1, 4), np.float32).tobytes()
BAD_REQUESTS = {
    "unknown model": (bad(model="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope'"),
    "unknown datatype": (
        bad(tensors=[("x", "FP12", [1, 4])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': unknown datatype 'FP12'",
    ),
    "wrong datatype": (
        bad(tensors=[("x", "INT32", [1, 4])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': datatype INT32, model 'affine' expects FP32",
    ),
    "wrong shape": (
        bad(tensors=[("x", "FP32", [2, 2])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': shape [2, 2], model 'affine' expects [-1, 4]",
    ),
    "unknown input": (
        bad(tensors=[("x", "FP32", [1, 4]), ("z", "FP32", [1, 4])], raw=[F32, F32]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'z': not an input",
    ),
    "short raw": (
        bad(raw=[F32[:-1]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': raw contents have 15 bytes, shape [1, 4] of FP32 needs 16",
    ),
    "huge dimension": (
        bad(tensors=[("x", "FP32", [1, 2**40])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': shape [1, 1099511627776] is too large",
    ),
    "negative dimension": (
        bad(tensors=[("x", "FP32", [-1, 4])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': shape [-1, 4] has a negative dimension",
    ),
    "scalar": (
        bad(tensors=[("x", "FP32", [])], raw=[b"\0\0\0\0"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': needs a batch dimension",
    ),
    "zero rows": (
        bad(tensors=[("x", "FP32", [0, 4])], raw=[b""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch dimension is 0",
    ),
    "raw count": (
        bad(raw=[F32, F32]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents: 2 entries for 1 inputs",
    ),
    "no inputs": (
        bad(tensors=[], raw=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs: the request has no input tensors",
    ),
    "duplicate input": (
        bad(tensors=[("x", "FP32", [1, 4])] * 2, raw=[F32, F32]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 'x': sent twice",
    ),
    "rows disagree": (
        bad(model="echo", tensors=[("a", "FP32", [1, 4]), ("b", "FP32", [2, 2])], raw=[F32, F32]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs disagree on the batch dimension (a: 1, b: 2)",
    ),
    "truncated bytes": (
        bad(model="echo", tensors=[("t", "BYTES", [1])], raw=[b"\x05\0\0\0ab"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor 't': BYTES element overruns",
    ),
    "bytes count": (
        bad(model="echo", tensors=[("t", "BYTES", [2])], raw=[b"\x01\0\0\0a"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hold 1 elements, shape needs 2",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_raw_requests_get_a_status_naming_the_problem(channel, client, case):
    request, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        raw_infer(channel, request)
    assert error.value.code() == code
    assert message in error.value.details()
    result = client.infer("affine", inputs(x=np.ones((1, 4), np.float32)))  # still serving
    np.testing.assert_array_equal(result.as_numpy("y"), [[3, 3, 3, 3]])


def test_a_request_shaped_as_the_last_one_still_gets_every_check(channel):
    """Once a layout has passed, requests like it skip those checks (kserve.Layout);
    each difference from it must still get the full ones."""

    def request(x: np.ndarray, cut: int = 0, outputs=(), **parameters) -> wire.ModelInferRequest:
        message = wire.ModelInferRequest(model_name="affine", id=f"r{len(x)}-{cut}")
        message.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        message.raw_input_contents.append(x.tobytes()[: x.nbytes - cut])
        for name in outputs:
            message.outputs.add(name=name)
        for key, value in parameters.items():
            message.parameters[key].int64_param = value
        return message

    def y_of(answer: wire.ModelInferResponse, rows: int) -> np.ndarray:
        names = [o.name for o in answer.outputs]
        raw = answer.raw_output_contents[names.index("y")]
        return np.frombuffer(raw, np.float32).reshape(rows, 4)

    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for i in range(3):  # the layout is known: later ones are read off their bytes
        message = request(x + i)
        message.id = f"again-{i}"
        answer = raw_infer(channel, message)
        assert answer.id == f"again-{i}"
        np.testing.assert_array_equal(y_of(answer, 1), 2 * (x + i) + 1)
    for bad, message in [
        (request(x, cut=4), "raw contents have 12 bytes"),
        (request(x, outputs=["q"]), "outputs: 'q' is not an output of model 'affine'"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            raw_infer(channel, bad)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    two = np.stack([x[0], x[0] + 4])
    answer = raw_infer(channel, request(two))
    assert answer.id == "r2-0"
    np.testing.assert_array_equal(y_of(answer, 2), 2 * two + 1)
    answer = raw_infer(channel, request(x + 1, priority=1))
    np.testing.assert_array_equal(y_of(answer, 1), 2 * (x + 1) + 1)
    answer = raw_infer(channel, request(x + 2))
    assert answer.id == "r1-0"
    np.testing.assert_array_equal(y_of(answer, 1), 2 * (x + 2) + 1)


def typed(
    datatype: str, shape: list[int], field: str | None, values: list
) -> wire.ModelInferRequest:
    request = wire.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="v", datatype=datatype, shape=shape)
    if field:
        getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            typed("INT8", [2], "int_contents", [1, 300]),
            "tensor 'v': contents out of range for INT8",
        ),
        (typed("FP16", [1], None, []), "tensor 'v': FP16 can only be sent as raw contents"),
        (typed("FP32", [3], "fp32_contents", [1.0]), "contents hold 1 values, shape [3] needs 3"),
    ],
)
def test_bad_typed_contents_are_invalid_argument(channel, request_, message):
    with pytest.raises(grpc.RpcError) as error:
        raw_infer(channel, request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_unknown_requested_output_and_version(client):
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(InferenceServerException) as error:
        client.infer("affine", inputs(x=x), outputs=[tc.InferRequestedOutput("q")])
    assert "outputs: 'q' is not an output of model 'affine'" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.infer("affine", inputs(x=x), model_version="7")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    assert "model 'affine' has no version '7'" in error.value.message()
    assert client.infer("affine", inputs(x=x), model_version="1").as_numpy("s")[0, 0] == 4
