"""Debian's Chromium, headless, as the dashboard tests' browser."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium(url: str, *args: str, profile: str | None = None) -> str:
    """Run Chromium on `url` with `args` (--dump-dom, --screenshot=...); its stdout."""
    own = profile is None
    profile = profile or tempfile.mkdtemp(prefix="chromium-")
    try:
        return subprocess.run(
            ["chromium", *FLAGS, f"--user-data-dir={profile}", *args, url],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    finally:
        if own:
            shutil.rmtree(profile, ignore_errors=True)


def dump_dom(url: str, budget_ms: int = 3000) -> str:
    """The page's DOM after `budget_ms` of (virtual) time: its scripts have run."""
    return chromium(url, f"--virtual-time-budget={budget_ms}", "--dump-dom")
