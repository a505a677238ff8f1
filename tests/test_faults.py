"""Fault and abuse tests, bounded in time, loopback only: every caller gets exactly
one prompt, truthful answer whatever the backend does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as aio
from tritonclient.utils import InferenceServerException

from tests.client import inputs
from tests.conftest import local_backend
from tests.support.coalesce import ROOT


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Tally:
    """Sent vs answered, by outcome; the slowest answer relative to its deadline."""

    def __init__(self) -> None:
        self.sent = 0
        self.outcomes: dict[str, int] = {}
        self.worst_overrun = 0.0

    def answered(self) -> int:
        return sum(self.outcomes.values())

    async def call(self, client, model: str, x: np.ndarray, timeout: float, check) -> None:
        self.sent += 1
        start = time.monotonic()
        try:
            result = await client.infer(model, inputs(x=x), client_timeout=timeout)
            check(result)
            key = "OK"
        except InferenceServerException as exc:
            key = exc.status() or "?"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        self.worst_overrun = max(self.worst_overrun, time.monotonic() - start - timeout)


async def steady(
    url: str,
    model: str,
    tally: Tally,
    until: float | list[float],
    timeout: float = 2.0,
    callers: int = 16,
) -> None:
    """Closed-loop callers until `until` (a list: its first item may move meanwhile)."""
    client = aio.InferenceServerClient(url)
    end = until if isinstance(until, list) else [until]

    async def caller(k: int) -> None:
        i = 0
        while time.monotonic() < end[0]:
            x = np.full((1, 4), (k * 1000 + i) % 97, dtype=np.float32)
            await tally.call(
                client,
                model,
                x,
                timeout,
                lambda r, x=x: np.testing.assert_array_equal(r.as_numpy("y"), 2 * x + 1),
            )
            i += 1

    await asyncio.gather(*(caller(k) for k in range(callers)))
    await client.close()


@pytest.mark.parametrize("transport", ["grpc", "native"])
async def test_kill_9_of_triton_under_load_loses_nothing_and_recovers(coalesce_process, transport):
    from tests.support.triton import TritonServer

    with TritonServer(ROOT / "tests" / "triton_models") as triton:
        backend = {"type": "triton", "target": triton.grpc_url, "model": "affine"}
        proxy = coalesce_process(
            {
                "backends": {"t": {**backend, "transport": transport}},
                "routes": [{"model": "t", "backend": "t"}],
            }
        )
        tally = Tally()
        until = [time.monotonic() + 60]
        load = asyncio.create_task(steady(proxy.url, "t", tally, until))
        await asyncio.sleep(2)
        triton.kill()
        await asyncio.sleep(3)
        await asyncio.to_thread(triton.restart)
        before_restart = tally.outcomes.get("OK", 0)
        until[0] = time.monotonic() + 6
        await load
    assert tally.answered() == tally.sent, "a request was never answered"
    assert tally.worst_overrun < 1.0, f"an answer came {tally.worst_overrun:.2f} s late"
    assert set(tally.outcomes) <= {"OK", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}
    assert tally.outcomes.get("StatusCode.UNAVAILABLE", 0) > 0, "the outage was not seen"
    assert tally.outcomes["OK"] > before_restart + 100, f"no recovery: {tally.outcomes}"


async def test_a_backend_50x_slower_keeps_deadlines_queue_and_memory_bounded(
    coalesce_process, tmp_path
):
    flag = tmp_path / "slow"
    proxy = coalesce_process(
        {
            "backends": {
                "s": local_backend(
                    "slowable",
                    args={"delay_ms": 4, "flag": str(flag)},
                    batching={"max_queue": 256, "max_batch_size": 16},
                )
            },
            "routes": [{"model": "s", "backend": "s"}],
        }
    )
    tally = Tally()
    await steady(proxy.url, "s", tally, time.monotonic() + 2, timeout=0.5)
    rss_before = rss_kib(proxy.proc.pid)
    flag.touch()
    slow = Tally()
    await steady(proxy.url, "s", slow, time.monotonic() + 6, timeout=0.5, callers=64)
    rss_after = rss_kib(proxy.proc.pid)
    assert slow.answered() == slow.sent
    assert slow.worst_overrun < 0.5, f"an answer came {slow.worst_overrun:.2f} s past its deadline"
    assert slow.outcomes.get("StatusCode.DEADLINE_EXCEEDED", 0) > 0
    assert rss_after - rss_before < 50 * 1024, f"RSS grew {rss_after - rss_before} KiB"
    flag.unlink()
    recovered = Tally()
    await steady(proxy.url, "s", recovered, time.monotonic() + 3, timeout=0.5)
    assert recovered.outcomes.get("OK", 0) > 50


async def test_a_burst_of_10x_the_queue_is_shed_at_once(coalesce_process):
    proxy = coalesce_process(
        {
            "backends": {
                "s": local_backend(
                    "affine",
                    args={"delay_ms": 100},
                    batching={"max_queue": 50, "max_batch_size": 10},
                )
            },
            "routes": [{"model": "s", "backend": "s"}],
        }
    )
    client = aio.InferenceServerClient(proxy.url)
    shed_times: list[float] = []

    async def one(i: int) -> str:
        start = time.monotonic()
        try:
            await client.infer("s", inputs(x=np.full((1, 4), i, np.float32)), client_timeout=20)
            return "OK"
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.RESOURCE_EXHAUSTED":
                shed_times.append(time.monotonic() - start)
                assert "queue is full" in exc.message()
            return exc.status()

    outcomes = await asyncio.gather(*(one(i) for i in range(500)))
    await client.close()
    assert outcomes.count("OK") >= 50
    assert outcomes.count("StatusCode.RESOURCE_EXHAUSTED") >= 350
    assert set(outcomes) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}
    assert sorted(shed_times)[len(shed_times) // 2] < 0.5, "shedding was not immediate"


async def test_thousands_of_cancelling_clients_leak_nothing(coalesce_process):
    proxy = coalesce_process(
        {
            "backends": {
                "s": local_backend("affine", args={"delay_ms": 20}, batching={"max_batch_size": 32})
            },
            "routes": [{"model": "s", "backend": "s"}],
        }
    )
    # Four connections: one that resets thousands of calls in seconds is Rapid Reset
    # (GOAWAY ENHANCE_YOUR_CALM, see test_http2_limits), however honest its reasons.
    own = [("grpc.use_local_subchannel_pool", 1)]  # else gRPC shares one connection
    clients = [aio.InferenceServerClient(proxy.url, channel_args=own) for _ in range(4)]

    async def good(i: int) -> None:
        x = np.full((1, 4), i, np.float32)
        result = await clients[i % 4].infer("s", inputs(x=x), client_timeout=30)
        np.testing.assert_array_equal(result.as_numpy("y"), 2 * x + 1)

    async def cancelled(i: int) -> None:
        call = clients[i % 4].infer("s", inputs(x=np.ones((1, 4), np.float32)))
        task = asyncio.create_task(call)
        await asyncio.sleep(0.001 * (i % 30))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, InferenceServerException):
            await task

    rss_before = rss_kib(proxy.proc.pid)
    for round_ in range(3):
        await asyncio.gather(
            *(good(round_ * 1000 + i) for i in range(200)), *(cancelled(i) for i in range(1000))
        )
    await asyncio.sleep(1)
    await good(7)
    for each in clients:
        await each.close()
    rss_after = rss_kib(proxy.proc.pid)
    assert rss_after - rss_before < 40 * 1024, f"RSS grew {rss_after - rss_before} KiB"
    metrics = await asyncio.to_thread(_metrics_text, proxy.admin_port)
    assert 'coalesce_queue_rows{backend="s"} 0.0' in metrics
    assert 'coalesce_in_flight_batches{backend="s"} 0.0' in metrics


def _metrics_text(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()
