"""The benchmark load generator (benchmarks/loadgen/) checks what it measures.

The suite's figures are only worth quoting if a wrong answer or a failed call is
counted as such: these run the C tool against a real `coalesce serve`.
"""

from __future__ import annotations

import pytest

from benchmarks import bench_model, loadgen
from benchmarks.run import METHOD, infer_request

pytestmark = pytest.mark.skipif(
    not loadgen.can_build(), reason="needs libnghttp2-dev (make test installs it)"
)

CONFIG = {
    "backends": {"echo": {"type": "local", "model": "benchmarks.models:identity", "inline": True}},
    "routes": [{"model": "bench_mlp", "backend": "echo"}],
}


def workload(count: int = 16) -> tuple[list[bytes], list[bytes]]:
    xs = bench_model.inputs(count)
    requests = [infer_request("bench_mlp", xs[i : i + 1]) for i in range(count)]
    return requests, [xs[i : i + 1].tobytes() for i in range(count)]


def test_right_answers_are_counted_ok(coalesce_process):
    proxy = coalesce_process(CONFIG)
    requests, expected = workload()
    result = loadgen.run(
        proxy.url,
        METHOD,
        requests,
        expected,
        concurrency=8,
        duration=0.5,
        warmup=0.2,
        connections=2,
    )
    assert result["ok"] > 100
    assert result["mismatches"] == 0 and result["errors"] == {}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert result["cpu_us_per_req"] > 0


def test_wrong_answers_and_failed_calls_are_counted(coalesce_process):
    proxy = coalesce_process(CONFIG)
    requests, expected = workload()
    wrong = [bytes(len(e)) for e in expected]  # zeros: the inputs never are all zero
    result = loadgen.run(
        proxy.url, METHOD, requests, wrong, concurrency=4, duration=0.3, warmup=0.1, connections=1
    )
    assert result["ok"] == 0 and result["mismatches"] == result["answered"] > 0
    unknown = [infer_request("no_such_model", bench_model.inputs(1))]
    result = loadgen.run(
        proxy.url, METHOD, unknown, None, concurrency=4, duration=0.3, warmup=0.1, connections=1
    )
    assert result["ok"] == 0 and set(result["errors"]) == {"5"}  # NOT_FOUND


def test_open_loop_offers_the_rate_asked(coalesce_process):
    proxy = coalesce_process(CONFIG)
    requests, expected = workload()
    result = loadgen.run(proxy.url, METHOD, requests, expected, rate=500, duration=1.0, warmup=0.2)
    assert 350 < result["offered_rps"] < 650  # Poisson arrivals over one second
    assert result["mismatches"] == 0 and result["ok"] == result["answered"] > 300
