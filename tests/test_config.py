"""The routing config and the `coalesce check` / `coalesce serve` commands on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from coalesce import config

ROOT = Path(__file__).resolve().parents[1]


def is_kubernetes_manifest(path: Path) -> bool:
    """A manifest of config/kubernetes/; tests/test_deploy.py checks the configs it embeds."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return bool(documents) and all(isinstance(d, dict) and "apiVersion" in d for d in documents)


EXAMPLES = sorted(p for p in (ROOT / "config").glob("**/*.yaml") if not is_kubernetes_manifest(p))


def problems(data) -> list[str]:
    with pytest.raises(config.ConfigError) as error:
        config.parse(data)
    return error.value.problems


def minimal(**backend) -> dict:
    return {
        "backends": {"m": {"type": "local", "model": "a.b:c", **backend}},
        "routes": [{"model": "m", "backend": "m"}],
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(path):
    config.load(path)


def test_defaults_are_filled_in():
    parsed = config.parse(minimal())
    batching = parsed.backends["m"].batching
    assert (
        batching.max_batch_size,
        batching.max_delay_ms,
        batching.max_in_flight,
        batching.max_queue,
    ) == (64, 0, 1, 4096)
    assert parsed.listen == "127.0.0.1:8500" and parsed.grace_period_s == 10


def test_the_default_config_serves_the_bundled_model():
    parsed = config.load(None)
    assert parsed.backends["example"].model == "coalesce.example_model:load"


def test_every_problem_is_reported_with_its_key_path():
    data = minimal(batching={"max_batch_size": 0, "max_queue": -1, "colour": "red"})
    data["routes"].append({"model": "x"})
    data["listen"] = "nowhere"
    data["backends"]["t"] = {"type": "triton", "model": "r"}
    assert sorted(problems(data)) == sorted(
        [
            "backends.m.batching.max_batch_size: must be >= 1",
            "backends.m.batching.max_queue: must be >= 1",
            "backends.m.batching.colour: unknown key",
            "backends.t.target: required",
            "routes.1.backend: required",
            "listen: must be host:port, got 'nowhere'",
        ]
    )


def test_routes_must_name_known_backends_once():
    data = minimal()
    data["routes"] += [{"model": "m", "backend": "m"}, {"model": "z", "backend": "ghost"}]
    assert problems(data) == [
        "routes.1.model: 'm' is routed twice",
        "routes.2.backend: unknown backend 'ghost'",
    ]


def test_custom_adapter_types_need_an_import_path():
    assert problems({"backends": {"c": {"type": "mything"}}, "routes": []}) == [
        "backends.c.type: must be 'module:attribute', got 'mything'"
    ]
    parsed = config.parse(
        {
            "backends": {"c": {"type": "pkg.mod:Adapter", "options": {"k": 1}}},
            "routes": [{"model": "c", "backend": "c"}],
        }
    )
    assert parsed.backends["c"].options == {"k": 1}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coalesce.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_check_command_exit_status_and_messages(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(minimal(model="tests.models:affine")))
    result = run("check", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(batching={"max_batch_size": 0})))
    result = run("check", str(bad))
    assert result.returncode == 1
    assert f"{bad}: backends.m.batching.max_batch_size: must be >= 1" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: [\n")
    assert run("check", str(broken)).returncode == 1
    assert "cannot read" in run("check", str(tmp_path / "missing.yaml")).stderr


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("tests.no_such_module:load", "No module named 'tests.no_such_module'"),
        ("tests.models:no_such_factory", "has no attribute 'no_such_factory'"),
    ],
)
def test_check_imports_each_model_without_calling_it(tmp_path, model, says):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(minimal(model=model)))
    result = run("check", str(path))
    assert result.returncode == 1
    assert f"{path}: backends.m.model: cannot import '{model}'" in result.stderr
    assert says in result.stderr


def test_tracing_without_opentelemetry_says_what_to_install(tmp_path):
    """A stand-in for a missing install: an empty `opentelemetry` package first on the path."""
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text("")
    path = tmp_path / "traced.yaml"
    path.write_text(yaml.safe_dump({**minimal(), "tracing": {"exporter": "console"}}))
    result = subprocess.run(
        [sys.executable, "-m", "coalesce.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )
    assert result.returncode == 1
    assert "tracing: needs OpenTelemetry" in result.stderr
    assert "pip install 'coalesce[tracing]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(batching={"max_in_flight": 0})))
    result = run("serve", "--config", str(bad))
    assert result.returncode == 1
    assert "backends.m.batching.max_in_flight: must be >= 1" in result.stderr


def test_serve_reports_a_model_that_cannot_load(tmp_path):
    path = tmp_path / "broken-model.yaml"
    path.write_text(yaml.safe_dump(minimal(model="tests.no_such_module:load")))
    result = run("serve", "--config", str(path))
    assert result.returncode == 1
    assert "backend 'm' cannot load: ImportError" in result.stderr
    assert "No module named 'tests.no_such_module'" in result.stderr


def test_the_readme_config_reference_is_current():
    from coalesce import config_doc

    readme = (ROOT / "README.md").read_text()
    assert config_doc.with_reference(readme) == readme, (
        "README's config reference is stale: python -m coalesce.config_doc --write README.md"
    )
    for model in ("Config", "Batching", "Route", "TritonBackend", "LocalBackend"):
        assert f"#### {model}\n" in readme


@pytest.mark.parametrize(
    "fields",
    [{"targets": ["127.0.0.1:1", "127.0.0.1:2"]}, {"target": "dns:///triton:8001"}],
    ids=["replicas", "dns"],
)
def test_native_transport_is_one_address(fields):
    backend = {"type": "triton", "target": "127.0.0.1:8001", "model": "m", "transport": "native"}
    if "targets" in fields:
        del backend["target"]
    data = {"backends": {"t": {**backend, **fields}}, "routes": [{"model": "t", "backend": "t"}]}
    assert any(
        "transport native takes one host:port" in p and p.startswith("backends.t")
        for p in problems(data)
    )


@pytest.mark.parametrize(
    ("fields", "native"),
    [
        ({"target": "127.0.0.1:8001"}, True),
        ({"target": "[::1]:8001", "tls": {}}, True),
        ({"target": "localhost:8001"}, True),
        ({"target": "triton.ml.svc:8001"}, False),  # a name may stand for several replicas
        ({"target": "dns:///triton:8001"}, False),
        ({"targets": ["127.0.0.1:1", "127.0.0.1:2"]}, False),
        ({"target": "triton.ml.svc:8001", "transport": "native"}, True),
        ({"target": "127.0.0.1:8001", "transport": "grpc"}, False),
    ],
)
def test_auto_transport_is_native_for_one_address(fields, native):
    data = {"backends": {"t": {"type": "tfserving", "model": "m", **fields}}, "routes": []}
    assert config.parse(data).backends["t"].native is native
