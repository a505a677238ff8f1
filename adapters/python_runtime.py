"""Managed runtimes: the virtual environment a `type: python` backend's workers run in.

A backend's `requirements` are installed into a venv of their own, so a model may pin
libraries (numpy 1.26, an old scikit-learn) that differ from the sidecar's. The venv
is named by a digest of what decides its contents: the requirements (a file's
contents, not its path) and the base interpreter's version, ABI and platform. A
restart, a second backend or a second sidecar on the same cache reuses it.

Builds are safe to race: one lock file per digest (flock, so sidecars sharing a
volume wait for each other), the venv built in a folder of its own and renamed into
place only once it imports numpy, so a half-built environment is never used. A venv
survives the rename because Python finds its prefix from `pyvenv.cfg` next to
`bin/python`; we only ever run that interpreter, never the console scripts whose
shebangs name the old path.

Installer: `uv` when on PATH (about 7x faster here), else the base interpreter's own
`venv` + `pip`. Index settings come from the environment as for any pip or uv run
(PIP_INDEX_URL, UV_INDEX_URL, pip.conf...): nothing is set here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("coalesce")
MARKER = ".coalesce-complete"
TAIL_LINES = 12
_IDENTITY = (
    "import json, platform, sys, sysconfig; print(json.dumps([sys.version, "
    "sys.implementation.cache_tag, sysconfig.get_platform(), platform.machine(), "
    "sys.abiflags if hasattr(sys, 'abiflags') else '']))"
)


class BuildFailed(Exception):
    """The environment could not be built; the message ends with the installer's output."""


def default_cache_dir() -> Path:
    """$COALESCE_CACHE/runtimes, else ~/.cache/coalesce/runtimes."""
    base = os.environ.get("COALESCE_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "coalesce"
    return root / "runtimes"


def _name(requirement: str) -> str:
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", found.group(1)).lower() if found else ""


def installer() -> str:
    """'uv' when it is on PATH, else 'pip'."""
    return "uv" if shutil.which("uv") else "pip"


class Environment:
    """One backend's venv: where it lives, whether it is built, and how to build it."""

    def __init__(
        self,
        requirements: list[str] | str,
        *,
        base: str | None = None,
        cache_dir: str | Path | None = None,
        label: str = "",
        timeout_s: float = 1800.0,
    ) -> None:
        self.requirements = requirements  # a list of requirement strings, or a file's path
        self.base = base or sys.executable
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.label = label  # for the log: "backend NAME"
        self.timeout_s = timeout_s
        self.step = "waiting to start"
        self.digest = ""
        self.seconds = 0.0  # how long prepare() took
        self.reused = False  # the cache already held it
        self.on_step: Callable[[str], None] = lambda step: None

    @property
    def path(self) -> Path:
        return self.cache_dir / self.digest

    @property
    def python(self) -> str:
        return str(self.path / "bin" / "python")

    def _lines(self) -> list[str]:
        if isinstance(self.requirements, str):
            return [Path(self.requirements).read_text()]
        return list(self.requirements)

    async def _identify(self) -> str:
        """The digest of (requirements, base interpreter's version, ABI, platform)."""
        out = await self._run([self.base, "-c", _IDENTITY], "identify the interpreter")
        identity = json.loads(out.strip().splitlines()[-1])
        digest = hashlib.sha256(json.dumps([self._lines(), identity]).encode())
        return digest.hexdigest()[:24]

    def _report(self, step: str) -> None:
        self.step = step
        log.info("%s: runtime %s%s", self.label, f"{self.digest}: " if self.digest else "", step)
        self.on_step(step)

    async def prepare(self) -> str:
        """Build the venv unless the cache holds it; its interpreter's path."""
        start = time.perf_counter()
        self._report("identifying the interpreter")
        try:
            self.digest = await self._identify()
        except OSError as exc:
            raise BuildFailed(f"requirements: cannot read {self.requirements}: {exc}") from None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.cache_dir / f"{self.digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._report("waiting for another build of this environment")
                await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            self.reused = self._complete()
            if not self.reused:
                await self._build()
        finally:
            os.close(lock)  # releases the flock
        self.seconds = time.perf_counter() - start
        how = "found in the cache" if self.reused else "built"
        self._report(f"ready ({how} in {self.seconds:.1f} s: {self.path})")
        return self.python

    def _complete(self) -> bool:
        return (self.path / MARKER).is_file()

    async def _build(self) -> None:
        for stale in self.cache_dir.glob(f".building-{self.digest}-*"):  # a killed build's
            shutil.rmtree(stale, ignore_errors=True)
        aside = self.cache_dir / f".building-{self.digest}-{os.getpid()}"
        tool = installer()
        try:
            self._report(f"creating a virtual environment with {'uv' if tool == 'uv' else 'venv'}")
            python = str(aside / "bin" / "python")
            if tool == "uv":
                await self._run(["uv", "venv", "-q", "--python", self.base, str(aside)], "uv venv")
            else:
                await self._run([self.base, "-m", "venv", str(aside)], "venv")
            args = self._install_args(aside)
            self._report(f"installing {self._describe()} with {tool}")
            if tool == "uv":
                await self._run(
                    ["uv", "pip", "install", "--python", python, *args], "uv pip install"
                )
            else:
                pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
                await self._run([*pip, *args], "pip install")
            self._report("checking that numpy imports")
            await self._run([python, "-c", "import numpy"], "import numpy")
            (aside / MARKER).write_text(json.dumps({"requirements": self._lines()}))
            if self.path.exists():  # an unmarked leftover (a build that died mid-rename)
                shutil.rmtree(self.path)
            aside.rename(self.path)
        except BaseException:
            shutil.rmtree(aside, ignore_errors=True)
            raise

    def _install_args(self, aside: Path) -> list[str]:
        """Requirement arguments, with numpy added when none names it (the worker needs it)."""
        if isinstance(self.requirements, str):
            text = Path(self.requirements).read_text()
            args = ["-r", str(Path(self.requirements).resolve())]
        else:
            text = "\n".join(self.requirements)
            args = list(self.requirements)
        named = {_name(line) for line in text.splitlines()}
        return args if "numpy" in named else [*args, "numpy"]

    def _describe(self) -> str:
        if isinstance(self.requirements, str):
            return self.requirements
        return f"{len(self.requirements)} requirement(s): {' '.join(self.requirements)}"

    async def _run(self, command: list[str], what: str) -> str:
        """Run a step; BuildFailed with its last lines of output if it fails."""
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise BuildFailed(f"{what}: cannot run {command[0]}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, _ = await process.communicate()
        except BaseException as exc:  # timed out, or cancelled (a reload, a shutdown)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
            if isinstance(exc, TimeoutError):
                raise BuildFailed(f"{what}: took more than {self.timeout_s:g} s") from None
            raise
        text = out.decode(errors="replace")
        if process.returncode:
            tail = "\n".join(text.rstrip().splitlines()[-TAIL_LINES:])
            raise BuildFailed(f"{what} exited with code {process.returncode}:\n{tail}")
        return text
