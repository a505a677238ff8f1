"""Python front end for the C gRPC load generator in benchmarks/loadgen/.

The generator itself is C so that, on a small machine, the client costs far
less CPU than the server it measures.  This module compiles it on demand,
writes the request/expected record files and returns the tool's JSON as a dict.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent / "loadgen" / "loadgen.c"
BIN = SRC.parent / "build" / "loadgen"  # build/ is gitignored


def can_build() -> bool:
    """Whether the binary exists or the libnghttp2 headers to compile it do."""
    return BIN.exists() or Path("/usr/include/nghttp2/nghttp2.h").exists()


def build(force: bool = False) -> Path:
    """Compile the binary if missing or older than its source (needs libnghttp2-dev)."""
    if force or not BIN.exists() or BIN.stat().st_mtime < SRC.stat().st_mtime:
        BIN.parent.mkdir(exist_ok=True)
        tmp = BIN.with_suffix(".tmp")  # rename so a concurrent run never sees half a binary
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [cc, "-O2", "-Wall", "-o", str(tmp), str(SRC), "-lnghttp2", "-lm"], check=True
        )
        tmp.replace(BIN)
    return BIN


def _write_records(path: Path, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for r in records:
            f.write(struct.pack("<I", len(r)))
            f.write(r)


def run(
    target: str,
    method: str,
    requests: list[bytes],
    expected: list[bytes] | None = None,
    *,
    concurrency: int = 64,
    connections: int = 4,
    duration: float = 5.0,
    warmup: float = 1.0,
    rate: float | None = None,
    max_outstanding: int = 10000,
    drain: float = 2.0,
    seed: int = 1,
) -> dict:
    """Drive `method` (e.g. "/inference.GRPCInferenceService/ModelInfer") on `target`
    ("host:port", h2c) and return the result dict.

    Call i sends requests[i % N] (serialized message, without gRPC prefix); it is
    "ok" iff grpc-status is 0 and the response message contains expected[i % N]
    (b"" or expected=None: no check).  rate=None: closed loop with `concurrency`
    calls outstanding over `connections`; rate=R: open loop, Poisson arrivals,
    latency from the scheduled send time, at most `max_outstanding` in flight.

    Keys: sent, answered, ok, mismatches, errors ({grpc code or transport/no_status/
    no_connection: n}), unfinished, dropped, throughput_rps (ok/duration),
    offered_rps, latency_ms {p50,p90,p99,max,mean} over answered calls,
    cpu_s / cpu_us_per_req (the tool's own CPU during the measured window).
    """
    if not requests:
        raise ValueError("need at least one request")
    if expected is None:
        expected = [b""] * len(requests)
    if len(expected) != len(requests):
        raise ValueError("requests and expected must have the same length")
    binary = build()
    with tempfile.TemporaryDirectory(prefix="loadgen-") as d:
        req_f, exp_f = Path(d, "requests.bin"), Path(d, "expected.bin")
        _write_records(req_f, requests)
        _write_records(exp_f, expected)
        cmd = [
            str(binary),
            "--target",
            target,
            "--method",
            method,
            "--requests",
            str(req_f),
            "--expected",
            str(exp_f),
            "--concurrency",
            str(concurrency),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--max-outstanding",
            str(max_outstanding),
            "--drain",
            str(drain),
            "--seed",
            str(seed),
        ]
        if rate is not None:
            cmd += ["--rate", str(rate)]
        # generous timeout: the tool stops itself after warmup+duration+drain
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=warmup + duration + drain + 30
        )
    if p.returncode != 0:
        raise RuntimeError(f"loadgen failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout)
