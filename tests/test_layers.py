"""The package's import contract: each layer imports only the layers below it, the parts
of one layer stay independent of each other, and no modules import each other.

Every import counts, at module level, inside functions or under TYPE_CHECKING: a cycle
that only type checkers see is still two modules that cannot be read apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# High to low. A module may import its own part (the first matching prefix) and any part
# of a lower layer; never a higher layer, nor another part of its own layer.
LAYERS: list[list[str]] = [
    ["coalesce.cli"],
    ["coalesce.server", "coalesce.workers"],
    ["coalesce.ops", "coalesce.pipelines"],
    ["coalesce.frontends", "coalesce.adapters", "coalesce.example_model"],
    ["coalesce.codecs"],
    ["coalesce.core", "coalesce.http2"],
    ["coalesce.telemetry"],
    ["coalesce.tls", "coalesce.config_doc"],
    ["coalesce.config", "coalesce.errors", "coalesce.version"],
]
# Inside the front ends, KServe and TF Serving do not import each other either.
SUBPARTS = ["coalesce.frontends.kserve", "coalesce.frontends.tfserving"]
# Run as a script under another interpreter: it must not import Coalesce at all.
STANDALONE = ["coalesce.adapters.python_worker"]


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for the coalesce package as setuptools maps it."""
    modules: dict[str, Path] = {}
    for base, prefix in ((root / "proxy", "coalesce"), (root / "adapters", "coalesce.adapters")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (a package counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # a name is a submodule, or else an attribute of `base`
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from x import attr` -> x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def _part(module: str) -> tuple[int, str] | None:
    for level, parts in enumerate(LAYERS):
        for part in parts:
            if module == part or module.startswith(part + "."):
                return level, part
    return None


def _within(module: str, prefixes: list[str]) -> str | None:
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        if module == "coalesce":  # the public surface re-exports from below
            continue
        here = _part(module)
        if here is None:
            problems.append(f"{module} is in no layer (add it to LAYERS)")
            continue
        for target in sorted(targets):
            if target == "coalesce":
                problems.append(f"{module} imports the public surface `coalesce`")
                continue
            there = _part(target)
            if there is None:
                continue  # reported as a module of its own
            if there[0] < here[0]:
                problems.append(f"{module} ({here[1]}) imports {target}, a higher layer")
            elif there[0] == here[0] and there[1] != here[1]:
                problems.append(f"{module} imports {target}: parts of one layer are independent")
            a, b = _within(module, SUBPARTS), _within(target, SUBPARTS)
            if a and b and a != b:
                problems.append(f"{module} imports {target}: the front ends are independent")
        if _within(module, STANDALONE) and targets:
            problems.append(f"{module} runs standalone but imports {sorted(targets)}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_each_layer_imports_only_the_layers_below_it():
    assert layer_violations(import_graph()) == []


def test_no_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_every_subpackage_says_what_it_may_import():
    for name, path in package_modules().items():
        if path.name == "__init__.py" and name.count(".") == 1 and name != "coalesce":
            assert "May import" in (ast.get_docstring(ast.parse(path.read_text())) or ""), name


# The checks themselves, on graphs that break each rule.


def test_the_contract_catches_the_core_importing_a_front_end():
    graph = {"coalesce.core.router": {"coalesce.frontends.kserve.grpc"}}
    assert layer_violations(graph) == [
        "coalesce.core.router (coalesce.core) imports coalesce.frontends.kserve.grpc, "
        "a higher layer"
    ]


def test_the_contract_catches_http2_importing_kserve():
    graph = {"coalesce.http2.server": {"coalesce.codecs.kserve", "coalesce.core.request"}}
    problems = layer_violations(graph)
    assert problems == [
        "coalesce.http2.server (coalesce.http2) imports coalesce.codecs.kserve, a higher layer",
        "coalesce.http2.server imports coalesce.core.request: parts of one layer are independent",
    ]


def test_the_contract_catches_front_ends_importing_each_other_and_a_standalone_import():
    graph = {
        "coalesce.frontends.tfserving.rest": {"coalesce.frontends.kserve.rest"},
        "coalesce.adapters.python_worker": {"coalesce.errors"},
        "coalesce.stray": set(),
    }
    assert layer_violations(graph) == [
        "coalesce.adapters.python_worker runs standalone but imports ['coalesce.errors']",
        "coalesce.frontends.tfserving.rest imports coalesce.frontends.kserve.rest: "
        "the front ends are independent",
        "coalesce.stray is in no layer (add it to LAYERS)",
    ]


def test_the_contract_catches_two_modules_importing_each_other(tmp_path):
    package = tmp_path / "proxy" / "frontends"
    package.mkdir(parents=True)
    (tmp_path / "adapters").mkdir()
    (package / "__init__.py").write_text("")
    (package / "grpc.py").write_text("from .stream import Session\n")
    (package / "stream.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import grpc\n"
    )
    graph = import_graph(tmp_path)
    assert graph["coalesce.frontends.stream"] == {"coalesce.frontends.grpc"}
    assert cycles(graph) == [["coalesce.frontends.grpc", "coalesce.frontends.stream"]]


def test_the_public_surface_is_what_model_and_adapter_authors_import():
    import coalesce

    assert sorted(coalesce.__all__) == [
        "Adapter",
        "CoalesceError",
        "Config",
        "ConfigError",
        "InferRequest",
        "ModelInfo",
        "TensorSpec",
        "Tensors",
        "__version__",
    ]
    from coalesce.core.adapter import Adapter
    from coalesce.core.request import Tensors

    assert coalesce.Adapter is Adapter and coalesce.Tensors is Tensors
