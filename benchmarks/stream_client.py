"""A lean ModelStreamInfer load client: pre-serialized requests, answers checked as bytes.

    python -m benchmarks.stream_client TARGET REQUESTS_FILE EXPECTED_FILE STREAMS WINDOW SECONDS

Each of STREAMS streams keeps WINDOW requests unanswered; every answer must contain
the expected output bytes of its request (the route must be `ordered: true`, so the
n-th answer on a stream belongs to the n-th request). Prints
one JSON line: answered, wrong, errors, rows_per_s, cpu_s (this client's own CPU).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import resource
import sys
import time
from pathlib import Path

import grpc
import uvloop

METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


async def one_stream(channel, requests, expected, window: int, until: float, totals: dict) -> None:
    call = channel.stream_stream(METHOD)()
    sent = 0

    async def writer() -> None:
        nonlocal sent
        credit = asyncio.Semaphore(window)
        writer.credit = credit  # type: ignore[attr-defined]
        while time.monotonic() < until:
            await credit.acquire()
            await call.write(requests[sent % len(requests)])
            sent += 1
        await call.done_writing()

    writer_task = asyncio.ensure_future(writer())
    await asyncio.sleep(0)
    received = 0
    async for answer in call:
        if answer[:1] == b"\x0a":  # field 1, error_message: that request failed
            totals["errors"] += 1
        elif expected[received % len(expected)] not in answer:
            totals["wrong"] += 1
        received += 1
        totals["answered"] += 1
        writer.credit.release()  # type: ignore[attr-defined]
    await writer_task


async def main() -> None:
    target, requests_file, expected_file, streams, window, seconds = sys.argv[1:7]
    requests = pickle.loads(Path(requests_file).read_bytes())
    expected = pickle.loads(Path(expected_file).read_bytes())
    totals = {"answered": 0, "wrong": 0, "errors": 0}
    start_cpu = resource.getrusage(resource.RUSAGE_SELF)
    async with grpc.aio.insecure_channel(target) as channel:
        start = time.monotonic()
        until = start + float(seconds)
        await asyncio.gather(
            *(
                one_stream(channel, requests, expected, int(window), until, totals)
                for _ in range(int(streams))
            )
        )
        elapsed = time.monotonic() - start
    end_cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu = end_cpu.ru_utime - start_cpu.ru_utime + end_cpu.ru_stime - start_cpu.ru_stime
    print(
        json.dumps(
            {
                **totals,
                "rows_per_s": totals["answered"] / elapsed,
                "cpu_s": cpu,
                "elapsed_s": elapsed,
            }
        )
    )


if __name__ == "__main__":
    uvloop.run(main())
