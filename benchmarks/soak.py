"""A bounded soak: steady load on a `coalesce serve` for N minutes, RSS sampled throughout.

    python -m benchmarks.soak [--minutes 10] [--rate 1500]

Open-loop load (Poisson arrivals, the C load generator) on the bench model through
a local backend; one run of the load generator per 30 s window, so each window's
answers are checked. Prints RSS at start and end and writes benchmarks/results/soak-*.json.
Not part of the CI run (it takes minutes by design).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import bench_model, loadgen
from benchmarks.run import METHOD, RESULTS, coalesce, infer_request, rss_mib
from tests.support.coalesce import cpu_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1500.0, help="requests per second")
    args = parser.parse_args(argv)
    config = {
        "backends": {"mlp": {"type": "local", "model": "benchmarks.models:mlp"}},
        "routes": [{"model": "bench_mlp", "backend": "mlp"}],
    }
    xs = bench_model.inputs(256)
    ys = bench_model.forward(xs)
    requests = [infer_request("bench_mlp", xs[i : i + 1]) for i in range(256)]
    expected = [ys[i : i + 1].tobytes() for i in range(256)]
    windows = []
    with tempfile.TemporaryDirectory() as tmp, coalesce(config, Path(tmp)) as proxy:
        pid = proxy.proc.pid
        start, start_rss = time.monotonic(), rss_mib(pid)
        print(f"RSS at start: {start_rss:.1f} MiB", flush=True)
        while time.monotonic() - start < args.minutes * 60:
            result = loadgen.run(
                proxy.url,
                METHOD,
                requests,
                expected,
                rate=args.rate,
                duration=30,
                warmup=0.5,
                drain=2,
            )
            window = {
                "t_s": round(time.monotonic() - start),
                "rss_mib": rss_mib(pid),
                "ok": result["ok"],
                "mismatches": result["mismatches"],
                "errors": result["errors"],
                "p99_ms": result["latency_ms"]["p99"],
                "cpu_s": cpu_seconds(pid),
            }
            windows.append(window)
            print(json.dumps(window), flush=True)
        end_rss = rss_mib(pid)
    summary = {
        "minutes": args.minutes,
        "rate": args.rate,
        "rss_start_mib": start_rss,
        "rss_end_mib": end_rss,
        "rss_max_mib": max(w["rss_mib"] for w in windows),
        "ok": sum(w["ok"] for w in windows),
        "mismatches": sum(w["mismatches"] for w in windows),
        "errors": [w["errors"] for w in windows if w["errors"]],
        "windows": windows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(
        f"RSS start {start_rss:.1f} MiB, end {end_rss:.1f} MiB, max {summary['rss_max_mib']:.1f}"
        f" MiB; {summary['ok']} ok, {summary['mismatches']} wrong; wrote {out}"
    )
    return 1 if summary["mismatches"] or summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
