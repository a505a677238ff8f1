"""The HTTP/JSON front ends: KServe v2 REST with the official tritonclient.http (binary
data extension and plain JSON), TF Serving REST in both request formats, the errors
each protocol answers, and HTTP callers sharing batches with gRPC callers."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as th
import tritonclient.http.aio as th_aio
from coalesce import config as config_module
from coalesce.server import Server
from tritonclient.utils import InferenceServerException

from tests.client import NUMERIC, affine_expected, inputs
from tests.conftest import local_backend, model_of, running
from tests.support.coalesce import free_port

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`coalesce serve` with the HTTP front ends on, its address given by --http."""
    from tests.support.coalesce import Process

    port = free_port()
    process = Process(
        {
            "backends": {"echo": local_backend("echo"), "affine": local_backend("affine")},
            "routes": [
                {"model": "echo", "backend": "echo"},
                {"model": "affine", "backend": "affine"},
                {"model": "affine-v2", "backend": "affine"},
                {"model": "pinned", "backend": "affine", "version": 1, "label": "stable"},
                {"model": "pinned", "backend": "echo", "version": 2, "label": "canary"},
            ],
        },
        tmp_path_factory.mktemp("rest"),
        args=("--http", f"127.0.0.1:{port}"),
    )
    process.http_port = port
    process.http = f"127.0.0.1:{port}"  # given by --http, not the config: wait for it too
    process._wait_serving()
    yield process
    assert process.terminate() == 0, process.output()


@pytest.fixture(scope="module")
def client(server):
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


def request(server, method: str, path: str, body=None, headers=None):
    """(status, headers, body) of one plain HTTP request; `body` may be JSON-able."""
    if body is not None and not isinstance(body, bytes | str):
        body = json.dumps(body)
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def post_json(server, path: str, body) -> tuple[int, dict]:
    status, _, data = request(server, "POST", path, body)
    return status, json.loads(data)


def sample(datatype: str, shape=(3, 2)) -> np.ndarray:
    values = np.arange(np.prod(shape)).reshape(shape)
    return (values % 2 if datatype == "BOOL" else values * 3 + 1).astype(NUMERIC[datatype])


def tensor(name: str, array: np.ndarray, binary: bool) -> th.InferInput:
    datatype = "BYTES" if array.dtype == object else th.np_to_triton_dtype(array.dtype)
    result = th.InferInput(name, list(array.shape), datatype)
    result.set_data_from_numpy(array, binary_data=binary)
    return result


def assert_serving(client) -> None:
    """The server still answers correctly after whatever the test sent it."""
    result = client.infer("affine", [tensor("x", X, True)])
    np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])


# --- KServe v2 REST -------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient_http(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("affine") and client.is_model_ready("affine", "1")
    assert not client.is_model_ready("no-such-model")
    assert client.get_server_metadata()["name"] == "coalesce"
    meta = client.get_model_metadata("affine-v2")
    assert meta["name"] == "affine-v2" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [t["name"] for t in meta["outputs"]] == ["y", "s"]
    assert client.get_model_metadata("affine", "1")["name"] == "affine"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_every_datatype_round_trips(client, datatype, binary):
    if datatype == "BYTES":
        x = np.array([[b"a", "é".encode()], [b"", b"xyz"]], dtype=object)
    else:
        x = sample(datatype)
    outputs = [th.InferRequestedOutput("x", binary_data=binary)]
    result = client.infer("echo", [tensor("x", x, binary)], outputs=outputs)
    assert result.get_output("x")["datatype"] == datatype
    assert ("data" in result.get_output("x")) is not binary
    out = result.as_numpy("x")
    if datatype == "BYTES":
        out = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(out)
    np.testing.assert_array_equal(out, x)


def test_non_utf8_bytes_go_binary_and_json_output_asks_for_binary(server, client):
    x = np.array([[b"\xff\x00"]], dtype=object)
    result = client.infer("echo", [tensor("x", x, True)])
    assert result.as_numpy("x")[0, 0] == b"\xff\x00"
    with pytest.raises(InferenceServerException, match="not UTF-8; ask for it as binary"):
        client.infer("echo", [tensor("x", x, True)], outputs=[th.InferRequestedOutput("x", False)])


def test_bf16_travels_as_json_numbers_and_as_binary(server):
    body = {"inputs": [{"name": "b", "shape": [1, 3], "datatype": "BF16", "data": [1.5, -2, 3]}]}
    status, answer = post_json(server, "/v2/models/echo/infer", body)
    assert status == 200
    assert answer["outputs"] == [
        {"name": "b", "datatype": "BF16", "shape": [1, 3], "data": [1.5, -2.0, 3.0]}
    ]
    body["parameters"] = {"binary_data_output": True}
    status, headers, data = request(server, "POST", "/v2/models/echo/infer", body)
    length = int(headers["Inference-Header-Content-Length"])
    assert np.frombuffer(data[length:], "<u2").tolist() == [0x3FC0, 0xC000, 0x4040]


def test_request_id_requested_outputs_and_mixed_encodings(client):
    outputs = [th.InferRequestedOutput("s", binary_data=False), th.InferRequestedOutput("y")]
    result = client.infer("affine", [tensor("x", X, False)], outputs=outputs, request_id="r7")
    response = result.get_response()
    assert response["id"] == "r7" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["s", "y"]
    want = affine_expected(X)
    np.testing.assert_array_equal(result.as_numpy("s"), want["s"])
    np.testing.assert_array_equal(result.as_numpy("y"), want["y"])
    only = client.infer("affine", [tensor("x", X, True)], outputs=outputs[:1])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["s"]


def test_versioned_path_and_gzip_request_body(client):
    result = client.infer(
        "affine", [tensor("x", X, True)], model_version="1", request_compression_algorithm="gzip"
    )
    np.testing.assert_array_equal(result.as_numpy("s"), affine_expected(X)["s"])


def test_nested_json_data_is_accepted(server):
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.tolist()}]}
    status, answer = post_json(server, "/v2/models/affine/infer", body)
    assert status == 200
    assert answer["outputs"][1] == {
        "name": "s",
        "datatype": "FP32",
        "shape": [2, 1],
        "data": [6.0, 22.0],
    }


def test_nan_and_infinity_travel_as_tf_serving_writes_them(server):
    """Not JSON, but what TF Serving's REST API and Python's json read and write:
    NaN and Infinity come back as such (orjson, which parses first, refuses them)."""
    body = '{"inputs":[{"name":"v","shape":[1,3],"datatype":"FP32","data":[NaN,Infinity,1.5]}]}'
    status, _, data = request(server, "POST", "/v2/models/echo/infer", body)
    assert status == 200, data
    assert b"[NaN,Infinity,1.5]" in data
    status, answer = post_json(server, "/v2/models/echo/infer", x_json(data=[1, 2, 3, 0.25]))
    assert status == 200 and answer["outputs"][0]["data"] == [1.0, 2.0, 3.0, 0.25]


def x_json(**fields) -> dict:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], **fields}
    return {"inputs": [tensor]}


KSERVE_BAD = [
    ("unknown model", "/v2/models/nope/infer", x_json(), 404, "model 'nope' is not routed"),
    ("unknown version", "/v2/models/affine/versions/9/infer", x_json(), 404, "no version '9'"),
    ("bad JSON", "/v2/models/affine/infer", "{'inputs': 1}", 400, "not valid JSON"),
    ("not an object", "/v2/models/affine/infer", [1], 400, "must be a JSON object"),
    ("no inputs", "/v2/models/affine/infer", {"inputs": []}, 400, "no input tensors"),
    ("no name", "/v2/models/affine/infer", {"inputs": [{"shape": [1]}]}, 400, "'name' is missing"),
    ("wrong datatype", "/v2/models/affine/infer", x_json(datatype="INT32"), 400,
     "tensor 'x': datatype INT32, model 'affine' expects FP32"),
    ("unknown datatype", "/v2/models/affine/infer", x_json(datatype="FP8"), 400,
     "unknown datatype 'FP8'"),
    ("shape mismatch", "/v2/models/affine/infer",
     x_json(shape=[2, 2]), 400, "shape [2, 2], model 'affine' expects [-1, 4]"),
    ("count mismatch", "/v2/models/affine/infer", x_json(shape=[1, 5]), 400,
     "data holds 4 values, shape [1, 5] needs 5"),
    ("strings for FP32", "/v2/models/affine/infer", x_json(data=["a", "b", "c", "d"]), 400,
     "tensor 'x': strings in data for datatype FP32"),
    ("float for INT32", "/v2/models/echo/infer", x_json(datatype="INT32", data=[1.5, 2, 3, 4]),
     400, "numbers in data for datatype INT32"),
    ("out of range", "/v2/models/echo/infer", x_json(datatype="UINT8", data=[1, 2, 3, 256]), 400,
     "out of range for UINT8"),
    ("scalar data", "/v2/models/echo/infer", x_json(datatype="BF16", shape=[2], data=1), 400,
     "data holds 1 values, shape [2] needs 2"),
    ("ragged", "/v2/models/affine/infer", x_json(data=[[1, 2], [3]]), 400, "ragged"),
    ("negative dim", "/v2/models/affine/infer", x_json(shape=[-1, 4]), 400, "negative dimension"),
    ("unknown output", "/v2/models/affine/infer", {**x_json(), "outputs": [{"name": "z"}]}, 400,
     "'z' is not an output of model 'affine'"),
    ("no data", "/v2/models/affine/infer", {"inputs": [{"name": "x", "shape": [1, 4],
     "datatype": "FP32"}]}, 400, "neither 'data' nor parameters.binary_data_size"),
    ("binary overrun", "/v2/models/affine/infer",
     x_json(parameters={"binary_data_size": 16}), 400, "overruns the 0 bytes of binary data"),
    ("shared memory without a size", "/v2/models/affine/infer",
     x_json(parameters={"shared_memory_region": "r"}), 400,
     "shared_memory_byte_size must be a non-negative integer"),
    ("unregistered shared memory", "/v2/models/affine/infer",
     x_json(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 16}), 400,
     "no shared memory region 'r'"),
    ("batch disagreement", "/v2/models/echo/infer", {"inputs": [
        {"name": "a", "shape": [1], "datatype": "INT32", "data": [1]},
        {"name": "b", "shape": [2], "datatype": "INT32", "data": [1, 2]}]}, 400,
     "inputs disagree on the batch dimension"),
    ("NaN rejected by the model", "/v2/models/affine/infer",
     '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[NaN,1,2,3]}]}', 400,
     "x contains NaN"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [case[1:] for case in KSERVE_BAD],
    ids=[case[0] for case in KSERVE_BAD],
)
def test_kserve_bad_requests_get_their_status_and_a_json_error(
    server, client, path, body, status, message
):
    got, answer = post_json(server, path, body)
    assert got == status
    assert message in answer["error"]
    assert_serving(client)


def test_tritonclient_sees_the_status_and_message(client):
    with pytest.raises(InferenceServerException) as error:
        client.infer("nope", [tensor("x", X, True)])
    assert error.value.status() == "404"
    assert "model 'nope' is not routed by this server" in error.value.message()


def test_binary_data_framing_errors(server, client):
    body = json.dumps(x_json()).encode()
    header = {"Inference-Header-Content-Length": "999"}
    status, _, data = request(server, "POST", "/v2/models/affine/infer", body, header)
    assert status == 400 and b"Inference-Header-Content-Length" in data
    raw = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": 16}}]}
    ).encode()  # fmt: skip
    extra = raw + X[:1].tobytes() + b"junk"
    header = {"Inference-Header-Content-Length": str(len(raw))}
    status, _, data = request(server, "POST", "/v2/models/affine/infer", extra, header)
    assert status == 400 and b"20 bytes follow the JSON header, the inputs declare 16" in data
    assert_serving(client)


def test_unknown_paths_and_methods_answer_json(server):
    status, _, data = request(server, "GET", "/v2/nothing")
    assert status == 404 and json.loads(data)["error"] == "Not Found: GET /v2/nothing"
    status, _, data = request(server, "GET", "/v2/models/affine/infer")
    assert status == 405 and "Method Not Allowed" in json.loads(data)["error"]


# --- TF Serving REST ------------------------------------------------------------------


def test_tf_row_format_unnamed_and_named(server):
    status, answer = post_json(server, "/v1/models/affine:predict", {"instances": X.tolist()})
    assert status == 200
    want = affine_expected(X)
    assert answer == {
        "predictions": [{"y": want["y"][i].tolist(), "s": want["s"][i].tolist()} for i in range(2)]
    }
    named = {"signature_name": "serving_default", "instances": [{"x": row} for row in X.tolist()]}
    assert post_json(server, "/v1/models/affine/versions/1:predict", named) == (200, answer)


def test_tf_columnar_format_unnamed_and_named(server):
    want = affine_expected(X)
    expected = {"outputs": {"y": want["y"].tolist(), "s": want["s"].tolist()}}
    assert post_json(server, "/v1/models/affine:predict", {"inputs": X.tolist()}) == (200, expected)
    named = {"inputs": {"x": X.tolist()}}
    assert post_json(server, "/v1/models/affine-v2:predict", named) == (200, expected)


def test_tf_single_output_and_binary_strings(server):
    status, answer = post_json(server, "/v1/models/echo:predict", {"instances": [{"b64": "AAE="}]})
    assert status == 400 and "does not declare its inputs" in answer["error"]
    columnar = {
        "inputs": {
            "img_bytes": [{"b64": base64.b64encode(b"\x00\xff").decode()}],
            "text": ["héllo"],
            "raw": [{"b64": base64.b64encode(b"\xff").decode()}],
            "count": [[1, 2]],
            "score": [0.5],
            "flag": [True],
        }
    }
    status, answer = post_json(server, "/v1/models/echo:predict", columnar)
    assert status == 200
    assert answer["outputs"] == {
        "img_bytes": [{"b64": "AP8="}],
        "text": ["héllo"],
        "raw": [{"b64": "/w=="}],
        "count": [[1, 2]],
        "score": [0.5],
        "flag": [True],
    }
    rows = {"instances": [{"t": "a"}, {"t": "b"}]}
    assert post_json(server, "/v1/models/echo:predict", rows) == (200, {"predictions": ["a", "b"]})


def test_tf_model_status(server):
    status, _, data = request(server, "GET", "/v1/models/affine")
    assert status == 200
    assert json.loads(data) == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert request(server, "GET", "/v1/models/affine/versions/1")[0] == 200
    status, _, data = request(server, "GET", "/v1/models/affine/versions/3")
    assert status == 404 and "no version '3'" in json.loads(data)["error"]


def test_tf_versions_and_labels_pick_routes_as_the_grpc_api_does(server):
    rows = {"instances": [{"x": [1, 2, 3, 4]}]}
    stable = post_json(server, "/v1/models/pinned/labels/stable:predict", rows)
    assert stable == (200, {"predictions": [{"y": [3.0, 5.0, 7.0, 9.0], "s": [10.0]}]})
    assert post_json(server, "/v1/models/pinned/versions/1:predict", rows) == stable
    canary = {"predictions": [[1.0, 2.0, 3.0, 4.0]]}  # echo: its one output, x
    assert post_json(server, "/v1/models/pinned/labels/canary:predict", rows) == (200, canary)
    assert post_json(server, "/v1/models/pinned:predict", rows) == (200, canary)  # the highest
    status, _, data = request(server, "GET", "/v1/models/pinned")
    assert [s["version"] for s in json.loads(data)["model_version_status"]] == ["1", "2"]
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    status, answer = post_json(server, "/v2/models/pinned/versions/1/infer", body)
    assert (status, [o["name"] for o in answer["outputs"]]) == (200, ["y", "s"])
    status, answer = post_json(server, "/v2/models/pinned/versions/2/infer", body)
    assert (status, [o["name"] for o in answer["outputs"]]) == (200, ["x"])


def test_tf_model_metadata_is_the_signature_def_map(server):
    status, _, data = request(server, "GET", "/v1/models/affine/metadata")
    assert status == 200
    answer = json.loads(data)
    assert answer["model_spec"] == {"name": "affine", "signature_name": "", "version": "1"}
    signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signature["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "4"]
    assert sorted(signature["outputs"]) == ["s", "y"]


TF_BAD = [
    ("unknown model", "/v1/models/nope:predict", {"instances": [[1, 2, 3, 4]]}, 404,
     "model 'nope' is not routed"),
    ("unknown version", "/v1/models/affine/versions/7:predict", {"instances": [[1, 2, 3, 4]]},
     404, "no version '7'"),
    ("unknown label", "/v1/models/pinned/labels/beta:predict", {"instances": [[1, 2, 3, 4]]},
     404, "model 'pinned' has no version label 'beta'"),
    ("unknown signature", "/v1/models/affine:predict",
     {"signature_name": "classify_x", "instances": [[1, 2, 3, 4]]}, 400,
     'Serving signature key "classify_x" not found'),
    ("bad JSON", "/v1/models/affine:predict", '{"instances": [1, 2', 400, "not valid JSON"),
    ("both formats", "/v1/models/affine:predict", {"instances": [], "inputs": []}, 400,
     "both 'instances' and 'inputs'"),
    ("neither format", "/v1/models/affine:predict", {"signature_name": ""}, 400,
     "needs 'instances' (row format) or 'inputs' (columnar)"),
    ("empty instances", "/v1/models/affine:predict", {"instances": []}, 400, "non-empty list"),
    ("ragged rows", "/v1/models/affine:predict", {"instances": [[1, 2, 3, 4], [1, 2]]}, 400,
     "tensor 'x': data is ragged"),
    ("shape mismatch", "/v1/models/affine:predict", {"instances": [[1, 2, 3]]}, 400,
     "shape [1, 3], model 'affine' expects [-1, 4]"),
    ("strings for FP32", "/v1/models/affine:predict", {"inputs": {"x": [["a"] * 4]}}, 400,
     "strings in data for datatype FP32"),
    ("unknown input", "/v1/models/affine:predict", {"inputs": {"z": [[1, 2, 3, 4]]}}, 400,
     "tensor 'z': not an input of model 'affine'"),
    ("rows disagree", "/v1/models/echo:predict", {"instances": [{"a": 1}, {"b": 2}]}, 400,
     "instances[1]: has inputs ['b'], instances[0] has ['a']"),
    ("empty rows", "/v1/models/echo:predict", {"instances": [{}, {}]}, 400,
     "inputs: the request has no input tensors"),
    ("ragged, undeclared", "/v1/models/echo:predict", {"inputs": {"i": [[1, 2], [3]]}}, 400,
     "tensor 'i': data is ragged"),
    ("null value", "/v1/models/echo:predict", {"inputs": {"i": [None]}}, 400,
     "tensor 'i': BYTES data must be strings"),
    ("bad b64", "/v1/models/echo:predict", {"inputs": {"s": [{"b64": "!!"}]}}, 400,
     "'b64' value is not base64"),
    ("malformed URL", "/v1/models/affine:predictt", {"instances": [[1, 2, 3, 4]]}, 404,
     "Malformed request: POST /v1/models/affine:predictt"),
    ("classify", "/v1/models/affine:classify", {"examples": []}, 501, "classify is not supported"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [case[1:] for case in TF_BAD],
    ids=[case[0] for case in TF_BAD],
)
def test_tf_bad_requests_get_their_status_and_a_json_error(
    server, client, path, body, status, message
):
    got, answer = post_json(server, path, body)
    assert (got, list(answer)) == (status, ["error"])
    assert message in answer["error"]
    assert_serving(client)


# --- one batcher for every front end ---------------------------------------------------


async def test_http_and_grpc_callers_share_one_batch():
    config = {
        "http": "127.0.0.1:0",
        "backends": {"b": local_backend("gated")},
        "routes": [{"model": "m", "backend": "b"}],
    }
    async with running(config) as server:
        model = model_of(server, "b")
        url = f"127.0.0.1:{server.http_port}"
        rest = th_aio.InferenceServerClient(url)
        session = aiohttp.ClientSession()
        grpc_client = grpc_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            rows = [np.full((1, 4), i, dtype=np.float32) for i in range(7)]

            async def kserve_rest(x):
                tensor = th_aio.InferInput("x", [1, 4], "FP32")
                tensor.set_data_from_numpy(x)
                return (await rest.infer("m", [tensor])).as_numpy("y")

            async def kserve_grpc(x):
                return (await grpc_client.infer("m", inputs(x=x))).as_numpy("y")

            async def tf_rest(x):
                path = f"http://{url}/v1/models/m:predict"
                async with session.post(path, json={"instances": x.tolist()}) as answer:
                    predictions = (await answer.json())["predictions"]
                return np.array([p["y"] for p in predictions])

            first = asyncio.create_task(kserve_grpc(rows[0]))
            await asyncio.wait_for(model.entered.wait(), 5)
            callers = [kserve_rest, kserve_grpc, tf_rest] * 2
            tasks = [asyncio.create_task(f(x)) for f, x in zip(callers, rows[1:], strict=True)]
            batcher = server.router.backends["b"].batcher
            while batcher.queued_rows < len(tasks):
                await asyncio.sleep(0.01)
            model.gate.set()
            results = await asyncio.gather(first, *tasks)
        finally:
            await rest.close()
            await session.close()
            await grpc_client.close()
    assert model.batches == [1, 6]
    for x, y in zip(rows, results, strict=True):
        np.testing.assert_array_equal(y, 2 * x + 1)


async def test_an_oversized_body_is_413_and_shutdown_lets_http_calls_finish():
    config = {
        "http": "127.0.0.1:0",
        "max_message_mb": 0.01,
        "backends": {"b": local_backend("gated")},
        "routes": [{"model": "m", "backend": "b"}],
    }
    server = Server(config_module.parse({"listen": "127.0.0.1:0", "admin": None, **config}))
    await server.start()
    url = f"http://127.0.0.1:{server.http_port}/v1/models/m:predict"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"instances": [[0.5] * 4] * 1000}) as answer:
            assert answer.status == 413
            assert "Request Entity Too Large" in (await answer.json())["error"]
        call = asyncio.create_task(session.post(url, json={"instances": [[1, 2, 3, 4]]}))
        model = model_of(server, "b")
        await asyncio.wait_for(model.entered.wait(), 5)
        stopping = asyncio.create_task(server.stop(grace=5))
        await asyncio.sleep(0.2)
        model.gate.set()
        async with await call as answer:
            assert answer.status == 200
            assert (await answer.json())["predictions"][0]["s"] == [10.0]
        await stopping


# --- drop-in for Triton's HTTP endpoint ------------------------------------------------


@pytest.fixture(scope="module")
def triton_proxy(triton, tmp_path_factory):
    from tests.support.coalesce import Process

    port = free_port()
    process = Process(
        {
            "http": f"127.0.0.1:{port}",
            "backends": {
                "affine": {"type": "triton", "target": triton.grpc_url, "model": "affine"}
            },
            "routes": [{"model": "affine", "backend": "affine"}],
        },
        tmp_path_factory.mktemp("rest-triton"),
    )
    process.http_url = f"127.0.0.1:{port}"
    yield process
    assert process.terminate() == 0, process.output()


@pytest.mark.parametrize("via", ["triton-direct", "coalesce"])
def test_drop_in_tritonclient_http_code_passes_against_triton_and_coalesce(
    triton, triton_proxy, via
):
    url = triton.http_url if via == "triton-direct" else triton_proxy.http_url
    x = np.random.default_rng(3).standard_normal((3, 4), dtype=np.float32)
    with th.InferenceServerClient(url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("affine")
        meta = client.get_model_metadata("affine")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        result = client.infer("affine", [tensor("x", x, True)], request_id="q1")
        assert result.get_response()["id"] == "q1"
        np.testing.assert_allclose(result.as_numpy("y"), 2 * x + 1, rtol=1e-6)
        outputs = [th.InferRequestedOutput("s", binary_data=False)]
        only_s = client.infer("affine", [tensor("x", x, False)], outputs=outputs)
        assert [o["name"] for o in only_s.get_response()["outputs"]] == ["s"]
        np.testing.assert_allclose(only_s.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-5)
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", [tensor("x", x, True)])
