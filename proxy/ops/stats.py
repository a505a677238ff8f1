"""The sidecar's numbers for the admin port: merged metrics and per-second series.

`current()` merges this process's metrics with the snapshots other workers left
in the shared folder; `Recorder` turns the merged counters into one point per
second per backend (throughput, latency quantiles, batch sizes, queue depth) for
the live dashboard, keeping the last five minutes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque

from coalesce.core.router import Router
from coalesce.telemetry.metrics import (
    BATCH_BOUNDS,
    LATENCY_BOUNDS,
    SnapshotFolder,
    merge,
    merge_pipelines,
    quantile,
)

SERIES_POINTS = 300


def shared_folder() -> SnapshotFolder | None:
    """The workers' snapshot folder, when a supervisor runs several workers."""
    path = os.environ.get("COALESCE_METRICS_DIR")
    if not path:
        return None
    return SnapshotFolder(path, int(os.environ.get("COALESCE_WORKER_INDEX", "0")))


def local(router: Router) -> dict:
    metrics = router.metrics
    for name, backend in router.backends.items():
        metrics.gauges[name] = {
            "queue_rows": backend.batcher.queued_rows,
            "in_flight": backend.batcher.in_flight,
        }
    return metrics.snapshot()


def current(router: Router, folder: SnapshotFolder | None) -> dict:
    others = folder.read_others() if folder else []
    return merge([local(router), *others])


def pipelines(own: dict[str, dict], folder: SnapshotFolder | None) -> dict[str, dict]:
    """The pipelines' status across the workers (each runs its own consumer)."""
    if folder is None:
        return own
    others = [snap.get("pipelines", {}) for snap in folder.read_others()]
    return merge_pipelines([own, *others])


def _per_backend(merged: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _route, backend, requests, _rows, latency in merged["routes"]:
        entry = out.setdefault(backend, {"ok": 0, "errors": 0, "latency": [0] * len(latency[0])})
        entry["ok"] += requests.get("OK", 0)
        entry["errors"] += sum(v for k, v in requests.items() if k != "OK")
        entry["latency"] = [a + b for a, b in zip(entry["latency"], latency[0], strict=True)]
    for name, b in merged["backends"].items():
        entry = out.setdefault(
            name, {"ok": 0, "errors": 0, "latency": [0] * (len(LATENCY_BOUNDS) + 1)}
        )
        entry["batches"], entry["batch_rows"] = b["batch_size"]
    for name, g in merged["gauges"].items():
        out.setdefault(name, {"ok": 0, "errors": 0, "latency": [0] * (len(LATENCY_BOUNDS) + 1)})
        out[name].update(g)
    return out


class Recorder:
    """One point per second per backend, from the differences of the merged counters."""

    def __init__(self, router: Router, folder: SnapshotFolder | None) -> None:
        self.router = router
        self.folder = folder
        self.series: dict[str, deque] = {}
        self._last: dict[str, dict] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self.sample(time.time())
            await asyncio.sleep(1.0)

    def sample(self, now: float) -> None:
        for name, totals in _per_backend(current(self.router, self.folder)).items():
            last = self._last.get(name)
            self._last[name] = totals
            if last is None:
                continue
            latency = [a - b for a, b in zip(totals["latency"], last["latency"], strict=True)]
            zero = [0] * (len(BATCH_BOUNDS) + 1)
            batches = [
                a - b
                for a, b in zip(totals.get("batches", zero), last.get("batches", zero), strict=True)
            ]
            count = sum(batches)
            rows = totals.get("batch_rows", 0) - last.get("batch_rows", 0)
            mean_batch = round(rows / count, 2) if count else None
            point = {
                "t": round(now, 3),
                "rps": totals["ok"] - last["ok"],
                "errors": totals["errors"] - last["errors"],
                "p50_ms": _ms(quantile(LATENCY_BOUNDS, latency, 0.5)),
                "p99_ms": _ms(quantile(LATENCY_BOUNDS, latency, 0.99)),
                "batches": batches,
                "mean_batch": mean_batch,
                "queue_rows": totals.get("queue_rows", 0),
                "in_flight": totals.get("in_flight", 0),
            }
            self.series.setdefault(name, deque(maxlen=SERIES_POINTS)).append(point)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def publish(router: Router, folder: SnapshotFolder, pipelines=dict) -> None:
    """A worker's loop: leave a snapshot for the admin worker once a second (its
    metrics, and its pipelines' status)."""
    while True:
        snapshot = {**local(router), "pipelines": pipelines()}
        await asyncio.to_thread(folder.write, snapshot)
        await asyncio.sleep(1.0)
