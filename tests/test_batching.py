"""Smart batching, observed from the model's side through a real gRPC front end."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aio
from coalesce.config import Batching
from coalesce.core.batcher import Batcher
from coalesce.core.request import InferRequest
from tritonclient.utils import InferenceServerException

from tests.client import affine_expected, inputs
from tests.conftest import local_backend, model_of, running


def config(model: str, routes=("m",), **batching) -> dict:
    return {
        "backends": {"b": local_backend(model, batching=batching)},
        "routes": [{"model": r, "backend": "b"} for r in routes],
    }


def rows(seed: int, n: int = 1) -> np.ndarray:
    return np.arange(seed * 4 * n, (seed + 1) * 4 * n, dtype=np.float32).reshape(n, 4)


async def call(client, x, model="m", **kwargs):
    result = await client.infer(model, inputs(x=x), **kwargs)
    return result.as_numpy("y"), result.as_numpy("s")


async def check(client, x, model="m", **kwargs) -> None:
    y, s = await call(client, x, model, **kwargs)
    want = affine_expected(x)
    np.testing.assert_array_equal(y, want["y"])
    np.testing.assert_array_equal(s, want["s"])


@pytest.fixture
async def gated_server():
    async with running(config("gated", routes=("m", "m2"), max_batch_size=64)) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        yield server, model_of(server, "b"), client
        model_of(server, "b").gate.set()
        await client.close()


async def hold_backend(model, client) -> asyncio.Task:
    """Occupy the single dispatch slot with one request held at the gate."""
    first = asyncio.create_task(check(client, rows(999)))
    await asyncio.wait_for(model.entered.wait(), 5)
    return first


async def wait_queued(server, count: int) -> None:
    batcher = server.router.backends["b"].batcher
    for _ in range(500):
        if batcher.queued_rows >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {batcher.queued_rows} rows queued, wanted {count}")


async def test_a_lone_request_goes_out_at_once(gated_server):
    _, model, client = gated_server
    model.gate.set()
    await check(client, rows(1))
    assert model.batches == [1]


async def test_requests_queued_while_busy_form_one_batch_across_routes(gated_server):
    server, model, client = gated_server
    first = await hold_backend(model, client)
    calls = [
        asyncio.create_task(check(client, rows(i), model=("m", "m2")[i % 2])) for i in range(20)
    ]
    await wait_queued(server, 20)
    model.gate.set()
    await asyncio.gather(first, *calls)
    assert model.batches == [1, 20]


async def test_batches_never_exceed_max_batch_size():
    async with running(config("gated", max_batch_size=8)) as server:
        model = model_of(server, "b")
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        first = await hold_backend(model, client)
        calls = [asyncio.create_task(check(client, rows(i))) for i in range(20)]
        await wait_queued(server, 20)
        model.gate.set()
        await asyncio.gather(first, *calls)
        await client.close()
    assert model.batches == [1, 8, 8, 4]


async def test_a_request_larger_than_a_batch_is_split_and_reassembled():
    async with running(config("affine", max_batch_size=4)) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        x = rows(3, n=10)
        await check(client, x)
        await client.close()
        assert model_of(server, "b").batches == [4, 4, 2]


async def test_incompatible_requests_queue_apart_and_all_progress():
    async with running(config("echo")) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        shapes = [(1, 4), (1, 3), (2, 4), (1, 3, 2)]
        arrays = [np.full(shape, i, dtype=np.float32) for i, shape in enumerate(shapes * 10)]

        async def echo(x):
            result = await client.infer("m", inputs(x=x))
            np.testing.assert_array_equal(result.as_numpy("x"), x)

        await asyncio.gather(*(echo(x) for x in arrays))
        await client.close()
        assert sum(model_of(server, "b").batches) == sum(len(x) for x in arrays)


async def test_a_full_queue_answers_resource_exhausted_at_once(gated_server):
    server, model, client = gated_server
    server.router.backends["b"].batcher._policy = server.router.backends[
        "b"
    ].batcher._policy.model_copy(update={"max_queue": 4})
    first = await hold_backend(model, client)
    queued = [asyncio.create_task(check(client, rows(i))) for i in range(4)]
    await wait_queued(server, 4)
    with pytest.raises(InferenceServerException) as error:
        await check(client, rows(5))
    assert error.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "queue is full" in error.value.message()
    model.gate.set()
    await asyncio.gather(first, *queued)


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_sent(gated_server):
    server, model, client = gated_server
    first = await hold_backend(model, client)
    late = asyncio.create_task(check(client, rows(7), client_timeout=0.2))
    await wait_queued(server, 1)
    with pytest.raises(InferenceServerException) as error:
        await late
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    model.gate.set()
    await first
    await check(client, rows(8))
    sent = np.concatenate(model.seen)
    assert not (sent == rows(7)).all(axis=1).any(), "an expired request reached the model"


async def test_a_cancelled_call_leaves_its_batch_mates_alone(gated_server):
    server, model, client = gated_server
    first = await hold_backend(model, client)
    mates = [asyncio.create_task(check(client, rows(i))) for i in range(3)]
    doomed = asyncio.create_task(check(client, rows(50)))
    await wait_queued(server, 4)
    doomed.cancel()
    await asyncio.sleep(0.1)  # let the cancellation reach the server
    model.gate.set()
    await asyncio.gather(first, *mates)
    assert model.batches[1] == 3
    assert not (np.concatenate(model.seen) == rows(50)).all(axis=1).any()


async def test_a_backend_error_fails_only_that_batch():
    async with running(config("affine")) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        bad = rows(1).copy()
        bad[0, 2] = np.nan
        with pytest.raises(InferenceServerException) as error:
            await check(client, bad)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "x contains NaN" in error.value.message()
        await asyncio.gather(*(check(client, rows(i)) for i in range(10)))
        await client.close()


async def test_a_bad_request_is_isolated_and_its_batch_mates_succeed(gated_server):
    server, model, client = gated_server
    first = await hold_backend(model, client)
    good = [asyncio.create_task(check(client, rows(i))) for i in range(7)]
    poison = np.full((1, 4), np.nan, dtype=np.float32)
    bad = asyncio.create_task(check(client, poison))
    await wait_queued(server, 8)
    model.gate.set()
    await asyncio.gather(first, *good)
    with pytest.raises(InferenceServerException) as error:
        await bad
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "x contains NaN" in error.value.message()
    assert model.batches[1] == 8  # they did share a batch, which was then split


async def test_a_fault_in_the_scheduler_answers_the_queued_calls_and_serving_goes_on():
    async with running(config("failing_limit")) as server:
        model = model_of(server, "b")
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        first = await hold_backend(model, client)
        queued = [asyncio.create_task(check(client, rows(i))) for i in range(3)]
        await wait_queued(server, 3)
        model.failing = True  # the scheduler reads the limit when it takes the next batch
        model.gate.set()
        await first
        for call in queued:
            with pytest.raises(InferenceServerException) as error:
                await asyncio.wait_for(call, 5)
            assert error.value.status() == "StatusCode.INTERNAL"
            assert "limit lookup failed" in error.value.message()
        model.failing = False
        model.gate.clear()
        first = await hold_backend(model, client)  # so the next calls queue again
        later = [asyncio.create_task(check(client, rows(i))) for i in range(5)]
        await wait_queued(server, 5)
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 5)
        assert model.batches[-1] == 5
        await client.close()


async def test_the_next_batch_goes_out_before_the_last_one_is_split_for_its_callers():
    """The backend is idle from its answer until our next call reaches it: splitting
    and answering a batch waits until the next one is sent (a backend that runs one
    call at a time was idle ~30% longer between calls before)."""
    seen, gate = [], asyncio.Event()

    async def backend(inputs, timeout):
        seen.append((len(inputs["x"]), [f.done() for f in futures]))
        if len(seen) == 1:
            await gate.wait()
        return {"y": inputs["x"] * 2}

    batcher = Batcher("b", backend, Batching())
    batcher.start()
    futures = [batcher.submit(InferRequest({"x": rows(0)}, 1))]
    while not seen:
        await asyncio.sleep(0.001)
    futures += [batcher.submit(InferRequest({"x": rows(i)}, 1)) for i in (1, 2, 3)]
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert seen == [(1, [False]), (3, [False, False, False, False])]
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer["y"], rows(i) * 2)
    await batcher.close()


async def test_a_model_returning_the_wrong_rows_is_an_internal_error():
    async with running(config("wrong_rows")) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        with pytest.raises(InferenceServerException) as error:
            await client.infer("m", inputs(x=rows(1, n=3)))
        assert error.value.status() == "StatusCode.INTERNAL"
        assert "output 'y' with shape [2, 4] for a batch of 3 rows" in error.value.message()
        await client.close()


async def test_max_delay_waits_for_a_fuller_batch():
    async with running(config("affine", max_delay_ms=300)) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        calls = []
        for i in range(3):
            calls.append(asyncio.create_task(check(client, rows(i))))
            await asyncio.sleep(0.02)
        await asyncio.gather(*calls)
        await client.close()
        assert model_of(server, "b").batches == [3]


async def test_max_in_flight_sends_batches_concurrently():
    async with running(config("gated", max_in_flight=2)) as server:
        model = model_of(server, "b")
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        first = await hold_backend(model, client)
        model.entered.clear()
        second = asyncio.create_task(check(client, rows(2)))
        await asyncio.wait_for(model.entered.wait(), 5)  # entered while the first is held
        model.gate.set()
        await asyncio.gather(first, second)
        await client.close()
        assert model.batches == [1, 1]


async def test_many_concurrent_callers_each_get_their_own_rows():
    async with running(config("affine", max_batch_size=32)) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        await asyncio.gather(*(check(client, rows(i, n=1 + i % 3)) for i in range(300)))
        await client.close()
        batches = model_of(server, "b").batches
        assert sum(batches) == sum(1 + i % 3 for i in range(300))
        assert len(batches) < 300 and max(batches) <= 32


def test_status_codes_are_grpc_codes():
    assert grpc.StatusCode.RESOURCE_EXHAUSTED.name == "RESOURCE_EXHAUSTED"


async def test_a_blocking_model_does_not_block_the_event_loop():
    data = {
        "backends": {
            "slow": local_backend("affine", args={"delay_ms": 1000}),
            "fast": local_backend("affine"),
        },
        "routes": [{"model": "slow", "backend": "slow"}, {"model": "fast", "backend": "fast"}],
    }
    async with running(data) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        slow = asyncio.create_task(check(client, rows(1), model="slow"))
        await asyncio.sleep(0.1)  # the slow model is now sleeping in its thread
        started = asyncio.get_running_loop().time()
        await check(client, rows(2), model="fast")
        assert asyncio.get_running_loop().time() - started < 0.5
        assert not slow.done()
        await slow
        await client.close()
