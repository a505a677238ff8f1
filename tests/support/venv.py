"""A cached virtualenv whose numpy is 1.x: a worker interpreter unlike the sidecar's (numpy 2).

Built once under ``${COALESCE_CACHE:-~/.cache/coalesce}/numpy1-venv`` with a plain
``python -m venv`` (no system site-packages, so neither Coalesce nor numpy 2 is
visible from it), under a file lock so parallel test runs do not race.
"""

from __future__ import annotations

import fcntl
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.triton import cache_dir

NUMPY = "numpy==1.26.4"
_MARKER = f"{NUMPY} {platform.python_version()} {sys.base_prefix}\n"


def numpy1_python() -> Path:
    """The venv's interpreter, creating the venv on first use."""
    root = cache_dir() / "numpy1-venv"
    python = root / "bin" / "python"
    marker = root / ".complete"
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / "numpy1-venv.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.is_file() and marker.read_text() == _MARKER):
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--only-binary=:all:", NUMPY],
                check=True,
            )
            marker.write_text(_MARKER)
    return python
