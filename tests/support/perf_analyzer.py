"""perf_analyzer, Triton's own benchmark tool, for tests and benchmarks.

Why this recipe: the PyPI `perf-analyzer` wheels from 2.58 need glibc 2.38 (Debian 12
has 2.36), but the `tritonclient==2.51.0` wheel carries a working binary in its data
directory. It links `libb64.so.0d` (Debian's libb64-0d, installed by `make test`) and
`libcudart.so.12` (PyPI's nvidia-cuda-runtime-cu12, in the test extras); no GPU is used.
The binary is unzipped once into ``${COALESCE_CACHE:-~/.cache/coalesce}/perf_analyzer-2.51``
under a file lock.

By hand: ``python -m tests.support.perf_analyzer -m MODEL -u HOST:PORT ...``.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL = "tritonclient==2.51.0"
_MEMBER = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
CACHE = Path(os.environ.get("COALESCE_CACHE", Path.home() / ".cache" / "coalesce"))
ROOT = CACHE / "perf_analyzer-2.51"


class Unavailable(RuntimeError):
    """perf_analyzer cannot run here; the message says what is missing."""


def _cudart() -> Path | None:
    try:
        import nvidia.cuda_runtime  # the nvidia-cuda-runtime-cu12 wheel
    except ImportError:
        return None
    return Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"


def ensure() -> Path:
    """The perf_analyzer binary, unzipped from the tritonclient 2.51 wheel once."""
    binary = ROOT / "perf_analyzer"
    if binary.exists():
        return binary
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp]
            done = subprocess.run(pip, capture_output=True, text=True, timeout=600)
            wheels = list(Path(tmp).glob("tritonclient-2.51.0-*.whl"))
            if done.returncode or not wheels:
                raise Unavailable(f"cannot download {WHEEL}: {done.stderr.strip()[-500:]}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                part = Path(tmp) / "perf_analyzer"
                part.write_bytes(wheel.read(_MEMBER))
            part.chmod(0o755)
            part.rename(binary)  # complete or absent, never half-written
    return binary


def environ() -> dict[str, str]:
    env = dict(os.environ)
    cudart = _cudart()
    if cudart is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p
        )
    return env


def check() -> None:
    """Raise Unavailable unless the binary and its libraries are here."""
    binary = ensure()
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, env=environ())
    if "error while loading shared libraries" in done.stderr:
        raise Unavailable(done.stderr.strip())


@dataclass
class Report:
    """What one perf_analyzer run printed, client and server side."""

    output: str
    throughput: float  # inferences/s
    avg_latency_us: float
    p99_latency_us: float
    requests: int
    server_inferences: int | None
    server_executions: int | None

    @classmethod
    def parse(cls, output: str) -> Report:
        def number(pattern: str) -> float | None:
            found = re.search(pattern, output)
            return float(found.group(1)) if found else None

        server = output.partition("Server:")[2]
        inferences = re.search(r"Inference count: (\d+)", server)
        executions = re.search(r"Execution count: (\d+)", server)
        return cls(
            output,
            number(r"Throughput: ([\d.]+) infer/sec") or 0.0,
            number(r"Avg latency: (\d+) usec") or 0.0,
            number(r"p99 latency: (\d+) usec") or 0.0,
            int(number(r"Request count: (\d+)") or 0),
            int(inferences.group(1)) if inferences else None,
            int(executions.group(1)) if executions else None,
        )


def run(*args: str, timeout: float = 60) -> Report:
    """perf_analyzer with `args` and bounded measurement settings; raises on failure."""
    command = [str(ensure()), *args]
    if not any(a.startswith("--measurement-interval") or a == "-p" for a in args):
        command += ["--measurement-interval", "500"]
    # The tests ask whether perf_analyzer runs and counts, not whether this shared
    # 2-core machine is quiet: a window is "stable" within 10x of the mean, so three
    # windows always settle (CI once failed at c=1 on -s 50 when a window was slow).
    if "-s" not in args and not any(a.startswith("--stability") for a in args):
        command += ["-s", "1000"]
    if not any(a.startswith("--max-trials") for a in args):
        command += ["--max-trials", "10"]
    done = subprocess.run(command, capture_output=True, text=True, env=environ(), timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"perf_analyzer {' '.join(args)} exited {done.returncode}:\n{output}")
    return Report.parse(output)


if __name__ == "__main__":
    print(run(*sys.argv[1:]).output)
