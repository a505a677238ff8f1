"""Redis Streams pipelines: inbox stream -> the route's batcher -> outbox stream, through
real `coalesce serve` and a real redis-server (Debian's), with redis-py on the test side
as a team's producer and reader would use it."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.client import inputs
from tests.support.browser import dump_dom
from tests.support.coalesce import ROOT, Process, free_port
from tests.support.pipelines import (
    ORDERING_BATCH,
    ORDERING_DELAY_MS,
    affine_pipeline,
    bad_messages,
    batch_totals,
    check_answer,
    check_ordering,
    grpc_caller,
    messages,
    prometheus,
    readyz,
    reload,
    request_body,
    rows,
    until,
)

pytest.importorskip("redis")
from tests.support.redis import RedisServer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    started = RedisServer()
    yield started
    started.close()


def pipeline_config(server: RedisServer, delay_ms: float = 0.0, **source) -> dict:
    inbox = {"type": "redis", "url": server.url, "stream": "requests", "group": "coalesce-scores"}
    return affine_pipeline({**inbox, **source}, delay_ms)


def add(server: RedisServer, values: list[tuple[str, bytes]], stream: str = "requests") -> None:
    """XADD each request as a producer would: the body in `value`, its key, a header."""
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for key, value in values:
        pipe.xadd(stream, {"value": value, "key": key, "trace": key})
    pipe.execute()


def read(server: RedisServer, stream: str, count: int, timeout: float = 60) -> list[dict]:
    """The entries of `stream` once it holds `count` (or when `timeout` runs out)."""
    client = server.client()
    end = time.monotonic() + timeout
    while client.xlen(stream) < count and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.3)  # anything more than `count` would show now
    return [fields for _, fields in client.xrange(stream)]


def check_entry(fields: dict[bytes, bytes], x_of: dict[str, np.ndarray]) -> str:
    key = fields[b"key"].decode()
    headers = {k.decode(): v for k, v in fields.items() if k not in (b"value", b"key")}
    return check_answer(key, headers, fields[b"value"], x_of, "requests")


def arrivals(server: RedisServer, stream: str, count: int, timeout: float = 60) -> list[float]:
    """When each of the first `count` entries of `stream` appeared (a blocking reader)."""
    client = server.client()
    times: list[float] = []
    last, end = "0", time.monotonic() + timeout
    while len(times) < count and time.monotonic() < end:
        for _, entries in client.xread({stream: last}, block=1000) or []:
            times += [time.monotonic()] * len(entries)
            last = entries[-1][0]
    return times


def pending(server: RedisServer) -> int:
    return server.client().xpending("requests", "coalesce-scores")["pending"]


def kill_holding(proxy: Process, server: RedisServer, consumer: str) -> None:
    """`kill -9` mid-cycle: frozen (SIGSTOP) at a moment it holds entries it has not
    answered, then killed, so that it dies holding them."""
    client = server.client()
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"{consumer} never held an entry"
        proxy.proc.send_signal(signal.SIGSTOP)
        if client.xpending_range("requests", "coalesce-scores", "-", "+", 10, consumer):
            break
        proxy.proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()


def status(proxy: Process) -> dict:
    return readyz(proxy)["pipelines"]["scores"]


def test_every_entry_gets_its_own_result_and_grpc_callers_share_the_batcher(
    server, coalesce_process
):
    proxy = coalesce_process(pipeline_config(server))
    values, x_of = messages(2000)
    with grpc_caller(proxy) as grpc_answers:
        add(server, values)
        results = read(server, "results", len(values))
    keys = [check_entry(fields, x_of) for fields in results]
    assert sorted(keys) == sorted(x_of), "each request answered once"
    assert grpc_answers
    until(lambda: status(proxy)["lag"] == {"0": 0}, "lag 0 once everything is acknowledged")
    assert pending(server) == 0
    found = status(proxy)
    assert found["ready"] and found["consumed"] == found["published"] == len(values)
    batches, rows_in_batches = batch_totals(proxy, "affine")
    assert rows_in_batches == len(values) + len(grpc_answers)  # one batcher served both
    assert rows_in_batches / batches > 3, "entries that queued together share batches"


@pytest.mark.parametrize("ordering", ["as_ready", "input"])
def test_results_are_published_as_each_batch_is_answered_or_in_input_order(
    server, coalesce_process, ordering
):
    """A backlog of 40 one-row entries, batches of 4 rows taking 150 ms each: as_ready
    (the default) publishes each batch's results as it is answered; input publishes a
    whole fetch (the first is 16 entries, the next the other 24) at once, in order."""
    config = pipeline_config(server, delay_ms=ORDERING_DELAY_MS)
    config["backends"]["affine"]["batching"] = {"max_batch_size": ORDERING_BATCH}
    if ordering == "input":
        config["pipelines"]["scores"]["ordering"] = "input"
    values, x_of = messages(40)
    add(server, values)
    coalesce_process(config)
    times = arrivals(server, "results", len(values))
    results = read(server, "results", len(values))
    keys = [check_entry(fields, x_of) for fields in results]
    check_ordering(ordering, keys, list(x_of), times)
    until(lambda: pending(server) == 0, "every input acknowledged")


def test_a_kill_9_mid_stream_leaves_each_result_exactly_once(server, coalesce_process):
    """Results are added in the same atomic script that acknowledges their inputs, so a
    `kill -9` leaves each entry either answered and acknowledged or pending; the
    restarted instance (same consumer name) reads its own pending entries first."""
    config = pipeline_config(server, delay_ms=5, consumer="scores-0")
    config["pipelines"]["scores"]["max_in_flight"] = 200
    values, x_of = messages(4000)
    add(server, values)
    first = coalesce_process(config)
    until(lambda: status(first)["published"] >= 1000, "the pipeline does not move")
    kill_holding(first, server, "scores-0")
    second = coalesce_process(config)
    results = read(server, "results", len(values))
    keys = [check_entry(fields, x_of) for fields in results]
    assert len(keys) == len(values) and sorted(keys) == sorted(x_of), "each exactly once"
    assert status(second)["consumed"] < len(values), "resumed, not redone"
    until(lambda: pending(server) == 0, "nothing left pending")


def test_entries_of_a_killed_instance_are_claimed_by_the_other(server, coalesce_process):
    """Two instances share the group; one is killed and never comes back: its pending
    entries are claimed (XAUTOCLAIM) by the other after claim_idle_ms, nothing is lost."""
    configs = [
        pipeline_config(server, delay_ms=20, consumer=name, claim_idle_ms=1000) for name in "ab"
    ]
    for config in configs:  # small cycles: each instance keeps taking its share
        config["pipelines"]["scores"]["max_in_flight"] = 50
    a, b = (coalesce_process(config) for config in configs)
    values, x_of = messages(6000)
    add(server, values)
    until(lambda: status(a)["published"] and status(b)["published"], "both should be working")
    kill_holding(b, server, "b")
    results = read(server, "results", len(values))
    keys = [check_entry(fields, x_of) for fields in results]
    assert sorted(keys) == sorted(x_of), "every request answered, each once"
    assert "claimed" in a.output()
    until(lambda: pending(server) == 0, "nothing left pending")


def test_an_entry_claimed_from_a_slow_live_instance_is_answered_once(server, coalesce_process):
    """With a model slower than claim_idle_ms, each instance claims entries the other is
    still working on, so both answer some entries: only the first answer is added."""
    configs = []
    for name in ("a", "b"):
        configs.append(pipeline_config(server, delay_ms=400, consumer=name, claim_idle_ms=100))
        configs[-1]["pipelines"]["scores"]["max_in_flight"] = 20
    a, b = (coalesce_process(c) for c in configs)
    values, x_of = messages(300)
    add(server, values)
    until(lambda: pending(server) == 0, "nothing left pending", 90)
    results = read(server, "results", len(values))
    keys = [check_entry(fields, x_of) for fields in results]
    answered = status(a)["published"] + status(b)["published"]
    print(f"\n{answered} answers computed for {len(values)} entries, {len(keys)} added")
    assert answered > len(values), "the instances should have answered some entries twice"
    assert sorted(keys) == sorted(x_of), "each result added once"


def test_bad_entries_go_to_the_dead_letter_stream_with_their_error(server, coalesce_process):
    proxy = coalesce_process(pipeline_config(server))
    good, x_of = messages(20)
    bad = bad_messages()
    add(server, [*good[:10], *bad, *good[10:]])
    results = read(server, "results", len(good))
    assert sorted(check_entry(fields, x_of) for fields in results) == sorted(x_of)
    rejected = {f[b"key"].decode(): f for f in read(server, "rejected", len(bad))}
    assert set(rejected) == {k for k, _ in bad}
    for key, value in bad:
        assert rejected[key][b"value"] == value, "the original message, for a replay"
        assert rejected[key][b"coalesce-source"].startswith(b"requests/0/")
        assert rejected[key][b"trace"] == key.encode()
    assert rejected["not-json"][b"coalesce-status"] == b"INVALID_ARGUMENT"
    assert b"message value" in rejected["not-json"][b"coalesce-error"]
    assert b"'z'" in rejected["wrong-tensor"][b"coalesce-error"]
    assert status(proxy)["dead_lettered"] == len(bad)
    until(lambda: pending(server) == 0, "rejected entries are acknowledged too")


def test_a_stopped_redis_makes_the_pipeline_not_ready_until_it_is_back(server, coalesce_process):
    proxy = coalesce_process(pipeline_config(server))
    values, x_of = messages(200)
    add(server, values[:100])
    assert len(read(server, "results", 100, timeout=30)) == 100
    assert readyz(proxy)["ready"]
    server.stop()
    until(lambda: not status(proxy)["ready"], "a pipeline without its broker is not ready", 30)
    assert readyz(proxy)["ready"] is False
    server.start()  # same port, same append-only file
    add(server, values[100:])
    results = read(server, "results", len(values))
    assert sorted(check_entry(fields, x_of) for fields in results) == sorted(x_of)
    until(lambda: readyz(proxy)["ready"], "ready again")


def test_a_reload_adds_a_redis_pipeline(server, coalesce_process):
    config = pipeline_config(server)
    pipelines = config.pop("pipelines")
    proxy = coalesce_process(config)
    reload(proxy, {"pipelines": pipelines})
    values, x_of = messages(50)
    add(server, values)
    results = read(server, "results", len(values), timeout=30)
    assert sorted(check_entry(fields, x_of) for fields in results) == sorted(x_of)
    assert "pipeline scores: added" in proxy.output()


def test_a_reload_adding_a_pipeline_whose_client_is_missing_is_refused(server, tmp_path):
    """Without redis-py installed, a reload that adds a Redis pipeline is refused before
    anything changes, naming the extra to install; the old config serves on."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "redis.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n"
    )
    config = pipeline_config(server)
    pipelines = config.pop("pipelines")
    proxy = Process(config, tmp_path, env={"PYTHONPATH": f"{blocker}:{ROOT}"})
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            reload(proxy, {"pipelines": pipelines})
        assert refused.value.code == 400
        problem = json.load(refused.value)
        assert "pip install 'coalesce[redis]'" in json.dumps(problem)
        assert "reload refused" in proxy.output()
        with tc.InferenceServerClient(proxy.url) as client:  # the old config serves on
            y = client.infer("affine", inputs(x=rows(1))).as_numpy("y")
        np.testing.assert_allclose(y, 2 * rows(1) + 1, rtol=1e-6)
        assert "pipelines" not in readyz(proxy)
    finally:
        proxy.terminate()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_backlog_of_big_messages_keeps_memory_bounded(server, coalesce_process):
    """~170 MB of requests waiting (300 of ~570 KB): a cycle reads at most about
    max_in_flight_mb of them, so the sidecar's RSS grows by far less than the backlog
    while it answers every message. (On Kafka, librdkafka's fetch limits bound the
    prefetch the same way; noida-db, the tests' stand-in, ignores them.)"""
    big = rows(8500)  # 8500 rows x 4 floats: ~570 KB of JSON
    values = [(f"b{i}", request_body(big + i, f"b{i}")) for i in range(300)]
    backlog = sum(len(v) for _, v in values) / (1 << 20)
    add(server, values)
    config = pipeline_config(server)
    config["pipelines"]["scores"]["max_in_flight_mb"] = 8
    config["backends"]["affine"]["batching"] = {"max_queue": 20000, "max_batch_size": 8500}
    proxy = coalesce_process(config)
    baseline, peak, stop = rss_mib(proxy.proc.pid), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(proxy.proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        until(lambda: status(proxy)["published"] == 300, "all answered", 120)
    finally:
        stop.set()
        sampler.join()
    grown = peak[0] - baseline
    print(f"\nbacklog {backlog:.0f} MiB: RSS {baseline:.0f} -> peak {peak[0]:.0f} MiB")
    assert backlog > 90
    assert grown < 100, f"RSS grew {grown:.0f} MiB for a {backlog:.0f} MiB backlog"
    first = server.client().xrange("results", count=1)[0][1]
    answer = json.loads(first[b"value"])
    x = big + int(first[b"key"].decode()[1:])
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(-1, 4), 2 * x + 1)


def test_a_request_larger_than_the_queue_is_a_dead_letter(server, coalesce_process):
    """It could never be queued: retrying it would block the inbox forever."""
    config = pipeline_config(server)
    config["backends"]["affine"]["batching"] = {"max_queue": 8}
    proxy = coalesce_process(config)
    good, x_of = messages(5)
    add(server, [("huge", request_body(rows(9), "huge")), *good])
    assert sorted(check_entry(f, x_of) for f in read(server, "results", len(good))) == sorted(x_of)
    (dead,) = read(server, "rejected", 1)
    assert dead[b"key"] == b"huge" and dead[b"coalesce-status"] == b"RESOURCE_EXHAUSTED"
    assert b"max_queue 8" in dead[b"coalesce-error"]
    until(lambda: pending(server) == 0, "acknowledged")
    assert status(proxy)["retried"] == 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_dashboard_shows_each_pipeline_its_state_and_counters(server, coalesce_process):
    proxy = coalesce_process(pipeline_config(server))
    values, _ = messages(40)
    add(server, [*values, ("bad", b"{nope")])
    assert len(read(server, "results", len(values))) == len(values)
    until(lambda: status(proxy)["dead_lettered"] == 1, "the bad one dead-lettered")
    dom = dump_dom(f"http://{proxy.admin}/")
    row = re.search(r'<tr data-pipeline="scores">(.*?)</tr>', dom)
    assert row, "no row for the pipeline"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert cells[:2] == ["scores", "ready"]
    assert cells[4:7] == ["41", "40", "1"]  # consumed, published, dead-lettered


def test_with_several_workers_each_reads_as_its_own_consumer_and_status_is_merged(
    server, coalesce_process
):
    """`workers: 2`: each serving process runs a consumer of its own name in the group;
    /readyz and /metrics (served by one of them) count both."""
    config = pipeline_config(server, delay_ms=5, consumer="pod")
    config["pipelines"]["scores"]["max_in_flight"] = 100
    proxy = coalesce_process({**config, "workers": 2, "listen": f"127.0.0.1:{free_port()}"})
    values, x_of = messages(3000)
    add(server, values)
    results = read(server, "results", len(values))
    assert sorted(check_entry(f, x_of) for f in results) == sorted(x_of)
    consumers = server.client().xinfo_consumers("requests", "coalesce-scores")
    assert sorted(c["name"].decode() for c in consumers) == ["pod-w0", "pod-w1"]
    until(lambda: status(proxy)["published"] == len(values), "both workers' counts, merged")
    sample = 'coalesce_pipeline_messages_total{outcome="published",pipeline="scores"}'
    until(lambda: prometheus(proxy, sample) == len(values), "merged in /metrics too")
