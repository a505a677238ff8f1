"""Any front end to any backend: each protocol's official client, through Coalesce, to
each kind of backend, gets the same numbers for the same input.

Front ends: KServe v2 gRPC (tritonclient.grpc), KServe v2 REST (tritonclient.http),
TF Serving gRPC (tensorflow-serving-api), TF Serving REST (plain HTTP/JSON, as TF
Serving's own REST API has no official client). Backends, all computing y = 2x + 1
and s = row sums: an in-process model, a real Triton, a TF-Serving-protocol server
running a real SavedModel (tests/support/tfserving.py), and the example service of
Coalesce's own batch protocol (config/examples/batch_server.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc_grpc
import tritonclient.http as tc_http

from tests.conftest import local_backend
from tests.support.coalesce import ROOT, Process, free_port

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

X = np.array([[1, 2, 3, 4], [-1, 0.5, 7, 0], [10, 20, 30, 40]], dtype=np.float32)
WANT = {"y": 2 * X + 1, "s": X.sum(axis=1, keepdims=True)}
BACKENDS = ["local", "triton", "tfserving", "grpc"]


@pytest.fixture(scope="module")
def backends(triton, tmp_path_factory):
    from tests.support.tfserving import TFServingServer, build_models

    port = free_port()
    batch = subprocess.Popen(
        [sys.executable, "config/examples/batch_server.py", "--port", str(port)], cwd=ROOT
    )
    root = build_models(tmp_path_factory.mktemp("savedmodels"))
    with TFServingServer(root) as tfserving:
        yield {
            "local": local_backend("affine"),
            "triton": {"type": "triton", "target": triton.grpc_url, "model": "affine"},
            "tfserving": {
                "type": "tfserving",
                "target": tfserving.url,
                "model": "affine",
                "version": 1,
            },
            "grpc": {"type": "grpc", "target": f"127.0.0.1:{port}", "model": "affine"},
        }
    batch.terminate()
    batch.wait()


@pytest.fixture(scope="module")
def proxy(backends, tmp_path_factory):
    http = free_port()
    process = Process(
        {
            "http": f"127.0.0.1:{http}",
            "backends": backends,
            "routes": [{"model": f"via-{name}", "backend": name} for name in backends],
        },
        tmp_path_factory.mktemp("matrix"),
    )
    process.http_url = f"127.0.0.1:{http}"
    with tc_grpc.InferenceServerClient(process.url) as client:  # every backend ready
        deadline = time.monotonic() + 30
        while not all(client.is_model_ready(f"via-{b}") for b in BACKENDS):
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.2)
    yield process
    process.terminate()


def kserve_grpc(proxy, model: str) -> dict[str, np.ndarray]:
    with tc_grpc.InferenceServerClient(proxy.url) as client:
        x = tc_grpc.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X)
        result = client.infer(model, [x])
        return {name: result.as_numpy(name) for name in ("y", "s")}


def kserve_rest(proxy, model: str) -> dict[str, np.ndarray]:
    client = tc_http.InferenceServerClient(proxy.http_url)
    try:
        x = tc_http.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X)
        result = client.infer(model, [x])
        return {name: result.as_numpy(name) for name in ("y", "s")}
    finally:
        client.close()


def tfserving_grpc(proxy, model: str) -> dict[str, np.ndarray]:
    with grpc.insecure_channel(proxy.url) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "serving_default"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
        response = stub.Predict(request, timeout=30)
        return {name: tf.make_ndarray(response.outputs[name]) for name in ("y", "s")}


def tfserving_rest(proxy, model: str) -> dict[str, np.ndarray]:
    body = json.dumps({"instances": X.tolist()}).encode()
    request = urllib.request.Request(
        f"http://{proxy.http_url}/v1/models/{model}:predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        rows = json.load(answer)["predictions"]
    return {name: np.array([row[name] for row in rows], dtype=np.float32) for name in ("y", "s")}


FRONT_ENDS = {
    "kserve-grpc": kserve_grpc,
    "kserve-rest": kserve_rest,
    "tfserving-grpc": tfserving_grpc,
    "tfserving-rest": tfserving_rest,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_every_front_end_reaches_every_backend_with_the_same_numbers(proxy, front_end, backend):
    got = FRONT_ENDS[front_end](proxy, f"via-{backend}")
    for name, want in WANT.items():
        np.testing.assert_array_equal(got[name].reshape(want.shape), want)
