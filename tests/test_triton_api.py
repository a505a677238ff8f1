"""Triton's calls beyond inference, through tritonclient (gRPC and HTTP) as its tools
make them: model configuration, statistics, the repository index, readiness of unknown
models, and a status that says what to do for every call Coalesce does not serve.

One `coalesce serve` routes a local model and a model on a real Triton; Triton is also
asked directly, so the answers are compared with Triton's own.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.client import inputs
from tests.conftest import local_backend

X = np.ones((3, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    from tests.support.coalesce import Process, free_port

    triton_backend = {"type": "triton", "target": triton.grpc_url, "model": "affine"}
    process = Process(
        {
            "http": f"127.0.0.1:{free_port()}",
            "grpc_aio_listen": f"127.0.0.1:{free_port()}",
            "backends": {
                "local": local_backend("affine", batching={"max_batch_size": 16}),
                "triton": {**triton_backend, "batching": {"max_batch_size": 8}},
                "wide": {**triton_backend, "batching": {"max_batch_size": 1000}},
                "gone": {"type": "triton", "target": f"127.0.0.1:{free_port()}", "model": "m"},
            },
            "routes": [
                {"model": "local", "backend": "local"},
                {"model": "on-triton", "backend": "triton"},
                {"model": "wide", "backend": "wide"},
                {"model": "gone", "backend": "gone"},
            ],
        },
        tmp_path_factory.mktemp("triton-api"),
    )
    yield process
    assert process.terminate() == 0


@pytest.fixture(params=["grpc", "http"])
def client(proxy, request):
    """tritonclient of either protocol, answering configs and statistics as dicts."""
    if request.param == "grpc":
        grpc_client = tc.InferenceServerClient(proxy.url)
        yield Client(grpc_client, as_json=True)
        grpc_client.close()
    else:
        http_client = th.InferenceServerClient(proxy.http)
        yield Client(http_client, as_json=False)
        http_client.close()


class Client:
    """One interface over both clients: the gRPC one's answers in their JSON form."""

    def __init__(self, inner, as_json: bool) -> None:
        self.inner, self.grpc = inner, as_json

    def _kw(self) -> dict:
        return {"as_json": True} if self.grpc else {}

    def config(self, model: str) -> dict:
        answer = self.inner.get_model_config(model, **self._kw())
        return answer["config"] if self.grpc else answer

    def stats(self, model: str = "") -> dict:
        return self.inner.get_inference_statistics(model, **self._kw())

    def index(self) -> list:
        answer = self.inner.get_model_repository_index(**self._kw())
        return answer.get("models", []) if self.grpc else answer

    def infer(self, model: str, x: np.ndarray) -> None:
        if self.grpc:
            result = self.inner.infer(model, inputs(x=x))
        else:
            tensor = th.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = self.inner.infer(model, [tensor])
        np.testing.assert_allclose(result.as_numpy("y"), 2 * x + 1)


def test_a_built_config_describes_the_model_as_coalesce_batches_it(client):
    config = client.config("local")
    assert config["name"] == "local"
    assert int(config["max_batch_size"]) == 16  # the backend's batch limit
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]] == [
        ("x", "TYPE_FP32", [4])  # the batch dimension is out of dims, as on Triton
    ]
    outputs = {o["name"]: [int(d) for d in o["dims"]] for o in config["output"]}
    assert outputs == {"y": [4], "s": [1]}
    assert "dynamic_batching" in config


def test_a_triton_backend_gives_tritons_own_config_within_the_batch_limit(client, triton):
    direct = tc.InferenceServerClient(triton.grpc_url)
    try:
        own = direct.get_model_config("affine", as_json=True)["config"]
    finally:
        direct.close()
    config = client.config("on-triton")
    assert config["name"] == "on-triton"
    assert int(config["max_batch_size"]) == 8  # Triton allows 64; one Coalesce batch is 8
    assert int(own["max_batch_size"]) == 64
    assert config["backend"] == own["backend"] == "python"
    assert config["input"][0]["name"] == own["input"][0]["name"] == "x"
    assert [int(d) for d in config["input"][0]["dims"]] == [4]
    # a limit above Triton's own keeps Triton's
    assert int(client.config("wide")["max_batch_size"]) == 64


def test_config_of_an_unknown_model_is_not_found_naming_it(client):
    with pytest.raises(InferenceServerException, match="model 'nope' is not routed"):
        client.config("nope")


def number(entry: dict, *keys: str) -> int:
    """A counter of a statistics answer (protobuf's JSON leaves zeros out)."""
    for key in keys:
        entry = entry.get(key, {})
    return int(entry or 0)


def test_statistics_count_what_was_served(client):
    old = {s["name"]: s for s in client.stats()["model_stats"]}["local"]
    for _ in range(4):
        client.infer("local", X)
    (new,) = client.stats("local")["model_stats"]

    def grew(*keys: str) -> int:
        return number(new, *keys) - number(old, *keys)

    assert new["name"] == "local" and new["version"] == "1"
    assert grew("inference_count") == 12  # rows
    assert grew("inference_stats", "success", "count") == 4
    assert grew("inference_stats", "success", "ns") > 0
    assert grew("inference_stats", "fail", "count") == 0
    assert grew("execution_count") == 4  # each lone request went at once
    assert grew("inference_stats", "queue", "count") == 4
    assert grew("inference_stats", "compute_infer", "count") == 4
    calls = number(new, "execution_count")
    assert sum(number(b, "compute_infer", "count") for b in new["batch_stats"]) == calls
    assert 3 in {number(b, "batch_size") for b in new["batch_stats"]}
    assert number(new, "last_inference") > 0


def test_statistics_of_every_model_list_each_route(client):
    names = {s["name"] for s in client.stats()["model_stats"]}
    assert names == {"local", "on-triton", "wide", "gone"}


def test_repository_index_lists_each_routed_model_with_its_state(client):
    states = {m["name"]: m.get("state") for m in client.index()}
    assert states == {
        "local": "READY",
        "on-triton": "READY",
        "wide": "READY",
        "gone": "UNAVAILABLE",
    }


def test_an_unknown_model_is_not_ready_as_on_triton(client, triton):
    assert client.inner.is_model_ready("nope") is False
    assert client.inner.is_model_ready("local") is True
    direct = tc.InferenceServerClient(triton.grpc_url)
    try:
        assert direct.is_model_ready("nope") is False  # what Triton itself answers
    finally:
        direct.close()


def test_server_metadata_lists_the_extensions_served(client):
    extensions = set(client.inner.get_server_metadata(**client._kw())["extensions"])
    assert extensions == {
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "statistics",
        "system_shared_memory",
    }


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda c: c.load_model("local"), "routes come from its config"),
        (lambda c: c.unload_model("local"), "routes come from its config"),
        (lambda c: c.get_cuda_shared_memory_status(), "CUDA shared memory is not supported"),
        (lambda c: c.get_log_settings(), "log_level"),
        (lambda c: c.get_trace_settings(), "OpenTelemetry"),
    ],
    ids=["load", "unload", "cuda-shm", "log", "trace"],
)
def test_calls_coalesce_does_not_serve_say_what_to_do_instead(client, call, says):
    with pytest.raises(InferenceServerException, match=says) as caught:
        call(client.inner)
    assert caught.value.status() in ("StatusCode.UNIMPLEMENTED", "501")


@pytest.mark.parametrize("listener", ["listen", "grpc_aio_listen"])
def test_an_unknown_method_is_unimplemented_naming_it_on_every_listener(proxy, listener):
    import yaml

    address = proxy.url
    if listener == "grpc_aio_listen":
        address = yaml.safe_load(proxy.config.read_text())["grpc_aio_listen"]
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary("/inference.GRPCInferenceService/NoSuchCall")
        with pytest.raises(grpc.RpcError) as caught:
            method(b"", timeout=5)
        stream = channel.stream_stream("/some.Other/Streaming")
        with pytest.raises(grpc.RpcError) as streamed:
            list(stream(iter([b""]), timeout=5))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/inference.GRPCInferenceService/NoSuchCall" in caught.value.details()
    assert streamed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/some.Other/Streaming" in streamed.value.details()
