"""Prometheus metrics and the live dashboard on the admin port, read from a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.client import inputs
from tests.conftest import local_backend
from tests.support.browser import chromium, dump_dom


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read()


def samples(admin: str) -> dict[tuple, float]:
    text = get(f"http://{admin}/metrics").decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def proxy(coalesce_process):
    return coalesce_process(
        {
            "backends": {"b": local_backend("affine", args={"delay_ms": 5})},
            "routes": [{"model": "m", "backend": "b"}, {"model": "m2", "backend": "b"}],
        }
    )


def load(url: str, model: str, count: int, bad: int = 0) -> None:
    async def run() -> None:
        import tritonclient.grpc.aio as aio

        client = aio.InferenceServerClient(url)

        async def one(i: int) -> None:
            x = np.full((2, 4), i, dtype=np.float32)
            if i < bad:
                x = np.ones((2, 3), dtype=np.float32)  # wrong shape: INVALID_ARGUMENT
            try:
                await client.infer(model, inputs(x=x))
            except Exception:
                assert i < bad

        await asyncio.gather(*(one(i) for i in range(count)))
        await client.close()

    asyncio.run(run())


def test_metrics_count_requests_rows_batches_and_latency(proxy):
    admin = f"127.0.0.1:{proxy.admin_port}"
    load(proxy.url, "m", 60, bad=5)
    load(proxy.url, "m2", 20)
    found = samples(admin)
    ok = dict(route="m", backend="b", code="OK")
    assert value(found, "coalesce_requests_total", **ok) == 55
    assert value(found, "coalesce_rows_total", **ok) == 110
    assert (
        value(found, "coalesce_requests_total", route="m", backend="b", code="INVALID_ARGUMENT")
        == 5
    )
    assert value(found, "coalesce_requests_total", route="m2", backend="b", code="OK") == 20
    assert value(found, "coalesce_request_duration_seconds_count", route="m", backend="b") == 60
    batches = value(found, "coalesce_batch_size_count", backend="b")
    rows = value(found, "coalesce_batch_size_sum", backend="b")
    assert rows == 150 and batches < 75  # 75 requests of 2 rows went out in fewer calls
    assert value(found, "coalesce_backend_call_seconds_count", backend="b") == batches
    assert value(found, "coalesce_backend_call_seconds_sum", backend="b") >= 0.005 * batches
    assert ("coalesce_queue_rows", (("backend", "b"),)) in found
    assert ("coalesce_in_flight_batches", (("backend", "b"),)) in found


def test_metrics_of_several_workers_are_merged(coalesce_process):
    from tests.support.coalesce import free_port

    port, fast = free_port(), free_port()
    proxy = coalesce_process(
        {
            "listen": f"127.0.0.1:{port}",
            "workers": 2,
            "grpc_aio_listen": f"127.0.0.1:{fast}",
            "backends": {"b": local_backend("affine")},
            "routes": [{"model": "m", "backend": "b"}],
        }
    )
    for url in (proxy.url, f"127.0.0.1:{fast}"):  # both listeners are shared by the workers
        for _ in range(8):  # new connections, spread across the workers by the kernel
            load(url, "m", 10)
    time.sleep(2.5)  # workers publish once a second
    found = samples(f"127.0.0.1:{proxy.admin_port}")
    assert value(found, "coalesce_requests_total", route="m", backend="b", code="OK") == 160


def test_dashboard_series_and_config(proxy):
    admin = f"127.0.0.1:{proxy.admin_port}"
    page = get(f"http://{admin}/").decode()
    assert "<canvas" in page and "/api/stats" in page and "http" not in page.split("<script>")[1]
    config = json.loads(get(f"http://{admin}/api/config"))
    assert [r["model"] for r in config["routes"]] == ["m", "m2"]
    load(proxy.url, "m", 50)
    time.sleep(2.2)
    series = json.loads(get(f"http://{admin}/api/stats"))["b"]
    assert sum(p["rps"] for p in series) == 50
    assert any(p["mean_batch"] for p in series)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_dashboard_renders_and_updates_in_headless_chromium(proxy, tmp_path):
    """A real browser loads the page under load; the screenshot's charts have data."""
    admin = f"127.0.0.1:{proxy.admin_port}"
    stop = time.monotonic() + 6

    def traffic() -> None:
        while time.monotonic() < stop:
            load(proxy.url, "m", 40)

    import threading

    thread = threading.Thread(target=traffic)
    thread.start()
    time.sleep(3)
    shot = tmp_path / "dashboard.png"
    url = f"http://{admin}/"
    chromium(url, "--window-size=1200,900", "--virtual-time-budget=3000", f"--screenshot={shot}")
    dom = dump_dom(url)
    thread.join()
    assert 'data-updated="' in dom and "req/s" in dom and 'id="b-b"' in dom
    assert '<div class="state">ready</div>' in dom  # each backend's state, from /readyz
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    blue = int((pixels == (37, 99, 235)).all(axis=2).sum())
    assert blue > 200, "no chart lines were drawn"
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, "benchmarks/results/dashboard.png")
