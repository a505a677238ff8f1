"""perf_analyzer, Triton's own benchmark tool, runs unchanged against Coalesce in each
of its modes, and its server-side report (from ModelStatistics) adds up.

perf_analyzer asks for ModelMetadata, ModelConfig, ServerMetadata and, since Coalesce
lists the statistics extension, ModelStatistics before and after each window; it
exits if any is missing or if the server's counts disagree with each other. Runs are
short (0.5 s windows, at most 4 trials).
"""

from __future__ import annotations

import pytest

from tests.conftest import local_backend
from tests.support import perf_analyzer


@pytest.fixture(scope="module")
def proxy(triton, tmp_path_factory):
    from tests.support.coalesce import Process, free_port

    try:
        perf_analyzer.check()
    except perf_analyzer.Unavailable as exc:
        pytest.fail(f"perf_analyzer cannot run here ({exc}); `make test` installs what it needs")
    process = Process(
        {
            "http": f"127.0.0.1:{free_port()}",
            "backends": {
                "affine": local_backend("affine"),
                "slow": local_backend("affine", args={"delay_ms": 2.0}),
                "triton": {"type": "triton", "target": triton.grpc_url, "model": "affine"},
            },
            "routes": [
                {"model": "affine", "backend": "affine"},
                {"model": "slow", "backend": "slow"},
                {"model": "on-triton", "backend": "triton"},
            ],
        },
        tmp_path_factory.mktemp("perf-analyzer"),
    )
    yield process
    assert process.terminate() == 0


MODES = {
    "grpc": ["-i", "grpc"],
    "http": ["-i", "http"],
    "streaming": ["-i", "grpc", "--streaming"],
    "async": ["-i", "grpc", "--async"],
}


def address(proxy, mode: str) -> str:
    return proxy.http if mode == "http" else proxy.url


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_runs_and_the_server_counts_what_the_client_sent(proxy, mode):
    report = perf_analyzer.run("-m", "affine", "-u", address(proxy, mode), *MODES[mode])
    assert report.throughput > 0 and report.requests > 100, report.output
    # ModelStatistics, read before and after the window, saw the same requests
    assert report.server_inferences == pytest.approx(report.requests, rel=0.02), report.output


def test_a_long_busy_stream_is_not_taken_for_a_window_update_flood(proxy):
    """gRPC's C++ client acknowledges most messages it reads with a stream and a
    connection WINDOW_UPDATE; thousands of streamed answers must not exhaust its budget
    (at 2 updates per DATA frame sent it did, and perf_analyzer hung)."""
    report = perf_analyzer.run(
        "-m",
        "affine",
        "-u",
        proxy.url,
        "-i",
        "grpc",
        "--streaming",
        "--concurrency-range",
        "16",
        "--measurement-interval",
        "1500",
        timeout=90,
    )
    assert report.requests > 3000, report.output
    assert proxy.output().count("too many WINDOW_UPDATE") == 0


def test_a_batch_of_4_per_request_counts_4_inferences_each(proxy):
    report = perf_analyzer.run("-m", "affine", "-u", proxy.url, "-i", "grpc", "-b", "4")
    assert report.server_inferences == pytest.approx(4 * report.requests, rel=0.02)
    assert report.server_executions == pytest.approx(report.requests, rel=0.02)


def test_concurrent_callers_are_coalesced_into_fewer_backend_calls(proxy):
    report = perf_analyzer.run(
        "-m", "slow", "-u", proxy.url, "-i", "grpc", "--concurrency-range", "8"
    )
    assert report.requests > 100, report.output
    assert report.server_executions < report.server_inferences / 2, report.output


def test_through_coalesce_to_a_real_triton(proxy):
    report = perf_analyzer.run(
        "-m", "on-triton", "-u", proxy.url, "-i", "grpc", "--concurrency-range", "4"
    )
    assert report.throughput > 0 and report.requests > 50, report.output
