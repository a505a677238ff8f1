"""Metrics kept as plain numbers on the event loop, exposed in Prometheus format.

prometheus_client's own metric objects take a lock per update; here every update
is an int or a list slot touched by the one event-loop thread, and the numbers
are turned into Prometheus families only when /metrics is scraped. Workers of a
multi-process sidecar each write a snapshot to a shared folder once a second;
the admin worker merges them, so one scrape sees the whole sidecar.
"""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Log-spaced (x1.5) so that quantiles read back from buckets are within ~25%.
LATENCY_BOUNDS = tuple(round(0.0001 * 1.5**i, 6) for i in range(30))  # 0.1 ms .. ~19 s
BATCH_BOUNDS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


class Histogram:
    """Counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def state(self) -> list:
        return [list(self.counts), self.sum]


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None without data)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return bounds[i] if i < len(bounds) else bounds[-1]
    return bounds[-1]


class RouteStats:
    """What the callers of one route (model name) saw, by gRPC status code."""

    __slots__ = ("latency", "ok_seconds", "requests", "rows")

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BOUNDS)
        self.ok_seconds = 0.0  # the latency sum of the OK ones (Triton's statistics)

    def record(self, code: str, rows: int, seconds: float) -> None:
        self.requests[code] = self.requests.get(code, 0) + 1
        self.rows[code] = self.rows.get(code, 0) + rows
        self.latency.observe(seconds)
        if code == "OK":
            self.ok_seconds += seconds


class BackendStats:
    """What one backend's batcher did."""

    __slots__ = ("batch_size", "by_size", "call", "errors", "last_call", "queue_wait", "retries")

    def __init__(self) -> None:
        self.batch_size = Histogram(BATCH_BOUNDS)
        self.queue_wait = Histogram(LATENCY_BOUNDS)
        self.call = Histogram(LATENCY_BOUNDS)
        self.errors: dict[str, int] = {}
        self.retries = 0
        # Triton's statistics: rows -> [calls, requests in them, and the seconds spent
        # merging inputs, calling, splitting outputs]; bounded by max_batch_size. And
        # when the last call ended (time.time()).
        self.by_size: dict[int, list] = {}
        self.last_call = 0.0

    def _sized(self, rows: int) -> list:
        entry = self.by_size.get(rows)
        if entry is None:
            entry = self.by_size[rows] = [0, 0, 0.0, 0.0, 0.0]
        return entry

    def called(self, rows: int, requests: int, merge: float, call: float, now: float) -> None:
        entry = self._sized(rows)
        entry[0] += 1
        entry[1] += requests
        entry[2] += merge
        entry[3] += call
        self.call.observe(call)
        self.last_call = now

    def split(self, rows: int, seconds: float) -> None:
        self._sized(rows)[4] += seconds

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class Metrics:
    """Every counter of one process; `snapshot()` is a JSON-able copy for merging."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], RouteStats] = {}
        self.backends: dict[str, BackendStats] = {}
        self.gauges: dict[str, dict[str, float]] = {}  # backend -> queue_rows / in_flight
        self.reloads: dict[str, int] = {}

    def route(self, route: str, backend: str) -> RouteStats:
        stats = self.routes.get((route, backend))
        if stats is None:
            stats = self.routes[(route, backend)] = RouteStats()
        return stats

    def backend(self, name: str) -> BackendStats:
        stats = self.backends.get(name)
        if stats is None:
            stats = self.backends[name] = BackendStats()
        return stats

    def snapshot(self) -> dict:
        return {
            "routes": [
                [route, backend, s.requests, s.rows, s.latency.state()]
                for (route, backend), s in self.routes.items()
            ],
            "backends": {
                name: {
                    "batch_size": s.batch_size.state(),
                    "queue_wait": s.queue_wait.state(),
                    "call": s.call.state(),
                    "errors": s.errors,
                    "retries": s.retries,
                }
                for name, s in self.backends.items()
            },
            "gauges": self.gauges,
            "reloads": self.reloads,
        }


def _add(into: dict, values: dict) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0) + value


def _add_hist(into: list | None, state: list) -> list:
    if into is None:
        return [list(state[0]), state[1]]
    return [[a + b for a, b in zip(into[0], state[0], strict=True)], into[1] + state[1]]


def merge(snapshots: list[dict]) -> dict:
    """Sum the snapshots of several worker processes."""
    routes: dict[tuple[str, str], list] = {}
    backends: dict[str, dict] = {}
    gauges: dict[str, dict[str, float]] = {}
    reloads: dict[str, int] = {}
    for snap in snapshots:
        for route, backend, requests, rows, latency in snap["routes"]:
            entry = routes.setdefault((route, backend), [{}, {}, None])
            _add(entry[0], requests)
            _add(entry[1], rows)
            entry[2] = _add_hist(entry[2], latency)
        for name, b in snap["backends"].items():
            entry = backends.setdefault(name, {"errors": {}, "retries": 0})
            for key in ("batch_size", "queue_wait", "call"):
                entry[key] = _add_hist(entry.get(key), b[key])
            _add(entry["errors"], b["errors"])
            entry["retries"] += b["retries"]
        for name, values in snap["gauges"].items():
            _add(gauges.setdefault(name, {}), values)
        _add(reloads, snap["reloads"])
    return {
        "routes": [[r, b, *v] for (r, b), v in routes.items()],
        "backends": backends,
        "gauges": gauges,
        "reloads": reloads,
    }


def _histogram(family: HistogramMetricFamily, labels: list[str], bounds, state: list) -> None:
    counts, total = state
    buckets, running = [], 0
    for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        running += count
        buckets.append((bound, running))
    family.add_metric(labels, buckets, total)


def families(merged: dict) -> Iterator:
    """Prometheus metric families for a merged snapshot."""
    requests = CounterMetricFamily(
        "coalesce_requests",
        "Requests answered, by gRPC status code.",
        labels=["route", "backend", "code"],
    )
    rows = CounterMetricFamily(
        "coalesce_rows", "Rows answered, by gRPC status code.", labels=["route", "backend", "code"]
    )
    latency = HistogramMetricFamily(
        "coalesce_request_duration_seconds",
        "End-to-end latency seen by callers.",
        labels=["route", "backend"],
    )
    for route, backend, by_code, rows_by_code, hist in merged["routes"]:
        for code, value in by_code.items():
            requests.add_metric([route, backend, code], value)
        for code, value in rows_by_code.items():
            rows.add_metric([route, backend, code], value)
        _histogram(latency, [route, backend], LATENCY_BOUNDS, hist)
    yield from (requests, rows, latency)
    batch = HistogramMetricFamily(
        "coalesce_batch_size", "Rows per backend call.", labels=["backend"]
    )
    wait = HistogramMetricFamily(
        "coalesce_queue_wait_seconds", "Time a request waited in the queue.", labels=["backend"]
    )
    call = HistogramMetricFamily(
        "coalesce_backend_call_seconds", "Backend call latency.", labels=["backend"]
    )
    errors = CounterMetricFamily(
        "coalesce_backend_errors", "Failed backend calls, by code.", labels=["backend", "code"]
    )
    retries = CounterMetricFamily(
        "coalesce_backend_retries",
        "Backend calls retried (error isolation, replicas).",
        labels=["backend"],
    )
    for name, b in merged["backends"].items():
        _histogram(batch, [name], BATCH_BOUNDS, b["batch_size"])
        _histogram(wait, [name], LATENCY_BOUNDS, b["queue_wait"])
        _histogram(call, [name], LATENCY_BOUNDS, b["call"])
        for code, value in b["errors"].items():
            errors.add_metric([name, code], value)
        retries.add_metric([name], b["retries"])
    yield from (batch, wait, call, errors, retries)
    depth = GaugeMetricFamily("coalesce_queue_rows", "Rows waiting.", labels=["backend"])
    flight = GaugeMetricFamily(
        "coalesce_in_flight_batches", "Batches at the backend.", labels=["backend"]
    )
    for name, g in merged["gauges"].items():
        depth.add_metric([name], g.get("queue_rows", 0))
        flight.add_metric([name], g.get("in_flight", 0))
    reloads = CounterMetricFamily(
        "coalesce_reloads", "Config reloads, by result.", labels=["result"]
    )
    for result, value in merged["reloads"].items():
        reloads.add_metric([result], value)
    yield from (depth, flight, reloads)


class SnapshotFolder:
    """Where the workers of one sidecar leave their snapshots (COALESCE_METRICS_DIR)."""

    def __init__(self, path: str | os.PathLike, worker: int) -> None:
        self.path = Path(path)
        self.worker = worker

    def write(self, snapshot: dict) -> None:
        target = self.path / f"worker-{self.worker}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, target)

    def read_others(self, max_age_s: float = 10.0) -> list[dict]:
        found, now = [], time.time()  # wall clock: file times are wall clock
        for path in self.path.glob("worker-*.json"):
            if path.name == f"worker-{self.worker}.json" or now - path.stat().st_mtime > max_age_s:
                continue
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced right now: next scrape gets it
        return found


PIPELINE_COUNTS = ("consumed", "published", "dead_lettered", "retried")


def merge_pipelines(statuses: list[dict[str, dict]]) -> dict[str, dict]:
    """One pipeline's status across worker processes (each runs a consumer of the same
    group): counts summed, partitions and lag joined, ready only if every one is."""
    merged: dict[str, dict] = {}
    for status in statuses:
        for name, s in status.items():
            m = merged.setdefault(
                name,
                {
                    "ready": True,
                    "partitions": [],
                    "lag": {},
                    "last_cycle_messages": 0,
                    "errors": {},
                    **dict.fromkeys(PIPELINE_COUNTS, 0),
                },
            )
            m["ready"] = m["ready"] and s["ready"]
            m["partitions"] = sorted({*m["partitions"], *s["partitions"]})
            m["lag"].update({str(p): n for p, n in s["lag"].items()})
            m["last_cycle_messages"] = max(m["last_cycle_messages"], s["last_cycle_messages"])
            _add(m["errors"], s["errors"])
            for key in PIPELINE_COUNTS:
                m[key] += s[key]
    return merged


def pipeline_families(status: dict[str, dict]) -> Iterator:
    """Prometheus families for the broker pipelines' status (coalesce.pipelines)."""
    messages = CounterMetricFamily(
        "coalesce_pipeline_messages",
        "Messages taken from the inbox and what became of them.",
        labels=["pipeline", "outcome"],
    )
    ready = GaugeMetricFamily(
        "coalesce_pipeline_ready", "1 while the pipeline's broker answers.", labels=["pipeline"]
    )
    lag = GaugeMetricFamily(
        "coalesce_pipeline_lag",
        "Messages in the inbox not yet read, per assigned partition.",
        labels=["pipeline", "partition"],
    )
    for name, state in status.items():
        for outcome in PIPELINE_COUNTS:
            messages.add_metric([name, outcome], state[outcome])
        ready.add_metric([name], float(state["ready"]))
        for partition, behind in state["lag"].items():
            lag.add_metric([name, str(partition)], behind)
    yield from (messages, ready, lag)
