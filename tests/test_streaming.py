"""ModelStreamInfer with the official tritonclient streaming APIs (sync and aio), on both
listeners: our own HTTP/2 (`listen`) and grpc.aio (`grpc_aio_listen`)."""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio

from tests.client import affine_expected, inputs
from tests.conftest import local_backend, model_of, running
from tests.support.coalesce import free_port


def config(**route) -> dict:
    return {
        "grpc_aio_listen": "127.0.0.1:0",
        "backends": {
            "b": local_backend("affine", args={"delay_ms": 2}),
            "g": local_backend("gated_echo"),
        },
        "routes": [{"model": "m", "backend": "b", **route}, {"model": "gated", "backend": "g"}],
        "max_stream_outstanding": 64,
    }


def x_of(i: int) -> np.ndarray:
    return np.full((1, 4), i, dtype=np.float32)


@pytest.fixture(params=["listen", "grpc_aio_listen"])
def listener(request) -> str:
    return request.param


def address(server, listener: str) -> str:
    return f"127.0.0.1:{server.port if listener == 'listen' else server.aio_port}"


@pytest.fixture
def proxy(coalesce_process, listener):
    data = {**config(), "grpc_aio_listen": f"127.0.0.1:{free_port()}"}
    process = coalesce_process(data)
    if listener == "grpc_aio_listen":
        process.url = data["grpc_aio_listen"]
    return process


def test_thousands_of_requests_on_one_stream_each_matched_by_id(proxy):
    answers: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(proxy.url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(3000):
            client.async_stream_infer("m", inputs(x=x_of(i)), request_id=str(i))
        seen = {}
        for _ in range(3000):
            result, error = answers.get(timeout=30)
            assert error is None, error
            i = int(result.get_response().id)
            np.testing.assert_array_equal(result.as_numpy("y"), 2 * x_of(i) + 1)
            seen[i] = True
        client.stop_stream()
    assert sorted(seen) == list(range(3000))


def test_several_streams_at_once_share_the_batcher(proxy):
    def stream(offset: int, results: dict) -> None:
        answers: queue.Queue = queue.Queue()
        with tc.InferenceServerClient(proxy.url) as client:
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for i in range(offset, offset + 500):
                client.async_stream_infer("m", inputs(x=x_of(i)), request_id=str(i))
            for _ in range(500):
                result, error = answers.get(timeout=30)
                assert error is None
                i = int(result.get_response().id)
                results[i] = result.as_numpy("s")[0, 0]
            client.stop_stream()

    results: dict = {}
    threads = [threading.Thread(target=stream, args=(k * 1000, results)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2000
    assert all(v == 4 * i for i, v in results.items())


async def test_aio_stream_errors_go_to_their_request_and_the_stream_goes_on(listener):
    async with running(config()) as server:
        client = aio.InferenceServerClient(address(server, listener))

        async def requests():
            for i in range(20):
                x = x_of(i)
                if i % 5 == 3:
                    x = np.full((1, 4), np.nan, dtype=np.float32)  # the model rejects NaN
                if i == 7:
                    yield {"model_name": "nope", "inputs": inputs(x=x), "request_id": str(i)}
                    continue
                yield {"model_name": "m", "inputs": inputs(x=x), "request_id": str(i)}

        ok, errors = {}, []
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                errors.append(str(error))
                continue
            ok[int(result.get_response().id)] = result.as_numpy("y")
            if len(ok) + len(errors) == 20:
                break
        await client.close()
    assert sorted(ok) == [i for i in range(20) if i % 5 != 3 and i != 7]
    for i, y in ok.items():
        np.testing.assert_array_equal(y, affine_expected(x_of(i))["y"])
    assert len(errors) == 5
    assert sum("x contains NaN" in e for e in errors) == 4
    assert sum("model 'nope' is not routed" in e for e in errors) == 1


async def test_ordered_route_answers_in_request_order(listener):
    async with running(config(ordered=True)) as server:
        client = aio.InferenceServerClient(address(server, listener))

        async def requests():
            for i in range(300):
                yield {"model_name": "m", "inputs": inputs(x=x_of(i)), "request_id": str(i)}

        ids = []
        async for result, error in client.stream_infer(requests()):
            assert error is None
            ids.append(int(result.get_response().id))
            if len(ids) == 300:
                break
        await client.close()
    assert ids == list(range(300))


async def test_a_fast_producer_is_pushed_back_when_the_model_is_slow(listener):
    """With the model held, the server stops reading at max_stream_outstanding requests,
    and HTTP/2 flow control stops the client: 2000 x 64 KiB are never all sent."""
    big = 16384  # floats: 64 KiB a request
    async with running(config()) as server:
        model = model_of(server, "g")
        batcher = server.router.backends["g"].batcher
        client = aio.InferenceServerClient(address(server, listener))
        sent = received = 0

        async def requests():
            nonlocal sent
            for i in range(2000):
                sent += 1
                x = np.full((1, big), i, dtype=np.float32)
                yield {"model_name": "gated", "inputs": inputs(x=x), "request_id": str(i)}

        async def consume():
            nonlocal received
            async for result, error in client.stream_infer(requests()):
                assert error is None
                i = int(result.get_response().id)
                assert result.as_numpy("y")[0, 0] == i
                received += 1
                if received == 2000:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(2.0)
        held = batcher.queued_rows + batcher.in_flight
        assert held <= 64, f"{held} requests accepted past the limit"
        assert sent < 2000, "the producer was never pushed back"
        model.gate.set()
        await asyncio.wait_for(task, 60)
        await client.close()
    assert received == 2000
