"""`type: python` figures: worker scaling, and the cost of moving tensors between processes.

    python -m benchmarks.python_workers [--duration 5] [--repeats 2] [--skip-transport]

1. Scaling: a CPU-bound pure-numpy model (benchmarks/cpu_model.py, ~2 ms a batch)
   behind `coalesce serve`, driven by the C load generator in a closed loop, on
   `python` with 1 and with 2 processes, and, for reference, as a `local` model on 2
   threads (the GIL keeps that near one core). Every answer's bytes are checked.
   `max_batch_size` is 1 by default so each request costs the model ~2 ms and the
   sidecar's own per-request work stays small beside it. The CPU the sidecar and its
   workers got is measured too: on a shared machine, the 2-process ratio falls short
   of 2x by what other processes take, while requests per core-second hold steady.
2. Transport: one batch's round trip to a worker running an identity model,
   through Coalesce's shared region (PythonAdapter) and through the alternative,
   pickling the arrays through a multiprocessing pipe.

Prints both tables and writes benchmarks/results/python_workers-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from benchmarks import cpu_model, loadgen
from benchmarks.run import METHOD, RESULTS, coalesce, infer_request
from tests.support.coalesce import cpu_seconds

CONCURRENCY = 8
SIZES = (256, 64 << 10, 1 << 20, 16 << 20, 64 << 20)


def workload(count: int = 256) -> tuple[list[bytes], list[bytes]]:
    """Distinct one-row requests and the exact output bytes each answer must contain."""
    xs = np.random.default_rng(1).integers(-3, 4, size=(count, 64)).astype(np.float32)
    ys = cpu_model.forward(xs)
    return (
        [infer_request("cpu", xs[i : i + 1]) for i in range(count)],
        [ys[i : i + 1].tobytes() for i in range(count)],
    )


def backends(max_batch_size: int) -> dict[str, dict]:
    batching = {"max_batch_size": max_batch_size}
    model = "benchmarks.cpu_model:load"
    return {
        "python, 1 process": {
            "type": "python",
            "model": model,
            "processes": 1,
            "batching": batching,
        },
        "python, 2 processes": {
            "type": "python",
            "model": model,
            "processes": 2,
            "batching": batching,
        },
        "local, 2 threads": {
            "type": "local",
            "model": model,
            "batching": {**batching, "max_in_flight": 2},
        },
    }


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (the workers)."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[
                1
            ] == str(pid):
                total += cpu_seconds(int(entry.name))
        except (OSError, IndexError):
            continue
    return total


def measure(
    url: str,
    pid: int,
    requests: list[bytes],
    expected: list[bytes],
    args,
    concurrency: int = CONCURRENCY,
) -> dict:
    """One closed-loop load generator run, with the sidecar's and its workers' CPU."""
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(
            loadgen.run(
                url,
                METHOD,
                requests,
                expected,
                concurrency=concurrency,
                connections=4,
                duration=args.duration,
                warmup=args.warmup,
            )
        )
    )
    run.start()
    time.sleep(args.warmup)
    start = process_tree_cpu(pid)
    time.sleep(args.duration)
    cores = (process_tree_cpu(pid) - start) / args.duration
    run.join()
    return {
        "throughput_rps": result["throughput_rps"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "mismatches": result["mismatches"],
        "errors": result["errors"],
        "cores_used": cores,
    }


def scaling(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Each backend in turn, `repeats` rounds, alternating so noise hits them all."""
    requests, expected = workload()
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for label, backend in backends(args.max_batch_size).items():
            config = {"backends": {"cpu": backend}, "routes": [{"model": "cpu", "backend": "cpu"}]}
            with coalesce(config, tmp) as proxy:
                result = measure(proxy.url, proxy.proc.pid, requests, expected, args)
            runs.setdefault(label, []).append(result)
    rows = []
    for label, results in runs.items():
        rows.append(
            {
                "target": label,
                "throughput_rps": statistics.median(r["throughput_rps"] for r in results),
                "p50_ms": statistics.median(r["p50_ms"] for r in results),
                "p99_ms": statistics.median(r["p99_ms"] for r in results),
                "cores_used": statistics.median(r["cores_used"] for r in results),
                "req_per_core_s": statistics.median(
                    r["throughput_rps"] / r["cores_used"] for r in results
                ),
                "mismatches": sum(r["mismatches"] for r in results),
                "errors": [r["errors"] for r in results if r["errors"]],
                "runs": [r["throughput_rps"] for r in results],
            }
        )
    return rows


def _pipe_echo(conn: Connection) -> None:
    while (message := conn.recv()) is not None:
        conn.send({"y": message["x"]})


@contextmanager
def pipe_worker() -> Iterator[Connection]:
    """A worker answering pickled dicts of arrays through a multiprocessing pipe."""
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_pipe_echo, args=(theirs,))
    process.start()
    try:
        yield ours
    finally:
        ours.send(None)
        process.join()


def _median_s(call, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _shared_region_times(arrays: dict[int, np.ndarray]) -> dict[int, float]:
    from coalesce import config as config_module
    from coalesce.adapters.python import PythonAdapter

    spec = {"type": "python", "model": "benchmarks.models:identity", "processes": 1}
    config = config_module.parse(
        {"backends": {"e": spec}, "routes": [{"model": "e", "backend": "e"}]}
    )
    adapter = PythonAdapter("e", config.backends["e"])
    await adapter.load()
    times = {}
    try:
        for size, x in arrays.items():
            await adapter.infer({"x": x}, None)  # grow the region first
            samples = []
            for _ in range(_reps(size)):
                start = time.perf_counter()
                y = (await adapter.infer({"x": x}, None))["y"]
                samples.append(time.perf_counter() - start)
            assert np.array_equal(y, x)
            times[size] = statistics.median(samples)
    finally:
        await adapter.close()
    return times


def _reps(size: int) -> int:
    return max(10, min(2000, (256 << 20) // max(size, 1) // 8))


def transport() -> list[dict]:
    arrays = {size: np.ones((1, size // 4), dtype=np.float32) for size in SIZES}
    import uvloop

    shared = uvloop.run(_shared_region_times(arrays))
    piped = {}
    with pipe_worker() as conn:
        for size, x in arrays.items():

            def round_trip(x: np.ndarray = x) -> None:
                conn.send({"x": x})
                conn.recv()

            round_trip()
            piped[size] = _median_s(round_trip, _reps(size))
    return [
        {
            "bytes": size,
            "shared_region_ms": shared[size] * 1000,
            "pickle_pipe_ms": piped[size] * 1000,
            "pipe_over_shared": piped[size] / shared[size],
        }
        for size in SIZES
    ]


def model_ms() -> float:
    x = np.ones((1, 64), dtype=np.float32)
    return _median_s(lambda: cpu_model.forward(x), 50) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--skip-transport", action="store_true")
    args = parser.parse_args(argv)
    report: dict = {"args": vars(args), "model_ms_per_batch": model_ms()}
    print(f"model: {report['model_ms_per_batch']:.2f} ms per one-row batch, in-process")
    if not args.skip_transport:
        report["transport"] = transport()
        print("\n| batch bytes | shared region ms | pickle through a pipe ms | pipe / shared |")
        print("|---|---|---|---|")
        for r in report["transport"]:
            print(
                f"| {r['bytes']:,} | {r['shared_region_ms']:.3f} | {r['pickle_pipe_ms']:.3f} "
                f"| {r['pipe_over_shared']:.2f}x |"
            )
    with tempfile.TemporaryDirectory(prefix="coalesce-bench-") as tmp:
        rows = scaling(args, Path(tmp))
    report["scaling"] = rows
    base = rows[0]["throughput_rps"]
    print(
        f"\n| backend (c={CONCURRENCY}) | req/s | vs 1 process | p50 ms | p99 ms "
        "| cores used (sidecar + workers) | req per core-second | wrong answers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["vs_one_process"] = r["throughput_rps"] / base
        print(
            f"| {r['target']} | {r['throughput_rps']:,.0f} | {r['vs_one_process']:.2f}x "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cores_used']:.2f} "
            f"| {r['req_per_core_s']:.0f} | {r['mismatches']} |"
        )
    ratio = rows[1]["throughput_rps"] / base
    report["ratio_2_over_1"] = ratio
    cores = rows[1]["cores_used"] / rows[0]["cores_used"]
    print(f"\nthroughput, 2 processes / 1 process: {ratio:.2f}x (with {cores:.2f}x the CPU)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"python_workers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 1 if any(r["mismatches"] or r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
