"""Managed Python runtimes: `requirements` on a `type: python` backend, built by Coalesce.

Real builds from the package index reachable here (PyPI), with uv (a test extra) and
with venv + pip (uv hidden from PATH), into a fresh cache per test. The model pins
numpy 1.26 while the sidecar runs numpy 2, so an answer proves which environment ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from coalesce import config
from coalesce.adapters.python_runtime import Environment
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from tests.client import inputs
from tests.support.coalesce import ROOT, Process
from tests.test_python_workers import health, python_backend, row, wait_for

NUMPY = "numpy==1.26.4"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The model lives in a `code:` directory of its own, as a team's model would.
MODEL = """
import numpy as np

class Versions:
    def __call__(self, inputs):
        out = np.empty((len(inputs["x"]), 1), dtype=object)
        out[:] = np.__version__.encode()
        return {"version": out, "y": 2 * inputs["x"] + 1}

def load():
    return Versions()
"""
BUILD_S = 600  # a cold pip build of numpy here takes 15-30 s; PyPI may be slow


def code_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "code"
    folder.mkdir(exist_ok=True)
    (folder / "team_model.py").write_text(MODEL)
    return folder


def pinned(tmp_path: Path, requirements=(NUMPY,), **fields) -> dict:
    return {
        "type": "python",
        "model": "team_model:load",
        "code": str(code_dir(tmp_path)),
        "requirements": list(requirements) if not isinstance(requirements, str) else requirements,
        "cache_dir": str(tmp_path / "cache"),
        "processes": 1,
        **fields,
    }


def two_backends(tmp_path: Path, **fields) -> dict:
    """`pinned` with a managed runtime, `plain` beside it on the sidecar's own Python."""
    return {
        "backends": {
            "pinned": pinned(tmp_path, **fields),
            "plain": python_backend("affine", processes=1),
        },
        "routes": [{"model": m, "backend": m} for m in ("pinned", "plain")],
    }


def hide_uv(monkeypatch: pytest.MonkeyPatch) -> None:
    """No uv on the sidecar's PATH: Coalesce falls back to venv + pip."""
    path = os.environ["PATH"].split(os.pathsep)
    keep = [p for p in path if not (Path(p) / "uv").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(keep))


def readyz(proxy: Process) -> dict:
    try:
        with urllib.request.urlopen(f"http://{proxy.admin}/readyz", timeout=5) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:  # 503 while not ready, with the same body
        return json.load(error)


def version_of(proxy: Process, model: str = "pinned") -> str:
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer(model, inputs(x=row(1)), client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * row(1) + 1)
    return result.as_numpy("version")[0, 0].decode()


def unavailable(proxy: Process, model: str = "pinned") -> str:
    with (
        tc.InferenceServerClient(proxy.url) as client,
        pytest.raises(InferenceServerException) as e,
    ):
        client.infer(model, inputs(x=row(1)), client_timeout=30)
    assert e.value.status() == "StatusCode.UNAVAILABLE", e.value
    return e.value.message()


def build_lock(cache: Path, requirements=(NUMPY,)) -> Path:
    """The lock file Coalesce takes to build these requirements on our interpreter."""
    environment = Environment(list(requirements), cache_dir=cache)
    digest = asyncio.run(environment._identify())
    cache.mkdir(parents=True, exist_ok=True)
    return cache / f"{digest}.lock"


@contextlib.contextmanager
def held(lock: Path) -> Iterator[None]:
    with lock.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def environments(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


@pytest.mark.timeout(2 * BUILD_S)
@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_a_pinned_numpy_builds_serves_and_is_reused_from_the_cache_on_restart(
    tmp_path, installer, monkeypatch, coalesce_process
):
    if installer == "pip":
        hide_uv(monkeypatch)
    assert np.__version__.startswith("2."), "the sidecar's own numpy must differ"
    data = two_backends(tmp_path)
    # Hold the environment's build lock, as another sidecar building it would: the
    # backend waits, and the test sees it NOT_SERVING however fast the build is.
    with held(build_lock(tmp_path / "cache")):
        proxy = coalesce_process(data)
        wait_for(lambda: "waiting for another build" in proxy.output())
        assert health(proxy.url, "pinned") == NOT_SERVING
        message = unavailable(proxy)
        assert "building its Python environment (waiting for another build" in message
        assert "building its environment" in readyz(proxy)["status"]["pinned"]
        with tc.InferenceServerClient(proxy.url) as client:  # the other backend serves
            y = client.infer("plain", inputs(x=row(1))).as_numpy("y")
        np.testing.assert_array_equal(y, 2 * row(1) + 1)
        began = time.monotonic()
    wait_for(lambda: health(proxy.url, "pinned") == SERVING, BUILD_S)
    cold = time.monotonic() - began
    assert version_of(proxy) == "1.26.4"
    log = proxy.output()
    assert f"creating a virtual environment with {'uv' if installer == 'uv' else 'venv'}" in log
    assert f"installing 1 requirement(s): {NUMPY} with {installer}" in log
    assert "built in" in log
    (built,) = environments(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(".building-*"))
    assert proxy.terminate() == 0

    began = time.monotonic()
    again = coalesce_process(data)
    wait_for(lambda: health(again.url, "pinned") == SERVING, 60)
    warm = time.monotonic() - began
    assert version_of(again) == "1.26.4"
    assert "found in the cache" in again.output() and "installing" not in again.output()
    assert environments(tmp_path / "cache") == [built]
    print(f"\n{installer}: cold build to SERVING {cold:.1f} s, restart from the cache {warm:.1f} s")


@pytest.mark.timeout(BUILD_S)
def test_a_bad_requirement_fails_that_backend_only_and_a_reload_tries_again(
    tmp_path, coalesce_process
):
    bad = "coalesce-no-such-package-xyzzy==0.0.1"
    proxy = coalesce_process(two_backends(tmp_path, requirements=[bad]))
    wait_for(lambda: "failed to build" in proxy.output(), BUILD_S)
    message = unavailable(proxy)
    assert "Python environment failed to build" in message
    assert bad in message  # the installer's own last lines: which requirement and why
    assert health(proxy.url, "pinned") == NOT_SERVING
    assert health(proxy.url, "plain") == SERVING
    assert readyz(proxy)["status"]["pinned"].startswith("down: ")
    assert not environments(tmp_path / "cache")  # nothing half-built is left to be used
    assert not list((tmp_path / "cache").glob(".building-*"))

    # The same config again: a failed build is retried on reload, not kept.
    request = urllib.request.Request(f"http://{proxy.admin}/reload", method="POST")
    with urllib.request.urlopen(request, timeout=BUILD_S) as answer:
        assert answer.status == 200
    wait_for(lambda: proxy.output().count("failed to build") == 2, BUILD_S)
    assert health(proxy.url, "plain") == SERVING


@pytest.mark.timeout(2 * BUILD_S)
def test_two_concurrent_prepares_build_one_environment(tmp_path):
    """`coalesce prepare` twice at once on one cache (two sidecars' init containers)."""
    path = tmp_path / "routes.yaml"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"{NUMPY}\n")
    data = {
        "backends": {"pinned": pinned(tmp_path, requirements=str(requirements))},
        "routes": [{"model": "pinned", "backend": "pinned"}],
    }
    path.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "coalesce.cli", "prepare", str(path)]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=BUILD_S)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    both = "\n".join(outputs)
    assert both.count("bin/python (built in") == 1, both
    assert both.count("bin/python (in the cache)") == 1, both
    assert "waiting for another build of this environment" in both
    (built,) = environments(tmp_path / "cache")
    done = subprocess.run(
        [str(built / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "1.26.4"

    # A changed requirements file is a changed backend: a reload builds it anew.
    first = config.load(path).backends["pinned"]
    requirements.write_text(f"{NUMPY}\nsix\n")
    assert config.load(path).backends["pinned"] != first


def test_requirements_and_code_are_checked_when_the_config_is_read(tmp_path):
    base = {"type": "python", "model": "a:b"}
    for fields, problem in (
        (
            {"requirements": str(tmp_path / "missing.txt")},
            "backends.m.requirements: no such file",
        ),
        ({"code": str(tmp_path / "nowhere")}, "backends.m.code: no such directory"),
        ({"requirements": ["numpy", " "]}, "an empty requirement"),
    ):
        data = {"backends": {"m": {**base, **fields}}, "routes": [{"model": "m", "backend": "m"}]}
        with pytest.raises(config.ConfigError) as error:
            config.parse(data)
        assert any(problem in p for p in error.value.problems), error.value.problems


def test_the_example_config_builds_and_answers_with_its_pinned_numpy(tmp_path, coalesce_process):
    """config/python_runtime.yaml, served as its comment says (from the repository root)."""
    data = yaml.safe_load((ROOT / "config" / "python_runtime.yaml").read_text())
    for key in ("listen", "admin"):
        data.pop(key)
    data["backends"]["pinned"]["cache_dir"] = str(tmp_path / "cache")
    proxy = coalesce_process(data)
    wait_for(lambda: health(proxy.url, "pinned") == SERVING, BUILD_S)
    with tc.InferenceServerClient(proxy.url) as client:
        result = client.infer("pinned", [_features()])
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert result.as_numpy("numpy_version")[0, 0] == b"1.26.4"


def _features() -> tc.InferInput:
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    return x
