"""Several serving processes on one port: a small supervisor.

Python serves one core per process; with `workers: N` the supervisor starts N
copies of `coalesce serve` that bind the same port with SO_REUSEPORT, so the
kernel spreads client connections across them. Each worker has its own
batchers (no cross-process hop on the request path). Worker 0 alone serves the
admin port. A worker that dies is restarted; SIGTERM/SIGINT are passed on and
the supervisor exits once every worker has drained.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

log = logging.getLogger("coalesce")
_PR_SET_PDEATHSIG = 1
_RESTART_DELAY_S = 1.0


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if its supervisor dies, even by kill -9."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed supervisor
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(argv: list[str], workers: int) -> int:
    """Run `coalesce serve` + argv as `workers` processes until a signal; 0 if all drained."""
    stopping = False

    folder = tempfile.mkdtemp(prefix="coalesce-metrics-")  # see coalesce.ops.stats

    def start(index: int) -> subprocess.Popen:
        serve = [sys.executable, "-m", "coalesce.cli", "serve", *argv]
        env = {**os.environ, "COALESCE_METRICS_DIR": folder, "COALESCE_WORKER_INDEX": str(index)}
        return subprocess.Popen([*serve, "--worker-index", str(index)], env=env)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in procs.values():
            if process.poll() is None:
                process.send_signal(signum)

    procs = {i: start(i) for i in range(workers)}

    def reload(signum: int, frame: object) -> None:
        for process in procs.values():
            if process.poll() is None:
                process.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    log.info(
        "supervising %d workers (pids %s)", workers, ", ".join(str(p.pid) for p in procs.values())
    )
    codes: dict[int, int] = {}
    while len(codes) < workers:
        for index, process in procs.items():
            if index in codes or process.poll() is None:
                continue
            if stopping:
                codes[index] = process.returncode
            else:
                log.error("worker %d exited with %s; restarting it", index, process.returncode)
                time.sleep(_RESTART_DELAY_S)
                procs[index] = start(index)
        time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)
    return max(codes.values(), default=0)
