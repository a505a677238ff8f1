"""OpenTelemetry spans per request, continued from the caller's traceparent and
forwarded to the backend (a Triton-protocol backend that records its call metadata)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc.aio as aio

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tests.client import inputs
from tests.conftest import running
from tests.support.recording import RecordingKServe, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def traceparent(i: int) -> str:
    return f"00-{TRACE_ID}-{i + 1:016x}-01"


async def test_spans_per_request_continue_the_callers_trace_and_reach_the_backend():
    service = RecordingKServe()
    async with serving(service) as target:
        config = {
            "tracing": {"exporter": "none"},
            "backends": {"t": {"type": "triton", "target": target, "model": "affine"}},
            "routes": [{"model": "m", "backend": "t"}],
        }
        async with running(config) as server:
            exporter = InMemorySpanExporter()
            server.router.tracer.provider.add_span_processor(SimpleSpanProcessor(exporter))
            client = aio.InferenceServerClient(f"127.0.0.1:{server.port}")

            async def one(i: int) -> None:
                x = np.full((1, 4), i, dtype=np.float32)
                result = await client.infer(
                    "m", inputs(x=x), headers={"traceparent": traceparent(i)}
                )
                np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)

            await asyncio.gather(*(one(i) for i in range(20)))
            await client.close()
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "coalesce.request"]
    assert len(requests) == 20
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    assert {s.parent.span_id for s in requests} == {i + 1 for i in range(20)}
    by_parent: dict[int, list] = {}
    for span in spans:
        if span.name != "coalesce.request":
            by_parent.setdefault(span.parent.span_id, []).append(span)
    batch_ids = set()
    for request in requests:
        children = sorted(s.name for s in by_parent[request.context.span_id])
        assert children == ["coalesce.backend", "coalesce.queue"]
        assert request.attributes["coalesce.route"] == "m"
        call = next(s for s in by_parent[request.context.span_id] if s.name == "coalesce.backend")
        batch_ids.add(call.attributes["coalesce.batch_id"])
    assert len(batch_ids) == len(service.calls) < 20  # requests shared backend calls
    backend_spans = {s.context.span_id for s in spans if s.name == "coalesce.backend"}
    for _rows, metadata in service.calls:
        _version, trace, span, _flags = metadata["traceparent"].split("-")
        assert trace == TRACE_ID and int(span, 16) in backend_spans
