"""The benchmark suite: real servers on loopback, driven by the C load generator.

    python -m benchmarks.run [--scenarios gain,versus,overhead] [--duration 5] [--repeats 2]

Each scenario measures Coalesce and its baseline in the same run (alternating, so
noise on this shared machine hits both), prints a markdown table with the ratio to
the baseline, and everything is written to benchmarks/results/<time>.json and .md.
Every answer's bytes are checked by the load generator: speed never hides a wrong value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import yaml
from coalesce.codecs import wire

from benchmarks import bench_model, loadgen
from tests.support.coalesce import ROOT, Process, cpu_seconds, free_port

METHOD = "/inference.GRPCInferenceService/ModelInfer"
RESULTS = ROOT / "benchmarks" / "results"
CONNECTIONS = 4  # --connections


def infer_request(model: str, x: np.ndarray) -> bytes:
    request = wire.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def workload(model: str, count: int = 256) -> tuple[list[bytes], list[bytes]]:
    """Distinct single-row requests and the exact output bytes each answer must contain."""
    xs = bench_model.inputs(count)
    ys = bench_model.forward(xs)
    return (
        [infer_request(model, xs[i : i + 1]) for i in range(count)],
        [ys[i : i + 1].tobytes() for i in range(count)],
    )


def rss_mib(pid: int) -> float:
    """Resident memory of one process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(
    target: str,
    pid: int,
    requests,
    expected,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    rate: float | None = None,
) -> dict:
    """One load generator run, plus the server's CPU during the measured window."""
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            loadgen.run(
                target,
                METHOD,
                requests,
                expected,
                concurrency=concurrency,
                duration=duration,
                warmup=warmup,
                rate=rate,
                connections=min(CONNECTIONS, concurrency),
            )
        )
    )
    thread.start()
    time.sleep(warmup)
    start = cpu_seconds(pid)
    time.sleep(duration)
    cpu = cpu_seconds(pid) - start
    rss = rss_mib(pid)  # at the end of the measured window: under load
    thread.join()
    ok = max(result["ok"], 1)
    lat = result["latency_ms"]
    return {
        "throughput_rps": result["throughput_rps"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "ok": result["ok"],
        "errors": result["errors"],
        "mismatches": result["mismatches"],
        "server_cpu_us_per_req": cpu / ok * 1e6,
        "loadgen_cpu_us_per_req": result["cpu_us_per_req"],
        "rss_mib": rss,
    }


def median_of(runs: list[dict]) -> dict:
    keys = (
        "throughput_rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "server_cpu_us_per_req",
        "loadgen_cpu_us_per_req",
        "rss_mib",
    )
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["mismatches"] = sum(r["mismatches"] for r in runs)
    row["errors"] = [r["errors"] for r in runs if r["errors"]]
    row["repeats"] = len(runs)
    return row


Target = tuple[str, str, int, list[bytes], list[bytes]]  # (label, url, pid, requests, expected)


def compare(
    scenario: str, targets: list[Target], concurrencies: list[int], args, rates: tuple = ()
) -> list[dict]:
    """Every target at every load, `repeats` times, alternating targets.

    A load is a closed-loop concurrency, or (`rates`) an open-loop rate in requests/s:
    CPU per request falls as load rises (each wakeup serves more requests), so servers
    are compared for cost at the same rate, not only at the same concurrency."""
    if args.concurrencies:
        concurrencies = [int(c) for c in args.concurrencies.split(",")]
    loads = [(c, None) for c in concurrencies] + [(64, float(r)) for r in rates]
    rows = []
    for c, rate in loads:
        runs: dict[str, list[dict]] = {t[0]: [] for t in targets}
        for _ in range(args.repeats):
            for label, url, pid, requests, expected in targets:
                runs[label].append(
                    measure(
                        url,
                        pid,
                        requests,
                        expected,
                        concurrency=c,
                        duration=args.duration,
                        warmup=args.warmup,
                        rate=rate,
                    )
                )
        base = median_of(runs[targets[0][0]])
        for label, _, _, _, _ in targets:
            row = {
                "scenario": scenario,
                "target": label,
                "concurrency": c if rate is None else f"{rate:.0f}/s",
                **median_of(runs[label]),
            }
            row["x_baseline_rps"] = row["throughput_rps"] / max(base["throughput_rps"], 1e-9)
            row["x_baseline_cpu"] = row["server_cpu_us_per_req"] / max(
                base["server_cpu_us_per_req"], 1e-9
            )
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    if "throughput_rps" not in row:  # a memory reading alone
        dashes = " — |" * 7
        return (
            f"| {row['scenario']} | {row['target']} | {row['concurrency']} |{dashes} "
            f"{row['rss_mib']:.0f} | — |"
        )
    cpu_ratio = f"{row['x_baseline_cpu']:.2f}x" if "x_baseline_cpu" in row else "—"
    return (
        f"| {row['scenario']} | {row['target']} | {row['concurrency']} | "
        f"{row['throughput_rps']:,.0f} | {row['x_baseline_rps']:.2f}x | {row['p50_ms']:.2f} | "
        f"{row['p99_ms']:.2f} | {row['server_cpu_us_per_req']:.0f} | {cpu_ratio} | "
        f"{row['loadgen_cpu_us_per_req']:.0f} | {row.get('rss_mib', float('nan')):.0f} | "
        f"{row['mismatches']} |"
    )


HEADER = (
    "| scenario | target | c | req/s | vs baseline | p50 ms | p99 ms | server CPU µs/req | "
    "CPU vs baseline | loadgen CPU µs/req | server RSS MiB | wrong answers |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


@contextlib.contextmanager
def triton_server() -> Iterator:
    from tests.support.triton import TritonServer, ensure_triton

    ensure_triton()
    with TritonServer(ROOT / "benchmarks" / "triton_models") as server:
        yield server


@contextlib.contextmanager
def coalesce(config: dict, tmp: Path, args: tuple[str, ...] = ()) -> Iterator[Process]:
    """`coalesce serve`, with the grpc.aio fallback on too: `aio_url(process)` is its
    address (`process.url`, the default listener, is our own HTTP/2)."""
    config = {"grpc_aio_listen": f"127.0.0.1:{free_port()}", **config, "admin": None}
    process = Process(config, tmp, ("--log-level", "WARNING", *args))
    try:
        yield process
    finally:
        process.terminate()


def aio_url(process: Process) -> str:
    return yaml.safe_load(process.config.read_text())["grpc_aio_listen"]


def triton_route(triton, model: str, transport: str | None = None) -> dict:
    """The default config's route (transport auto: Coalesce's own client), or `transport`."""
    backend = {"type": "triton", "target": triton.grpc_url, "model": model}
    if transport is not None:
        backend["transport"] = transport
    return {"backends": {"mlp": backend}, "routes": [{"model": "bench_mlp", "backend": "mlp"}]}


@contextlib.contextmanager
def helper_server(module: str, *args: str) -> Iterator[tuple[str, int]]:
    """`python -m benchmarks.<module> PORT ARGS...` on a free port: (address, pid)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{module}", str(port), *args], cwd=ROOT
    )
    try:
        time.sleep(1.5)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait()


def scenario_gain(args, tmp: Path) -> list[dict]:
    """1. Batching gain: Triton with batching off, direct vs through Coalesce; and, for
    the latency at c=1, vs the floor of any Python hop (benchmarks/passthrough.py)."""
    with (
        triton_server() as triton,
        coalesce(triton_route(triton, "bench_mlp"), tmp) as proxy,
        coalesce(triton_route(triton, "bench_mlp", "grpc"), tmp) as core,
        helper_server("passthrough", triton.grpc_url) as (hop, hop_pid),
    ):
        requests, expected = workload("bench_mlp")
        targets = [
            ("triton direct (batching off)", triton.grpc_url, triton.pid, requests, expected),
            ("coalesce -> triton (default)", proxy.url, proxy.proc.pid, requests, expected),
            (
                "coalesce grpc_aio_listen -> triton",
                aio_url(proxy),
                proxy.proc.pid,
                requests,
                expected,
            ),
            ("coalesce -> grpc core -> triton", core.url, core.proc.pid, requests, expected),
            ("bare grpc.aio hop -> triton (no batching)", hop, hop_pid, requests, expected),
        ]
        with _workers(triton, args, tmp) as extra:
            return compare("gain", targets + extra(requests, expected), [1, 8, 64, 256], args)


def scenario_versus(args, tmp: Path) -> list[dict]:
    """2. Versus Triton's own dynamic batcher (max 64, no delay)."""
    with (
        triton_server() as triton,
        coalesce(triton_route(triton, "bench_mlp"), tmp) as proxy,
        coalesce(triton_route(triton, "bench_mlp", "grpc"), tmp) as core,
    ):
        direct = workload("bench_mlp_dyn")
        routed = workload("bench_mlp")
        targets = [
            ("triton dynamic batcher", triton.grpc_url, triton.pid, *direct),
            ("coalesce -> triton (default)", proxy.url, proxy.proc.pid, *routed),
            ("coalesce grpc_aio_listen -> triton", aio_url(proxy), proxy.proc.pid, *routed),
            ("coalesce -> grpc core -> triton", core.url, core.proc.pid, *routed),
        ]
        with _workers(triton, args, tmp) as extra:
            return compare("versus", targets + extra(*routed), [1, 64, 256], args)


@contextlib.contextmanager
def _workers(triton, args, tmp: Path) -> Iterator[Callable]:
    """With --workers N > 1: one more target, Coalesce with N serving processes."""
    if args.workers <= 1:
        yield lambda requests, expected: []
        return
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "workers": args.workers,
        **triton_route(triton, "bench_mlp"),
    }
    with coalesce(config, tmp) as proxy:
        label = f"coalesce x{args.workers} workers -> triton"
        yield lambda requests, expected: [(label, proxy.url, proxy.proc.pid, requests, expected)]


def scenario_overhead(args, tmp: Path) -> list[dict]:
    """3. Overhead: an in-process model that returns at once vs an empty grpc.aio server."""
    config = {
        "backends": {
            "echo": {"type": "local", "model": "benchmarks.models:identity", "inline": True}
        },
        "routes": [{"model": "bench_mlp", "backend": "echo"}],
    }
    requests, expected, response_file = instant_workload(tmp)
    with (
        helper_server("empty_server", str(response_file)) as (empty, empty_pid),
        coalesce(config, tmp) as proxy,
    ):
        targets = [
            ("empty grpc.aio server", empty, empty_pid, requests, [expected[0]] * 256),
            ("coalesce, instant model (default)", proxy.url, proxy.proc.pid, requests, expected),
            (
                "coalesce grpc_aio_listen, instant model",
                aio_url(proxy),
                proxy.proc.pid,
                requests,
                expected,
            ),
        ]
        return compare("overhead", targets, [1, 64, 256], args, rates=(4000,))


def instant_workload(tmp: Path) -> tuple[list[bytes], list[bytes], Path]:
    """256 one-row requests, each one's expected output bytes, and a file holding the
    serialized answer to the first (what the empty servers send back to every call)."""
    xs = bench_model.inputs(256)
    requests = [infer_request("bench_mlp", xs[i : i + 1]) for i in range(256)]
    expected = [xs[i : i + 1].tobytes() for i in range(256)]
    response = wire.ModelInferResponse(model_name="bench_mlp", model_version="1")
    response.outputs.add(name="y", datatype="FP32", shape=[1, 64])
    response.raw_output_contents.append(xs[0:1].tobytes())
    response_file = tmp / "response.bin"
    response_file.write_bytes(response.SerializeToString())
    return requests, expected, response_file


def scenario_floor(args, tmp: Path) -> list[dict]:
    """7. Below grpc.aio: the empty grpc.aio server vs HTTP/2 framed in Python on uvloop
    (benchmarks/h2_probe.py, a framing-only probe), both answering the same bytes."""
    requests, expected, response_file = instant_workload(tmp)
    same = [expected[0]] * len(requests)
    with (
        helper_server("empty_server", str(response_file)) as (empty, empty_pid),
        helper_server("h2_probe", str(response_file)) as (probe, probe_pid),
    ):
        targets = [
            ("empty grpc.aio server", empty, empty_pid, requests, same),
            ("python http/2 framing probe", probe, probe_pid, requests, same),
        ]
        return compare("floor", targets, [1, 64], args, rates=(4000,))


def scenario_metrics(args, tmp: Path) -> list[dict]:
    """5. What per-request metrics cost: the same instant model with `metrics` on and off."""
    xs = bench_model.inputs(256)
    requests = [infer_request("bench_mlp", xs[i : i + 1]) for i in range(256)]
    expected = [xs[i : i + 1].tobytes() for i in range(256)]

    def config(on: bool) -> dict:
        return {
            "metrics": on,
            "backends": {
                "echo": {"type": "local", "model": "benchmarks.models:identity", "inline": True}
            },
            "routes": [{"model": "bench_mlp", "backend": "echo"}],
        }

    with coalesce(config(False), tmp) as off, coalesce(config(True), tmp) as on:
        targets = [
            ("coalesce, metrics off", off.url, off.proc.pid, requests, expected),
            ("coalesce, metrics on", on.url, on.proc.pid, requests, expected),
        ]
        return compare("metrics", targets, [64], args)


POLICIES = {
    "default policy": {},
    "max_delay_ms: 2": {"max_delay_ms": 2},
    "max_in_flight: 2": {"max_in_flight": 2},
    "max_batch_size: 16": {"max_batch_size": 16},
}


def scenario_policy(args, tmp: Path) -> list[dict]:
    """6. The batching knobs: Coalesce -> Triton (batching off) with each one changed."""
    with contextlib.ExitStack() as stack:
        triton = stack.enter_context(triton_server())
        requests, expected = workload("bench_mlp")
        targets = []
        for label, batching in POLICIES.items():
            config = triton_route(triton, "bench_mlp")
            config["backends"]["mlp"]["batching"] = batching
            proxy = stack.enter_context(coalesce(config, tmp))
            targets.append((label, proxy.url, proxy.proc.pid, requests, expected))
        return compare("policy", targets, [1, 64], args)


def scenario_memory(args, tmp: Path) -> list[dict]:
    """8. Memory: Coalesce's RSS idle, then after each of 5 runs at c=256 through Triton
    (growth from run to run would be a leak)."""
    with triton_server() as triton, coalesce(triton_route(triton, "bench_mlp"), tmp) as proxy:
        requests, expected = workload("bench_mlp")
        rows = [
            {
                "scenario": "memory",
                "target": "coalesce idle (no request yet)",
                "concurrency": 0,
                "rss_mib": rss_mib(proxy.proc.pid),
            }
        ]
        print(format_row(rows[0]), flush=True)
        for run in range(1, 6):
            row = {
                "scenario": "memory",
                "target": f"coalesce -> triton, run {run}",
                "concurrency": 256,
                **measure(
                    proxy.url,
                    proxy.proc.pid,
                    requests,
                    expected,
                    concurrency=256,
                    duration=args.duration,
                    warmup=args.warmup,
                ),
            }
            row["x_baseline_rps"] = 1.0
            rows.append(row)
            print(format_row(row), flush=True)
        return rows


def scenario_streaming(args, tmp: Path) -> list[dict]:
    """4. Streaming: rows/s through ModelStreamInfer vs unary calls, same instant model."""
    import pickle

    config = {
        "backends": {
            "echo": {"type": "local", "model": "benchmarks.models:identity", "inline": True}
        },
        "routes": [{"model": "bench_mlp", "backend": "echo", "ordered": True}],
    }
    xs = bench_model.inputs(256)
    requests = [infer_request("bench_mlp", xs[i : i + 1]) for i in range(256)]
    expected = [xs[i : i + 1].tobytes() for i in range(256)]
    (tmp / "requests.pkl").write_bytes(pickle.dumps(requests))
    (tmp / "expected.pkl").write_bytes(pickle.dumps(expected))
    rows = []
    with coalesce(config, tmp) as proxy:
        for _ in range(args.repeats):
            unary = measure(
                proxy.url,
                proxy.proc.pid,
                requests,
                expected,
                concurrency=64,
                duration=args.duration,
                warmup=args.warmup,
            )
            start = cpu_seconds(proxy.proc.pid)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.stream_client",
                    proxy.url,
                    str(tmp / "requests.pkl"),
                    str(tmp / "expected.pkl"),
                    "4",
                    "64",
                    str(args.duration),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            server_cpu = cpu_seconds(proxy.proc.pid) - start
            stream = json.loads(out.stdout)
            rows.append((unary, stream, server_cpu))
    unary_rps = statistics.median(r[0]["throughput_rps"] for r in rows)
    stream_rps = statistics.median(r[1]["rows_per_s"] for r in rows)
    result = []
    for label, rps, cpu_us, client_us, wrong in [
        (
            "unary ModelInfer, c=64",
            unary_rps,
            statistics.median(r[0]["server_cpu_us_per_req"] for r in rows),
            statistics.median(r[0]["loadgen_cpu_us_per_req"] for r in rows),
            sum(r[0]["mismatches"] for r in rows),
        ),
        (
            "ModelStreamInfer, 4 streams x 64",
            stream_rps,
            statistics.median(r[2] / max(r[1]["answered"], 1) * 1e6 for r in rows),
            statistics.median(r[1]["cpu_s"] / max(r[1]["answered"], 1) * 1e6 for r in rows),
            sum(r[1]["wrong"] + r[1]["errors"] for r in rows),
        ),
    ]:
        row = {
            "scenario": "streaming",
            "target": label,
            "concurrency": 256 if "Stream" in label else 64,
            "throughput_rps": rps,
            "x_baseline_rps": rps / unary_rps,
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "max_ms": float("nan"),
            "server_cpu_us_per_req": cpu_us,
            "loadgen_cpu_us_per_req": client_us,
            "mismatches": wrong,
            "errors": [],
            "repeats": args.repeats,
        }
        result.append(row)
        print(format_row(row), flush=True)
    return result


def scenario_attacks(args, tmp: Path) -> list[dict]:
    """9. Attacks on our HTTP/2 listener, each beside a measured client (benchmarks/attacks.py)."""
    from benchmarks import attacks  # imported here: it imports this module

    return attacks.scenario_attacks(args, tmp)


SCENARIOS: dict[str, Callable] = {
    "gain": scenario_gain,
    "versus": scenario_versus,
    "overhead": scenario_overhead,
    "streaming": scenario_streaming,
    "metrics": scenario_metrics,
    "policy": scenario_policy,
    "floor": scenario_floor,
    "memory": scenario_memory,
    "attacks": scenario_attacks,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrencies", help="e.g. 1,64: instead of each scenario's own")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="N > 1: also measure Coalesce with N serving processes",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=4,
        help="client connections (the kernel spreads them over workers)",
    )
    args = parser.parse_args(argv)
    global CONNECTIONS
    CONNECTIONS = args.connections
    rows: list[dict] = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="coalesce-bench-") as tmp:
        for name in args.scenarios.split(","):
            rows += SCENARIOS[name](args, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (RESULTS / f"{stamp}.md").write_text(HEADER + "\n" + "\n".join(map(format_row, rows)) + "\n")
    print(f"wrote {RESULTS / stamp}.json and .md")
    return 1 if any(r.get("mismatches") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
