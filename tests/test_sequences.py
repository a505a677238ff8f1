"""Stateful (sequence) models and request parameters through Coalesce.

A real Triton serves `accumulate` (tests/triton_models): each answer is the running
sum of its sequence, so a request merged with another's rows, one that lost its
sequence parameters, or one that arrived out of order gives a wrong total. A
recording Triton look-alike shows which parameters reach the backend and which
requests shared a backend call."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as aio
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.conftest import local_backend, running
from tests.support.recording import RecordingKServe, serving


def one(value: float, module=tc):
    tensor = module.InferInput("x", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], np.float32))
    return [tensor]


@pytest.fixture
def accumulate(triton):
    return {
        "backends": {
            "acc": {
                "type": "triton",
                "target": triton.grpc_url,
                "model": "accumulate",
                "batching": {"max_in_flight": 4},
            },
            "local": local_backend("echo"),
        },
        "routes": [{"model": "acc", "backend": "acc"}, {"model": "local", "backend": "local"}],
    }


async def test_interleaved_sequences_keep_their_own_totals(accumulate):
    async with running(accumulate) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:

            async def sequence(sid: int, values: list[float]) -> list[float]:
                totals = []
                for i, value in enumerate(values):
                    result = await client.infer(
                        "acc",
                        one(value),
                        sequence_id=sid,
                        sequence_start=i == 0,
                        sequence_end=i == len(values) - 1,
                    )
                    totals.append(float(result.as_numpy("total")[0, 0]))
                return totals

            got = await asyncio.gather(*(sequence(s, [s, 1.0, 2.0, 3.0]) for s in (11, 22, 33)))
        finally:
            await client.close()
    for sid, totals in zip((11, 22, 33), got, strict=True):
        assert totals == [sid, sid + 1, sid + 3, sid + 6]


async def test_a_streamed_sequence_arrives_in_order(accumulate):
    """Ten requests of one sequence sent without waiting, four batches in flight."""
    async with running(accumulate) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:

            async def requests():
                for i in range(10):
                    yield {
                        "model_name": "acc",
                        "inputs": one(1.0),
                        "sequence_id": 7,
                        "sequence_start": i == 0,
                        "sequence_end": i == 9,
                        "request_id": str(i),
                    }

            totals = {}
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                totals[result.get_response().id] = float(result.as_numpy("total")[0, 0])
        finally:
            await client.close()
    assert totals == {str(i): float(i + 1) for i in range(10)}


def test_sequences_over_http(accumulate, tmp_path):
    from tests.support.coalesce import Process, free_port

    process = Process({**accumulate, "http": f"127.0.0.1:{free_port()}"}, tmp_path)
    try:
        client = th.InferenceServerClient(process.http)
        totals = [
            float(
                client.infer("acc", one(v, th), sequence_id="s-1", sequence_start=i == 0).as_numpy(
                    "total"
                )[0, 0]
            )
            for i, v in enumerate([5.0, 1.0, 1.0])
        ]
        client.close()
    finally:
        assert process.terminate() == 0
    assert totals == [5.0, 6.0, 7.0]


async def test_a_backend_without_sequences_refuses_them(accumulate):
    async with running(accumulate) as server:
        client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            with pytest.raises(InferenceServerException, match="cannot serve sequences") as caught:
                await client.infer("local", one(1.0), sequence_id=3, sequence_start=True)
            assert "INVALID_ARGUMENT" in str(caught.value.status())
            await client.infer("local", one(1.0))  # and goes on serving
        finally:
            await client.close()


async def test_parameters_reach_triton_and_only_equal_ones_share_a_batch():
    service = RecordingKServe()
    async with serving(service) as target:
        data = {
            "backends": {
                "t": {
                    "type": "triton",
                    "target": target,
                    "model": "affine",
                    "batching": {"max_delay_ms": 50},
                },
            },
            "routes": [{"model": "m", "backend": "t"}],
        }
        async with running(data) as server:
            client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")
            x = tc.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            try:
                await asyncio.gather(
                    client.infer("m", [x], priority=1, parameters={"tag": "a"}),
                    client.infer("m", [x], priority=1, parameters={"tag": "a"}),
                    client.infer("m", [x], priority=1, parameters={"tag": "b"}),
                    client.infer("m", [x]),
                )
            finally:
                await client.close()

    def described(request) -> tuple:
        params = request.parameters
        tag = params["tag"].string_param if "tag" in params else ""
        priority = params["priority"].uint64_param if "priority" in params else 0
        return len(request.raw_input_contents[0]) // 16, tag, priority

    # the two "a" requests shared one call; "b" and the plain one went alone
    assert sorted(map(described, service.requests)) == [(1, "", 0), (1, "b", 1), (2, "a", 1)]
