"""Coalesce in front of a real Triton server (python-backend models, Triton's own
dynamic batching OFF), called with the official tritonclient."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.client import affine_expected, inputs
from tests.support.coalesce import ROOT, free_port


def triton_backend(triton, model: str, **fields) -> dict:
    return {"type": "triton", "target": triton.grpc_url, "model": model, **fields}


@pytest.fixture(scope="module", params=["grpc", "native"])
def proxy(triton, tmp_path_factory, request):
    """`coalesce serve` routing every Triton test model (two names for `affine`); every
    test runs with each `transport` to Triton: gRPC core, and Coalesce's own HTTP/2."""
    from tests.support.coalesce import Process

    models = ["affine", "affine_nobatch", "slow_affine", "bytes_echo", "int_ops"]
    backends = {m: triton_backend(triton, m, transport=request.param) for m in models}
    backends["big"] = triton_backend(
        triton, "affine", batching={"max_batch_size": 200}, transport=request.param
    )
    backends["slow_bounded"] = triton_backend(
        triton, "slow_affine", timeout_ms=60, transport=request.param
    )
    routes = [{"model": m, "backend": m} for m in backends]
    routes.append({"model": "affine-v2", "backend": "affine"})
    process = Process({"backends": backends, "routes": routes}, tmp_path_factory.mktemp("proxy"))
    yield process
    assert process.terminate() == 0, process.output()


def stats(triton, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) from Triton's own statistics API."""
    with tc.InferenceServerClient(triton.grpc_url) as client:
        s = client.get_inference_statistics(model).model_stats[0]
    return s.inference_count, s.execution_count


def exercise(url: str, model: str) -> None:
    """Ordinary tritonclient code, written for Triton: it must pass against either."""
    with tc.InferenceServerClient(url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(model)
        meta = client.get_model_metadata(model)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("x", "FP32", [-1, 4])
        ]
        assert sorted(t.name for t in meta.outputs) == ["s", "y"]
        x = np.random.default_rng(1).standard_normal((3, 4), dtype=np.float32)
        result = client.infer(model, inputs(x=x), request_id="r1")
        assert result.get_response().id == "r1"
        np.testing.assert_allclose(result.as_numpy("y"), 2 * x + 1, rtol=1e-6)
        only_s = client.infer(model, inputs(x=x), outputs=[tc.InferRequestedOutput("s")])
        assert [o.name for o in only_s.get_response().outputs] == ["s"]
        np.testing.assert_allclose(only_s.as_numpy("s"), x.sum(axis=1, keepdims=True), rtol=1e-5)
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", inputs(x=x))


@pytest.mark.parametrize("via", ["triton-direct", "coalesce"])
def test_drop_in_the_same_client_code_passes_against_triton_and_coalesce(triton, proxy, via):
    exercise(triton.grpc_url if via == "triton-direct" else proxy.url, "affine")


async def slow_affine_executions(triton, proxy, callers: int, rounds: int) -> int:
    """Triton executions of `slow_affine` (200 ms each) for `callers` closed-loop
    callers sending `rounds` single rows each; every answer is checked."""
    before = stats(triton, "slow_affine")
    client = aio.InferenceServerClient(proxy.url)

    async def caller(i):
        for j in range(rounds):
            x = np.full((1, 4), i * 100 + j, dtype=np.float32)
            result = await client.infer("slow_affine", inputs(x=x))
            np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    await client.close()
    after = stats(triton, "slow_affine")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    print(f"{inferences} requests -> {executions} Triton executions")
    assert inferences == callers * rounds
    return executions


async def test_64_concurrent_single_rows_reach_triton_as_few_executions(triton, proxy):
    """While Triton runs the first (200 ms) execution, the other 63 queue and go as one."""
    assert await slow_affine_executions(triton, proxy, callers=64, rounds=1) <= 4


async def test_closed_loop_callers_are_coalesced_by_load(triton, proxy):
    """64 callers sending single rows back to back: batches hold what arrived meanwhile.

    The model takes 200 ms, so what arrives during a call is the load, not the pace of
    this one Python client (against a fast model the client, not Coalesce, is the limit)."""
    assert await slow_affine_executions(triton, proxy, callers=64, rounds=3) <= 192 / 8


async def test_many_concurrent_callers_get_their_own_rows_from_triton(proxy):
    client = aio.InferenceServerClient(proxy.url)
    rng = np.random.default_rng(7)

    async def one(i):
        x = rng.standard_normal((1 + i % 4, 4), dtype=np.float32)
        route = ("affine", "affine-v2")[i % 2]
        result = await client.infer(route, inputs(x=x), request_id=str(i))
        assert result.get_response().id == str(i)
        want = affine_expected(x)
        np.testing.assert_allclose(result.as_numpy("y"), want["y"], rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("s"), want["s"], rtol=1e-5, atol=1e-6)

    await asyncio.gather(*(one(i) for i in range(300)))
    await client.close()


def test_batches_never_exceed_the_triton_models_max_batch_size(triton, proxy):
    before = stats(triton, "affine")
    x = np.arange(150 * 4, dtype=np.float32).reshape(150, 4)
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("big", inputs(x=x))  # 150 rows; the model takes 64 at most
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)
    after = stats(triton, "affine")
    assert (after[0] - before[0], after[1] - before[1]) == (150, 3)


def test_a_model_with_batching_off_is_called_row_by_row(triton, proxy):
    before = stats(triton, "affine_nobatch")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("affine_nobatch", inputs(x=x))
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)
    after = stats(triton, "affine_nobatch")
    assert after[1] - before[1] == 3


def test_bytes_and_integer_models(proxy):
    with tc.InferenceServerClient(proxy.url) as client:
        text = np.array([[b"abc"], [b"hello"]], dtype=object)
        out = client.infer("bytes_echo", inputs(text=text)).as_numpy("out")
        assert out.reshape(-1).tolist() == [b"cba", b"olleh"]
        a = np.array([[1, -2, 3], [2**30, 0, 7]], dtype=np.int32)
        b = client.infer("int_ops", inputs(a=a)).as_numpy("b")
        assert b.dtype == np.int64
        np.testing.assert_array_equal(b, a.astype(np.int64) * 3)


async def test_megabytes_each_way_pass_every_flow_control_window(proxy):
    """6 MiB up and down, three at once: beyond HTTP/2's default windows on every leg."""
    client = aio.InferenceServerClient(proxy.url)
    big = bytes(range(256)) * (6 * 4096)
    text = np.array([[big], [b"abc"]], dtype=object)
    results = await asyncio.gather(*(client.infer("bytes_echo", inputs(text=text)) for _ in "abc"))
    await client.close()
    for result in results:
        assert result.as_numpy("out").reshape(-1).tolist() == [big[::-1], b"cba"]


def test_a_triton_error_reaches_the_caller_and_others_go_on(proxy):
    with tc.InferenceServerClient(proxy.url) as client:
        bad = np.array([[1, np.nan, 3, 4]], dtype=np.float32)
        with pytest.raises(InferenceServerException) as error:
            client.infer("affine", inputs(x=bad))
        assert "x contains NaN" in error.value.message()
        with pytest.raises(InferenceServerException) as error:
            client.infer("affine", inputs(x=np.ones((1, 3), np.float32)))
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "tensor 'x': shape [1, 3], model 'affine' expects [-1, 4]" in error.value.message()
        good = np.ones((2, 4), dtype=np.float32)
        np.testing.assert_array_equal(
            client.infer("affine", inputs(x=good)).as_numpy("y"), 3 * good
        )


def test_an_expired_request_is_never_sent_to_triton(triton, proxy):
    before = stats(triton, "slow_affine")  # 200 ms per execution
    x = np.ones((1, 4), dtype=np.float32)
    with tc.InferenceServerClient(proxy.url) as client:
        done: list = []
        first = threading.Thread(
            target=lambda: done.append(client.infer("slow_affine", inputs(x=x)))
        )
        first.start()
        time.sleep(0.05)
        with pytest.raises(InferenceServerException) as error:
            client.infer("slow_affine", inputs(x=2 * x), client_timeout=0.1)
        assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        first.join()
        assert done
    time.sleep(0.3)
    after = stats(triton, "slow_affine")
    assert after[0] - before[0] == 1


def health(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_a_triton_call_ends_at_timeout_ms(triton, proxy):
    """Bounded by the gRPC deadline of the call to Triton (the adapter keeps the timeout)."""
    x = np.ones((1, 4), dtype=np.float32)
    with tc.InferenceServerClient(proxy.url) as client:
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as error:
            client.infer("slow_bounded", inputs(x=x))
        elapsed = time.monotonic() - start
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "backend 'slow_bounded'" in error.value.message()
    assert elapsed < 0.17  # the model takes 0.2 s
    time.sleep(0.3)  # let Triton finish, for the tests that count its executions


def test_health_follows_triton_going_away_and_coming_back(coalesce_process):
    from tests.support.triton import TritonServer

    SERVING = health_pb2.HealthCheckResponse.SERVING
    with TritonServer(ROOT / "tests" / "triton_models") as own:
        proxy = coalesce_process(
            {
                "backends": {
                    "t": triton_backend(own, "affine", timeout_ms=2000),
                    "ghost": {
                        "type": "triton",
                        "target": f"127.0.0.1:{free_port()}",
                        "model": "affine",
                    },
                },
                "routes": [{"model": "t", "backend": "t"}, {"model": "ghost", "backend": "ghost"}],
            }
        )
        x = np.ones((1, 4), dtype=np.float32)
        with tc.InferenceServerClient(proxy.url) as client:
            assert health(proxy.url, "t") == SERVING
            assert health(proxy.url, "ghost") != SERVING
            assert not client.is_model_ready("ghost")
            with pytest.raises(InferenceServerException) as error:
                client.infer("ghost", inputs(x=x))
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            own.kill()
            wait_for(lambda: health(proxy.url, "t") != SERVING)
            with pytest.raises(InferenceServerException) as error:
                client.infer("t", inputs(x=x))
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            own.restart()
            wait_for(lambda: health(proxy.url, "t") == SERVING, timeout=60)
            np.testing.assert_array_equal(client.infer("t", inputs(x=x)).as_numpy("y"), 3 * x)
