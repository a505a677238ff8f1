"""The Dockerfile and the Kubernetes manifests agree with the CLI and the config defaults.

No container runtime runs here: the Dockerfile is parsed and its invariants checked, the
build stage's context is built into a wheel as the image build does, and every manifest
under config/kubernetes/ is parsed, with the Coalesce configs it embeds validated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from coalesce import config as config_module
from coalesce.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "config" / "kubernetes").glob("*.yaml"))
DEFAULTS = config_module.Config.model_fields
CONFIG_PATH = "/etc/coalesce/routes.yaml"  # where the image and the pods keep the config


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


def cli(*argv: str) -> argparse.Namespace:
    """`coalesce *argv` as the real parser reads it; an unknown command or flag fails."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            return build_parser().parse_args(list(argv))
        except SystemExit:
            pytest.fail(f"`coalesce {shlex.join(argv)}` is refused: {errors.getvalue()}")


# --- Dockerfile -------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: continuations joined, comments dropped."""
    result, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def final(keyword: str) -> str:
    """The last `keyword` instruction of the runtime stage."""
    found = [rest for k, rest in stages()[-1] if k == keyword]
    assert found, f"the runtime stage has no {keyword}"
    return found[-1]


def command(rest: str) -> list[str]:
    """An instruction's command, exec (JSON) or shell form."""
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def options(rest: str) -> tuple[dict[str, str], str]:
    """`--name=value` options in front of an instruction's arguments, and the rest."""
    found = {}
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        found[name] = value
        rest = rest.strip()
    return found, rest


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_the_image_is_built_in_stages_and_runs_only_the_wheel():
    build, *_, runtime = stages()
    assert len(stages()) >= 2
    stage_name = build[0][1].split()[-1]
    assert build[0][1].split()[-2].upper() == "AS"
    assert any(k == "RUN" and "pip wheel" in rest for k, rest in build)
    runtime_text = "\n".join(rest for _, rest in runtime)
    assert f"from={stage_name}" in runtime_text  # COPY --from or RUN --mount from the build
    assert "pip install" in runtime_text and "--no-index" in runtime_text  # only the wheels
    assert "grpcio-tools" not in runtime_text and "apt-get" not in runtime_text
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base.group(1))
    assert runtime[0][1].split()[0] == "${PYTHON_IMAGE}"


def test_the_image_runs_as_a_numeric_non_root_user():
    user = final("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: Kubernetes' runAsNonRoot can check it


def test_the_image_exposes_the_default_grpc_and_admin_ports():
    exposed = {int(p.split("/")[0]) for p in final("EXPOSE").split()}
    assert exposed == {port(DEFAULTS["listen"].default), port(DEFAULTS["admin"].default)}


def test_the_entrypoint_serves_the_mounted_config_on_the_exposed_ports():
    assert command(final("ENTRYPOINT")) == ["coalesce", "serve"]
    args = cli("serve", *command(final("CMD")))
    assert args.config == CONFIG_PATH
    assert f"> {CONFIG_PATH}" in "\n".join(rest for _, rest in stages()[-1])  # a default
    exposed = {int(p) for p in final("EXPOSE").split()}
    assert {port(args.listen), port(args.admin)} <= exposed
    assert args.listen.startswith("0.0.0.0:")  # reachable from outside the container


def test_the_healthcheck_runs_coalesce_health_on_the_grpc_port():
    flags, rest = options(final("HEALTHCHECK"))
    assert rest.startswith("CMD ")
    argv = command(rest.removeprefix("CMD "))
    assert argv[:2] == ["coalesce", "health"]
    args = cli(*argv[1:])
    serve = cli("serve", *command(final("CMD")))
    assert port(args.address) == port(serve.listen) and args.service == ""
    assert args.timeout < seconds(flags["timeout"])  # it answers before Docker gives up


def context_files() -> list[Path]:
    """The files that the build stage copies, less those .dockerignore leaves out."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        source
        for keyword, rest in stages()[0]
        if keyword == "COPY"
        for source in command(options(rest)[1])[:-1]
    ]
    files = []
    for source in sources:
        path = ROOT / source
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [p for p in candidates if p.is_file() and not ignored(p, patterns)]
    return files


def ignored(path: Path, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides."""
    relative = path.relative_to(ROOT).as_posix()
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def _regex(pattern: str) -> re.Pattern[str]:
    out = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    return re.compile(out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else():
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line]
    assert not ignored(ROOT / "setup.py", patterns)
    assert not ignored(ROOT / "proxy" / "cli.py", patterns)
    assert ignored(ROOT / "tests" / "test_deploy.py", patterns)
    assert ignored(ROOT / "proxy" / "__pycache__" / "cli.cpython-311.pyc", patterns)
    names = {p.relative_to(ROOT).as_posix() for p in context_files()}
    assert {"pyproject.toml", "setup.py", "README.md", "proxy/cli.py"} <= names
    assert any(n.startswith("protos/") for n in names) and "proxy/codecs/_protos.binpb" not in names


def test_the_build_context_builds_a_wheel_with_the_compiled_protos(tmp_path):
    source = tmp_path / "src"
    for path in context_files():
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run(
        [*build, "--wheel-dir", str(tmp_path / "wheels"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("coalesce-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert {
        "coalesce/codecs/_protos.binpb",
        "coalesce/cli.py",
        "coalesce/ops/health_check.py",
        "coalesce/ops/dashboard.html",
    } <= names
    assert "coalesce/adapters/triton.py" in names
    assert "coalesce = coalesce.cli:main" in scripts


# --- Kubernetes manifests -----------------------------------------------------------------


def documents() -> list[dict]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def pod_specs() -> list[tuple[dict, dict]]:
    """(the object, its pod spec) for every Pod and workload template."""
    found = []
    for doc in documents():
        if doc["kind"] == "Pod":
            found.append((doc, doc["spec"]))
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            found.append((doc, doc["spec"]["template"]["spec"]))
    return found


def coalesce_pods() -> list[tuple[dict, dict, dict]]:
    """(the object, its pod spec, the Coalesce container) for every pod running Coalesce."""
    return [
        (doc, spec, container)
        for doc, spec in pod_specs()
        for container in spec["containers"]
        if container["image"].split(":")[0].endswith("coalesce")
    ]


def namespace(doc: dict) -> str:
    return doc["metadata"].get("namespace", "default")


def find(kind: str, name: str, ns: str) -> dict:
    for doc in documents():
        if (doc["kind"], doc["metadata"]["name"], namespace(doc)) == (kind, name, ns):
            return doc
    pytest.fail(f"no {kind} {ns}/{name} in config/kubernetes/")


def mounted_config(doc: dict, spec: dict, container: dict, path: str) -> dict:
    """The YAML document at `path` inside `container`, from the ConfigMap mounted there."""
    for mount in container.get("volumeMounts", []):
        key = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
        if key != path:
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            config_map = find("ConfigMap", volume["configMap"]["name"], namespace(doc))
            return yaml.safe_load(config_map["data"][key])
    pytest.fail(f"nothing is mounted at {path} in container {container['name']}")


def served(doc: dict, spec: dict, container: dict) -> tuple[argparse.Namespace, Any]:
    """The container's `coalesce serve` arguments and the config it serves."""
    assert container.get("command", ["coalesce", "serve"]) == ["coalesce", "serve"]
    args = cli("serve", *container.get("args", []))
    assert args.config == CONFIG_PATH, "the path the image keeps its config at"
    return args, config_module.parse(mounted_config(doc, spec, container, args.config))


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def pre_stop_seconds(container: dict) -> float:
    """How long a preStop hook holds the container: `sleep N` or the native sleep action."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return hook["sleep"]["seconds"]
    argv = hook["exec"]["command"]
    assert argv[0] == "sleep", f"{container['name']}: a preStop this test cannot time"
    return float(argv[1])


def test_manifests_parse_and_every_object_is_named():
    assert MANIFESTS
    kinds = {doc["kind"] for doc in documents()}
    assert {"ConfigMap", "Deployment", "Service"} <= kinds
    for doc in documents():
        assert doc["apiVersion"] and doc["metadata"]["name"]


def config_maps() -> list[tuple[str, str]]:
    return [
        (f"{namespace(doc)}/{doc['metadata']['name']}/{key}", text)
        for doc in documents()
        if doc["kind"] == "ConfigMap"
        for key, text in doc["data"].items()
        if key.endswith((".yaml", ".yml"))
    ]


@pytest.mark.parametrize("text", [t for _, t in config_maps()], ids=[n for n, _ in config_maps()])
def test_every_embedded_coalesce_config_is_valid(text):
    config_module.parse(yaml.safe_load(text))


def test_coalesce_listens_where_its_ports_and_probes_point():
    assert coalesce_pods()
    for doc, spec, container in coalesce_pods():
        args, config = served(doc, spec, container)
        listen, admin = args.listen or config.listen, args.admin or config.admin
        assert listen.startswith("0.0.0.0:"), "the kubelet probes the pod IP"
        assert ports(container) == {"grpc": port(listen), "admin": port(admin)}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port(listen), "service": ""}, probe


def test_the_default_ports_are_the_ones_deployed():
    for _, _, container in coalesce_pods():
        assert ports(container) == {
            "grpc": port(DEFAULTS["listen"].default),
            "admin": port(DEFAULTS["admin"].default),
        }


def test_termination_grace_covers_the_drain():
    for doc, spec, container in coalesce_pods():
        _, config = served(doc, spec, container)
        drain = pre_stop_seconds(container) + config.grace_period_s
        grace = spec["terminationGracePeriodSeconds"]
        assert pre_stop_seconds(container) > 0, "endpoints need a moment to drop the pod"
        assert grace > drain
        for other in spec["containers"]:
            if other is not container:  # the backend keeps serving while Coalesce drains
                assert drain <= pre_stop_seconds(other) < grace, other["name"]


def test_sidecar_backends_point_at_a_container_of_the_same_pod():
    local = ("127.0.0.1", "localhost", "[::1]")
    checked = 0
    for doc, spec, container in coalesce_pods():
        _, config = served(doc, spec, container)
        others = {p for c in spec["containers"] if c is not container for p in ports(c).values()}
        for backend in config.backends.values():
            target = getattr(backend, "target", "")
            if target.rpartition(":")[0] in local:
                assert port(target) in others, target
                checked += 1
    assert checked


def test_dns_targets_name_a_headless_service_of_several_replicas():
    checked = 0
    for doc, spec, container in coalesce_pods():
        _, config = served(doc, spec, container)
        for backend in config.backends.values():
            match = re.fullmatch(
                r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)",
                getattr(backend, "target", ""),
            )
            if match:
                check_headless(*match.groups())
                checked += 1
    assert checked


def check_headless(name: str, ns: str, service_port: str) -> None:
    service = find("Service", name, ns)["spec"]
    assert service["clusterIP"] == "None"
    (exposed,) = [p for p in service["ports"] if p["port"] == int(service_port)]
    workloads = [
        (doc, spec)
        for doc, spec in pod_specs()
        if namespace(doc) == ns
        and service["selector"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(workloads) == 1
    doc, spec = workloads[0]
    assert doc["spec"]["replicas"] > 1
    target = exposed.get("targetPort", exposed["port"])
    container_ports = {k: v for c in spec["containers"] for k, v in ports(c).items()}
    assert container_ports.get(target, target) == int(service_port)


def test_services_reach_named_container_ports():
    for doc in documents():
        if doc["kind"] != "Service":
            continue
        pods = [
            spec
            for workload, spec in pod_specs()
            if namespace(workload) == namespace(doc)
            and doc["spec"]["selector"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, doc["metadata"]["name"]
        names = {n for spec in pods for c in spec["containers"] for n in ports(c)}
        for service_port in doc["spec"]["ports"]:
            target = service_port.get("targetPort")
            assert not isinstance(target, str) or target in names, target
