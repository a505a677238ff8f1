"""Request metadata reaches a backend only through its `forward_metadata` allow-list,
from every front end and through every network adapter; forwarded values keep
callers apart in batches, trace context does not."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import tritonclient.grpc.aio as aio
import tritonclient.http.aio as http_aio

from tests.client import affine_expected, inputs
from tests.conftest import running
from tests.support.recording import RecordingBatchService, RecordingKServe, serving

X = np.arange(8, dtype=np.float32).reshape(2, 4)
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
LEAKY = {"x-secret": "s3cret", "cookie": "session=1", "x-api-key": "key"}
"""Sent by every caller here; no backend may ever see them."""


def grpc_backend(target: str, **fields) -> dict:
    return {"type": "grpc", "target": target, "model": "affine", **fields}


def one_route(backend: dict, **top) -> dict:
    return {"backends": {"b": backend}, "routes": [{"model": "m", "backend": "b"}], **top}


def trace(n: int) -> str:
    return f"00-{n:032x}-b7ad6b7169203331-01"


async def grpc_infer(port: int, headers: dict, x: np.ndarray = X, model: str = "m"):
    client = aio.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return await client.infer(model, inputs(x=x), headers=headers)
    finally:
        await client.close()


async def stream_infer(port: int, headers: dict) -> None:
    async def requests():
        yield {"model_name": "m", "inputs": inputs(x=X)}

    client = aio.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        async for result, error in client.stream_infer(requests(), headers=headers):
            assert error is None, error
            np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
            break
    finally:
        await client.close()


async def http_infer(port: int, headers: dict) -> None:
    client = http_aio.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        x = http_aio.InferInput("x", list(X.shape), "FP32")
        x.set_data_from_numpy(X)
        result = await client.infer("m", [x], headers=dict(headers))
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
    finally:
        await client.close()


async def tf_rest_predict(port: int, headers: dict) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v1/models/m:predict"
        body = json.dumps({"instances": X.tolist()})
        async with session.post(url, data=body, headers=headers) as answer:
            assert answer.status == 200, await answer.text()


async def test_only_allow_listed_metadata_reaches_the_backend_from_every_front_end():
    service = RecordingBatchService()
    backend = grpc_backend("", forward_metadata=["Authorization", "traceparent", "x-tenant"])
    async with serving(service) as target:
        backend["target"] = target
        async with running(one_route(backend, http="127.0.0.1:0")) as server:
            sent = {"authorization": "Bearer t1", "traceparent": TRACE, **LEAKY}
            result = await grpc_infer(server.port, sent)
            np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
            await stream_infer(server.port, sent)
            http_headers = {"Authorization": "Bearer t1", "TraceParent": TRACE, "X-Secret": "s"}
            await http_infer(server.http_port, http_headers)
            await tf_rest_predict(server.http_port, http_headers)
    assert len(service.calls) == 4
    for _, metadata in service.calls:
        assert metadata["authorization"] == "Bearer t1"
        assert metadata["traceparent"] == TRACE
        assert "x-tenant" not in metadata  # allowed, but nobody sent it
        assert not metadata.keys() & {*LEAKY, "x-secret"}


async def test_nothing_is_forwarded_by_default():
    service = RecordingBatchService()
    async with serving(service) as target, running(one_route(grpc_backend(target))) as server:
        await grpc_infer(server.port, {"authorization": "Bearer t1", "traceparent": TRACE})
    (_, metadata), *_ = service.calls
    assert not metadata.keys() & {"authorization", "traceparent", *LEAKY}


async def test_callers_with_different_forwarded_values_never_share_a_batch():
    """Two tokens, four callers, each with its own trace: one batch per token, and a
    batch carries one of its own callers' traceparent (its first's)."""
    service = RecordingBatchService()
    backend = grpc_backend(
        "",
        forward_metadata=["authorization", "traceparent"],
        batching={"max_delay_ms": 300, "max_batch_size": 64},
    )
    callers = [("Bearer a", trace(1)), ("Bearer a", trace(2)), ("Bearer b", trace(3))]
    callers.append(("Bearer b", trace(4)))
    async with serving(service) as target:
        backend["target"] = target
        async with running(one_route(backend)) as server:
            xs = [X + 10 * i for i in range(len(callers))]
            results = await asyncio.gather(
                *(
                    grpc_infer(server.port, {"authorization": a, "traceparent": t}, x)
                    for (a, t), x in zip(callers, xs, strict=True)
                )
            )
    for result, x in zip(results, xs, strict=True):
        np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(x)["y"])
    assert sorted(rows for rows, _ in service.calls) == [4, 4]  # 2 callers x 2 rows each
    tokens = {md["authorization"]: md["traceparent"] for _, md in service.calls}
    assert set(tokens) == {"Bearer a", "Bearer b"}
    assert tokens["Bearer a"] in {trace(1), trace(2)}
    assert tokens["Bearer b"] in {trace(3), trace(4)}


async def test_same_values_with_different_traces_share_one_batch():
    service = RecordingBatchService()
    backend = grpc_backend(
        "",
        forward_metadata=["authorization", "traceparent"],
        batching={"max_delay_ms": 300, "max_batch_size": 64},
    )
    async with serving(service) as target:
        backend["target"] = target
        async with running(one_route(backend)) as server:
            await asyncio.gather(
                *(
                    grpc_infer(server.port, {"authorization": "Bearer a", "traceparent": trace(i)})
                    for i in range(3)
                )
            )
    assert [rows for rows, _ in service.calls] == [6]
    assert service.calls[0][1]["traceparent"] in {trace(i) for i in range(3)}


async def test_triton_adapter_forwards_the_allow_list():
    service = RecordingKServe()
    async with serving(service) as target:
        backend = {
            "type": "triton",
            "target": target,
            "model": "affine",
            "forward_metadata": ["authorization"],
        }
        async with running(one_route(backend)) as server:
            result = await grpc_infer(server.port, {"authorization": "Bearer t", **LEAKY})
    np.testing.assert_array_equal(result.as_numpy("y"), affine_expected(X)["y"])
    (_, metadata), *_ = service.calls
    assert metadata["authorization"] == "Bearer t"
    assert not metadata.keys() & LEAKY.keys()


async def test_tfserving_adapter_forwards_the_allow_list_through_two_sidecars():
    """caller -> Coalesce (tfserving adapter) -> Coalesce (TF Serving API, grpc adapter)
    -> recorder: each hop passes on only what its own allow-list names."""
    service = RecordingBatchService()
    async with serving(service) as target:
        inner = {
            "backends": {
                "rec": grpc_backend(target, forward_metadata=["authorization", "traceparent"])
            },
            "routes": [{"model": "affine", "backend": "rec"}],
        }
        async with running(inner) as back:
            outer = {
                "type": "tfserving",
                "target": f"127.0.0.1:{back.port}",
                "model": "affine",
                "forward_metadata": ["authorization"],
            }
            async with running(one_route(outer)) as front:
                sent = {"authorization": "Bearer t", "traceparent": TRACE, **LEAKY}
                result = await grpc_infer(front.port, sent)
    np.testing.assert_allclose(result.as_numpy("y"), affine_expected(X)["y"])
    (_, metadata), *_ = service.calls
    assert metadata["authorization"] == "Bearer t"
    assert "traceparent" not in metadata  # the outer sidecar does not forward it
    assert not metadata.keys() & LEAKY.keys()
