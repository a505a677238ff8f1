"""`type: grpc` backends: the example service speaking Coalesce's batch protocol
(config/examples/batch_server.py) and a team service with its own protos reached
through the example codec (config/examples/scorer_*.py), called with tritonclient."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
import yaml
from coalesce import ConfigError
from coalesce import config as config_module
from coalesce.codecs import wire
from coalesce.core.router import StartupError
from tritonclient.utils import InferenceServerException

from config.examples import batch_server, scorer_server
from tests.client import affine_expected, inputs, raw_infer
from tests.conftest import running
from tests.support.coalesce import ROOT, free_port

X = np.arange(12, dtype=np.float32).reshape(3, 4)


@contextlib.asynccontextmanager
async def batch_service(**kwargs) -> AsyncIterator[tuple[batch_server.BatchService, str]]:
    service = batch_server.BatchService(**kwargs)
    server, port = await batch_server.serve("127.0.0.1:0", service)
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def grpc_config(target: str, model: str = "affine", **fields) -> dict:
    return {
        "backends": {"b": {"type": "grpc", "target": target, "model": model, **fields}},
        "routes": [{"model": "m", "backend": "b"}],
    }


async def test_batch_protocol_serves_metadata_and_answers():
    async with batch_service() as (_, target), running(grpc_config(target)) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert await client.is_model_ready("m")
            meta = await client.get_model_metadata("m")
            assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
                ("x", "FP32", [-1, 4])
            ]
            assert meta.platform == "example"
            result = await client.infer("m", inputs(x=X))
            for name, want in affine_expected(X).items():
                np.testing.assert_array_equal(result.as_numpy(name), want)
        finally:
            await client.close()


async def test_concurrent_callers_reach_the_service_as_few_batches_within_its_limit():
    config = grpc_config("", batching={"max_delay_ms": 50})
    async with batch_service(max_batch_size=8) as (service, target):
        config["backends"]["b"]["target"] = target
        async with running(config) as server:
            client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
            try:
                rows = [np.full((1, 4), i, dtype=np.float32) for i in range(20)]
                results = await asyncio.gather(
                    *(client.infer("m", inputs(x=x)) for x in rows),
                    client.infer("m", inputs(x=np.ones((11, 4), np.float32))),
                )
            finally:
                await client.close()
    for x, result in zip(rows, results, strict=False):
        np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)
    assert sum(service.batches) == 31
    assert max(service.batches) == 8 and len(service.batches) <= 6


async def test_every_datatype_crosses_the_batch_protocol():
    arrays = {
        "b": np.array([[True, False]]),
        "u8": np.array([[0, 255]], np.uint8),
        "u64": np.array([[2**64 - 1, 0]], np.uint64),
        "i16": np.array([[-3, 7]], np.int16),
        "i64": np.array([[-(2**63), 2**63 - 1]], np.int64),
        "f16": np.array([[0.5, -2]], np.float16),
        "f64": np.array([[1e300, -0.0]], np.float64),
        "s": np.array([[b"", b"\xff\x00bytes"]], dtype=object),
    }
    async with batch_service() as (_, target), running(grpc_config(target, "echo")) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            result = await client.infer("m", inputs(**arrays))
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                request = wire.ModelInferRequest(model_name="m")
                request.inputs.add(name="bf", datatype="BF16", shape=[1, 2])
                request.raw_input_contents.append(b"\xc0\x3f\x00\xc0")
                bf16 = await asyncio.to_thread(raw_infer, channel, request)
        finally:
            await client.close()
    for name, array in arrays.items():
        assert result.as_numpy(name).dtype == array.dtype
        np.testing.assert_array_equal(result.as_numpy(name), array)
    assert (bf16.outputs[0].datatype, bf16.raw_output_contents[0]) == ("BF16", b"\xc0\x3f\x00\xc0")


async def test_a_service_error_keeps_its_status_and_the_server_goes_on():
    async with batch_service() as (_, target), running(grpc_config(target)) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            bad = X.copy()
            bad[1, 2] = np.nan
            with pytest.raises(InferenceServerException) as error:
                await client.infer("m", inputs(x=bad))
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "backend 'b': bad batch: x contains NaN" in error.value.message()
            with pytest.raises(InferenceServerException, match="expects FP32"):
                await client.infer("m", inputs(x=X.astype(np.int32)))
            result = await client.infer("m", inputs(x=X))
            np.testing.assert_array_equal(result.as_numpy("s"), affine_expected(X)["s"])
        finally:
            await client.close()


async def test_a_service_that_is_down_is_unavailable_until_it_comes_up():
    port = free_port()
    async with running(grpc_config(f"127.0.0.1:{port}")) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert not await client.is_model_ready("m")
            with pytest.raises(InferenceServerException) as error:
                await client.infer("m", inputs(x=X))
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            service = batch_server.BatchService()
            grpc_server, _ = await batch_server.serve(f"127.0.0.1:{port}", service)
            try:
                for _ in range(50):
                    if await client.is_model_ready("m"):
                        break
                    await asyncio.sleep(0.1)
                result = await client.infer("m", inputs(x=X))
                np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
            finally:
                await grpc_server.stop(0)
        finally:
            await client.close()


async def test_a_service_that_says_not_ready_gets_no_batches():
    async with batch_service() as (service, target):
        service.ready = False
        async with running(grpc_config(target)) as server:
            client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
            try:
                assert not await client.is_model_ready("m")
                with pytest.raises(InferenceServerException, match="is not ready") as error:
                    await client.infer("m", inputs(x=X))
                assert error.value.status() == "StatusCode.UNAVAILABLE"
                service.ready = True
                result = await client.infer("m", inputs(x=X))
                np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
            finally:
                await client.close()
    assert service.batches == [3]


# --- a service with its own protos, through a codec ------------------------------------


def scorer_config(target: str, codec: str = "config.examples.scorer_codec:ScorerCodec") -> dict:
    return {
        "backends": {"b": {"type": "grpc", "target": target, "codec": codec}},
        "routes": [{"model": "scorer", "backend": "b"}],
    }


def scores(x: np.ndarray) -> np.ndarray:
    return (x @ np.array(scorer_server.WEIGHTS, np.float32)).reshape(-1, 1)


async def test_a_codec_puts_a_team_service_behind_coalesce():
    scorer = scorer_server.Scorer()
    grpc_server, port = await scorer_server.serve("127.0.0.1:0", scorer)
    config = scorer_config(f"127.0.0.1:{port}")
    config["backends"]["b"]["batching"] = {"max_delay_ms": 50}
    try:
        async with running(config) as server:
            client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
            try:
                assert await client.is_model_ready("scorer")  # no health service: still up
                meta = await client.get_model_metadata("scorer")
                assert [t.name for t in meta.outputs] == ["score", "label"]
                rows = [X[i : i + 1] for i in range(3)]
                results = await asyncio.gather(*(client.infer("scorer", inputs(x=x)) for x in rows))
                with pytest.raises(InferenceServerException, match="shape \\[1, 3\\]"):
                    await client.infer("scorer", inputs(x=X[:1, :3]))
            finally:
                await client.close()
    finally:
        await grpc_server.stop(0)
    assert scorer.batches == [3]
    for x, result in zip(rows, results, strict=True):
        np.testing.assert_allclose(result.as_numpy("score"), scores(x), rtol=1e-6)
        want = [[b"high" if s >= scorer_server.THRESHOLD else b"low"] for s in scores(x)[:, 0]]
        assert result.as_numpy("label").tolist() == want


@pytest.mark.parametrize(
    ("codec", "message"),
    [
        ("config.examples.no_such_module:Codec", "cannot import 'config.examples.no_such_module"),
        ("coalesce.core.request:TensorSpec", "TypeError"),
        ("tests.models:Echo", "lacks method, request_serializer"),
    ],
)
async def test_a_broken_codec_stops_the_server_from_starting(codec, message):
    with pytest.raises(StartupError, match=message):
        async with running(scorer_config("127.0.0.1:1", codec)):
            pass


def test_grpc_backend_config_problems_name_their_keys():
    data = {
        "http": "port-only",
        "backends": {
            "a": {"type": "grpc", "target": "nowhere", "codec": "no-colon"},
            "b": {"type": "grpc", "model": "m", "colour": "red"},
        },
        "routes": [],
    }
    with pytest.raises(ConfigError) as error:
        config_module.parse(data)
    assert sorted(error.value.problems) == [
        "backends.a.codec: must be 'module:attribute', got 'no-colon'",
        "backends.a.target: must be host:port, got 'nowhere'",
        "backends.b.colour: unknown key",
        "backends.b.target: required",
        "http: must be host:port, got 'port-only'",
    ]


# --- the shipped example config, with the example services as real processes ----------


@pytest.fixture
def example_services():
    """config/examples/grpc_backends.yaml's two services, each started as its docs say."""
    ports = free_port(), free_port()
    commands = [
        [sys.executable, "config/examples/batch_server.py", "--port", str(ports[0])],
        [sys.executable, "-m", "config.examples.scorer_server", "--port", str(ports[1])],
    ]
    procs = [
        subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for c in commands
    ]
    try:
        for port in ports:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_the_example_config_serves_both_services_on_every_front_end(
    coalesce_process, example_services
):
    data = yaml.safe_load((ROOT / "config/examples/grpc_backends.yaml").read_text())
    for backend, port in zip(("affine", "scorer"), example_services, strict=True):
        data["backends"][backend]["target"] = f"127.0.0.1:{port}"
    del data["listen"], data["admin"]  # the fixture picks free ports
    port = free_port()
    proxy = coalesce_process({**data, "http": f"127.0.0.1:{port}"})
    with tc.InferenceServerClient(proxy.url) as client:
        for _ in range(50):
            if client.is_server_ready():
                break
        result = client.infer("affine", inputs(x=X))
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
        scored = client.infer("scorer", inputs(x=X))
        np.testing.assert_allclose(scored.as_numpy("score"), scores(X), rtol=1e-6)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/v1/models/scorer:predict", json.dumps({"instances": X.tolist()}))
    predictions = json.load(connection.getresponse())["predictions"]
    connection.close()
    np.testing.assert_allclose([p["score"] for p in predictions], scores(X), rtol=1e-6)
    assert [p["label"] for p in predictions] == [["low"], ["high"], ["high"]]


def test_the_codec_in_the_readme_is_the_shipped_example():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("# config/examples/scorer_codec.py\n", 1)[1].split("```", 1)[0]
    shipped = (ROOT / "config/examples/scorer_codec.py").read_text()
    missing = [line for line in block.splitlines() if line.strip() and line not in shipped]
    assert not missing
