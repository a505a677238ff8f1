"""The sidecar process's BLAS threads: one, unless the operator chose.

OpenBLAS starts a thread per core for its matrix products and keeps them spinning a
while after each. The sidecar already runs a `local` model's batches in threads of
its own (`batching.max_in_flight`), beside the event loop and the broker clients'
threads, so those spinning threads take the CPU the loop needs. Measured on 2 cores,
a Kafka pipeline through the bench MLP (`python -m benchmarks.pipelines`): 4.1k ->
8.4k messages/s with KServe JSON, 4.8k -> 14.5k with kserve-proto, at one BLAS
thread. So `serve` sets one, unless OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or
MKL_NUM_THREADS says otherwise: a model with large matrices and one batch in flight
may want more. Models in `python` worker processes are their own processes, untouched.

OpenBLAS reads its thread count at load, and numpy is loaded before a config is read,
so it is set through OpenBLAS's own call (numpy's bundled scipy-openblas, or a
system one), found among the loaded libraries.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

CHOSEN_BY = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_NAMES = ("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads")


def _calls(kind: str) -> list:
    """OpenBLAS's `set`/`get` num_threads of each OpenBLAS loaded in this process."""
    import numpy  # noqa: F401  (loads its BLAS)

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: left as it is
        return []
    paths = {
        line.split()[-1]
        for line in maps.splitlines()
        if "openblas" in line.rpartition("/")[2].lower() and line.split()[-1].startswith("/")
    }
    found = []
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _NAMES:
            call = getattr(library, name.format(kind), None)
            if call is not None:
                found.append(call)
                break
    return found


def threads() -> int | None:
    """OpenBLAS's thread count now (None: no OpenBLAS found)."""
    counts = [call() for call in _calls("get")]
    return max(counts) if counts else None


def limit() -> int | None:
    """One BLAS thread unless the environment chose: what it is now (None: no OpenBLAS)."""
    if not any(os.environ.get(name) for name in CHOSEN_BY):
        for call in _calls("set"):
            call(1)
    return threads()
