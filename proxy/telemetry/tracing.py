"""Optional OpenTelemetry tracing (`pip install coalesce[tracing]`, config `tracing:`).

Each request gets a span, `coalesce.core.request`, continued from the caller's W3C
`traceparent` when it sent one, with two children: `coalesce.queue` (the time it
waited in its batcher) and `coalesce.backend` (the backend call that served it,
with the batch id, so every request of one batch shows the same call). The backend
call carries the `traceparent` of the batch's first request's backend span, so a
backend that traces joins the caller's trace. With tracing off nothing here is
imported and the request path pays one `is None` check.
"""

from __future__ import annotations

import time
from typing import Any

from coalesce.config import Tracing as TracingConfig

TRACE_HEADERS = ("traceparent", "tracestate")


class Tracer:
    """Spans for requests and batches; built once from the `tracing` config block."""

    def __init__(self, config: TracingConfig) -> None:
        from opentelemetry import trace
        from opentelemetry.propagate import extract, inject
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self._trace = trace
        self._extract, self._inject = extract, inject
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        if config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint, insecure=True))
            )
        elif config.exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        self._tracer = self.provider.get_tracer("coalesce")
        self._batches = 0

    def request(self, route: str, backend: str, rows: int, carrier: dict[str, str] | None) -> Any:
        """Start a request's span, as a child of the caller's trace context if any."""
        parent = self._extract(carrier) if carrier else None
        return self._tracer.start_span(
            "coalesce.request",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={
                "coalesce.route": route,
                "coalesce.backend": backend,
                "coalesce.rows": rows,
            },
        )

    def finish(self, span: Any, error: BaseException | None) -> None:
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
            code = getattr(getattr(error, "code", None), "name", type(error).__name__)
            span.set_attribute("rpc.grpc.status_code", code)
        span.end()

    def batch(self, spans: list[Any], queued_for: list[float]) -> BatchSpans:
        """Queue spans (ended now) and backend-call spans (started now) for one batch;
        `queued_for` holds the seconds each request waited before this dispatch."""
        self._batches += 1
        now = time.time_ns()
        calls = []
        for span, waited in zip(spans, queued_for, strict=True):
            parent = self._trace.set_span_in_context(span)
            queue = self._tracer.start_span(
                "coalesce.queue", context=parent, start_time=now - int(waited * 1e9)
            )
            queue.end(end_time=now)
            calls.append(
                self._tracer.start_span(
                    "coalesce.backend",
                    context=parent,
                    kind=self._trace.SpanKind.CLIENT,
                    start_time=now,
                    attributes={"coalesce.batch_id": self._batches},
                )
            )
        carrier: dict[str, str] = {}
        self._inject(carrier, context=self._trace.set_span_in_context(calls[0]))
        return BatchSpans(self, calls, carrier)


class BatchSpans:
    """The backend-call spans of one batch, and the trace headers to send with the call."""

    def __init__(self, tracer: Tracer, calls: list[Any], carrier: dict[str, str]) -> None:
        self.tracer = tracer
        self.calls = calls
        self.headers = tuple((k, v) for k, v in carrier.items() if k in TRACE_HEADERS)

    def end(self, rows: int, error: BaseException | None) -> None:
        for span in self.calls:
            span.set_attribute("coalesce.batch_rows", rows)
            self.tracer.finish(span, error)


def carrier_of(pairs: Any) -> dict[str, str] | None:
    """The W3C trace headers among (name, value) pairs (gRPC metadata, HTTP headers)."""
    found = {k.lower(): v for k, v in pairs if k.lower() in TRACE_HEADERS}
    return found or None
