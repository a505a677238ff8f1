"""`type: tfserving` backends, and TF Serving clients served by other backends.

TF Serving's server binary cannot be installed here, so the backend side is
tests/support/tfserving.py: a TF-Serving-protocol server built on the official
tensorflow-serving-api stubs that executes real TensorFlow SavedModels. Clients
are the official ones: tensorflow-serving-api's PredictionServiceStub and
tritonclient, against a real `coalesce serve`.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import tritonclient.grpc as tc  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402  (after the skip)
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.client import affine_expected, inputs  # noqa: E402
from tests.conftest import running  # noqa: E402

X = np.arange(12, dtype=np.float32).reshape(3, 4) / 8


@pytest.fixture(scope="module")
def tfserving(tmp_path_factory):
    from tests.support.tfserving import TFServingServer, build_models

    root = build_models(tmp_path_factory.mktemp("savedmodels"))
    with TFServingServer(root, labels={"affine": {"stable": 1}}) as server:
        yield server


def tfserving_backend(server, model: str, **fields) -> dict:
    return {"type": "tfserving", "target": server.url, "model": model, **fields}


@pytest.fixture(scope="module")
def proxy(tfserving, tmp_path_factory):
    """`coalesce serve` in front of the TF-Serving-protocol server."""
    from tests.support.coalesce import Process

    backends = {
        "affine": tfserving_backend(tfserving, "affine", version=1),
        "affine2": tfserving_backend(tfserving, "affine", version=2),
        "latest": tfserving_backend(tfserving, "affine"),
        "doubled": tfserving_backend(tfserving, "affine", version=1, signature="doubled"),
        "strings": tfserving_backend(tfserving, "strings"),
        "half": tfserving_backend(tfserving, "half"),
    }
    routes = [{"model": name, "backend": name} for name in backends]
    routes.append({"model": "tf", "version": 1, "backend": "affine"})
    routes.append({"model": "tf", "version": 2, "backend": "affine2"})
    process = Process({"backends": backends, "routes": routes}, tmp_path_factory.mktemp("proxy"))
    yield process
    assert process.terminate() == 0, process.output()


def predict(url: str, model: str, version: int | None = None, **arrays):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    for name, array in arrays.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    with grpc.insecure_channel(url) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=10)
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


@pytest.mark.parametrize("via", ["tfserving-direct", "coalesce"])
def test_tf_serving_client_code_passes_against_both(tfserving, proxy, via):
    url = tfserving.url if via == "tfserving-direct" else proxy.url
    out = predict(url, "affine", version=1, x=X)
    for name, expected in affine_expected(X).items():
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)


def test_metadata_through_coalesce_describes_the_savedmodel(proxy):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "affine"
    with grpc.insecure_channel(proxy.url) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["x"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in signature.inputs["x"].tensor_shape.dim] == [-1, 4]
    assert sorted(signature.outputs) == ["s", "y"]


def test_triton_client_served_by_a_tfserving_backend(proxy):
    with tc.InferenceServerClient(proxy.url) as client:
        meta = client.get_model_metadata("affine")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 4])
        ]
        result = client.infer("affine", inputs(x=X))
        np.testing.assert_allclose(result.as_numpy("y"), 2 * X + 1, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("s"), X.sum(axis=1, keepdims=True), rtol=1e-6)
        with pytest.raises(InferenceServerException, match="datatype INT32"):
            client.infer("affine", inputs(x=X.astype(np.int32)))
        # routes pinned to versions serve KServe's model_version too
        for version, scale in [("1", 2), ("2", 3), ("", 3)]:
            result = client.infer("tf", inputs(x=X), model_version=version)
            np.testing.assert_allclose(result.as_numpy("y"), scale * X + 1, rtol=1e-6)
        with pytest.raises(InferenceServerException, match="no version '3'"):
            client.infer("tf", inputs(x=X), model_version="3")


def test_model_status_through_coalesce_reflects_the_tf_serving_backend(proxy):
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tf"
    with grpc.insecure_channel(proxy.url) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        statuses = stub.GetModelStatus(request, timeout=10).model_version_status
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert [(s.version, s.state) for s in statuses] == [(1, available), (2, available)]


def test_backend_version_signature_and_routed_versions(proxy):
    np.testing.assert_allclose(predict(proxy.url, "affine2", x=X)["y"], 3 * X + 1)
    np.testing.assert_allclose(predict(proxy.url, "latest", x=X)["y"], 3 * X + 1)
    assert list(predict(proxy.url, "doubled", x=X)) == ["y"]
    np.testing.assert_allclose(predict(proxy.url, "doubled", x=X)["y"], 2 * X)
    np.testing.assert_allclose(predict(proxy.url, "tf", version=1, x=X)["y"], 2 * X + 1)
    np.testing.assert_allclose(predict(proxy.url, "tf", x=X)["y"], 3 * X + 1)


def test_strings_and_half_through_a_tfserving_backend(proxy):
    text = np.array([b"ab", b"", b"xyz\xff"], dtype=object)
    out = predict(proxy.url, "strings", text=text)
    np.testing.assert_array_equal(out["upper"], np.array([b"AB", b"", b"XYZ\xff"], object))
    np.testing.assert_array_equal(out["length"], np.array([2, 0, 4]))
    half = np.array([[1.5, -2], [0.25, 100]], dtype=np.float16)
    out = predict(proxy.url, "half", h=half)
    assert out["twice"].dtype == np.float16
    np.testing.assert_array_equal(out["twice"], half * 2)


def test_a_failing_op_keeps_tf_servings_status(proxy):
    bad = X.copy()
    bad[1, 2] = np.nan
    with pytest.raises(grpc.RpcError) as caught:
        predict(proxy.url, "affine", x=bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "backend 'affine'" in caught.value.details()
    assert "x contains NaN or Inf" in caught.value.details()
    np.testing.assert_allclose(predict(proxy.url, "affine", x=X)["y"], 2 * X + 1)


async def test_concurrent_tf_clients_reach_tf_serving_as_batches(tfserving, proxy):
    before = len(tfserving.calls_of("affine"))
    async with grpc.aio.insecure_channel(proxy.url) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        async def caller(i: int) -> None:
            x = np.full((1, 4), i, np.float32)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "affine"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            response = await stub.Predict(request, timeout=20)
            np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), 2 * x + 1)

        await asyncio.gather(*(caller(i) for i in range(48)))
    calls = tfserving.calls_of("affine")[before:]
    assert sum(calls) == 48
    assert len(calls) < 48, calls


async def test_an_unreachable_tf_serving_is_unavailable_not_a_crash():
    from tests.support.coalesce import free_port

    config = {
        "backends": {
            "gone": {"type": "tfserving", "target": f"127.0.0.1:{free_port()}", "model": "m"}
        },
        "routes": [{"model": "gone", "backend": "gone"}],
    }
    async with running(config) as server:
        assert not server.router.ready
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "gone"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Predict(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "backend 'gone'" in caught.value.details()


@pytest.fixture(scope="module")
def triton_proxy(triton, tmp_path_factory):
    from tests.support.coalesce import Process

    backend = {"type": "triton", "target": triton.grpc_url, "model": "affine"}
    process = Process(
        {"backends": {"affine": backend}, "routes": [{"model": "affine", "backend": "affine"}]},
        tmp_path_factory.mktemp("triton-proxy"),
    )
    yield process
    assert process.terminate() == 0, process.output()


def test_tf_serving_client_served_by_a_triton_backend(triton_proxy):
    out = predict(triton_proxy.url, "affine", x=X)
    for name, expected in affine_expected(X).items():
        np.testing.assert_allclose(out[name], expected, rtol=1e-6)
    with pytest.raises(grpc.RpcError) as caught:
        predict(triton_proxy.url, "affine", x=X.astype(np.complex64))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'x'" in caught.value.details()
