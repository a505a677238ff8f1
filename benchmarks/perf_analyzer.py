"""perf_analyzer's figures: Triton's own tool, through Coalesce and direct to Triton.

    python -m benchmarks.perf_analyzer [--concurrencies 1,16,64] [--interval-ms 2000]

Same run, alternating targets: Triton's own dynamic batcher (bench_mlp_dyn) and
Coalesce with its default config in front of the same model with Triton's batching
off (bench_mlp), both over gRPC; then Coalesce over REST and gRPC streaming. Prints a
table and writes benchmarks/results/<time>-perf_analyzer.json. Our own load
generator's figures are in `benchmarks.run` (scenario versus); this is the view a
Triton user's tool gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import RESULTS, coalesce, triton_route, triton_server
from tests.support import perf_analyzer
from tests.support.coalesce import free_port

HEADER = (
    "| target | protocol | c | infer/s | vs Triton | avg µs | p99 µs | server inferences "
    "per execution |\n|---|---|---|---|---|---|---|---|"
)


def row(target: str, protocol: str, concurrency: int, report, base: float | None) -> dict:
    executions = report.server_executions or 0
    return {
        "target": target,
        "protocol": protocol,
        "concurrency": concurrency,
        "throughput": report.throughput,
        "x_triton": report.throughput / base if base else None,
        "avg_us": report.avg_latency_us,
        "p99_us": report.p99_latency_us,
        "batch": (report.server_inferences or 0) / executions if executions else None,
    }


def line(r: dict) -> str:
    ratio = f"{r['x_triton']:.2f}x" if r["x_triton"] else "—"
    batch = f"{r['batch']:.1f}" if r["batch"] else "—"
    return (
        f"| {r['target']} | {r['protocol']} | {r['concurrency']} | {r['throughput']:,.0f} | "
        f"{ratio} | {r['avg_us']:.0f} | {r['p99_us']:.0f} | {batch} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrencies", default="1,16,64")
    parser.add_argument("--interval-ms", type=int, default=2000)
    args = parser.parse_args(argv)
    perf_analyzer.check()
    window = ("--measurement-interval", str(args.interval_ms), "-s", "50", "--max-trials", "6")
    rows: list[dict] = []
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="coalesce-pa-") as tmp, triton_server() as triton:
        config = {**triton_route(triton, "bench_mlp"), "http": f"127.0.0.1:{free_port()}"}
        with coalesce(config, Path(tmp)) as proxy:
            for concurrency in map(int, args.concurrencies.split(",")):
                load = ("--concurrency-range", str(concurrency), *window)
                direct = perf_analyzer.run(
                    "-m",
                    "bench_mlp_dyn",
                    "-u",
                    triton.grpc_url,
                    "-i",
                    "grpc",
                    *load,
                    timeout=300,
                )
                runs = [("triton dynamic batcher", "grpc", direct, None)]
                for protocol, extra, url in (
                    ("grpc", ("-i", "grpc"), proxy.url),
                    ("grpc --streaming", ("-i", "grpc", "--streaming"), proxy.url),
                    ("http", ("-i", "http"), proxy.http),
                ):
                    report = perf_analyzer.run(
                        "-m", "bench_mlp", "-u", url, *extra, *load, timeout=300
                    )
                    runs.append(("coalesce -> triton (default)", protocol, report, direct))
                for target, protocol, report, base in runs:
                    entry = row(
                        target, protocol, concurrency, report, base.throughput if base else None
                    )
                    rows.append(entry)
                    print(line(entry), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-perf_analyzer.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
