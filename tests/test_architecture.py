"""The architecture as docs/architecture.md draws it: which package may import which, no import
cycles, and a CPU ingress that never loads torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "serve_app"

# Package (or top-level module) -> the others it may import; its own modules always.
# Upward is everything not listed: the shared layer imports nothing of ours, the engine contract
# only the shared layer, the ingress never the model side, and only `app` knows both deployments.
MAY_IMPORT: dict[str, set[str]] = {
    "common": set(),
    "engine": {"common"},
    "pipeline": {"common", "engine"},
    "replica": {"common", "engine"},
    "ingress": {"common"},
    "app": {"common", "engine", "ingress", "replica", "pipeline"},
    "client": set(),  # the CLI: a plain HTTP client
    "launch": {"common"},  # `make run`'s launcher: config and API key settings only
}
# Third-party frameworks that stay out of the shared layer: both deployments, the launcher and the
# bench scripts import it, and it must not decide which web framework or cluster they run on.
COMMON_MUST_NOT_IMPORT = {"starlette", "fastapi", "ray", "torch"}
# What runs in the CPU ingress (and in Serve's controller, which imports the builder).
TORCH_FREE = ["common", "engine", "ingress", "replica", "app", "client", "launch"]
HEAVY = ["torch", "diffusers", "transformers", "accelerate", "torchvision", "torchao", "peft"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every serve_app module `path` imports, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from serve_app.ingress import png` imports the module serve_app.ingress.png.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        yield from (n for n in names if n.split(".")[0] == "serve_app")


def _third_party(path: Path) -> set[str]:
    """The top-level names of every absolute import in `path` (module level or in functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: set(_imports(path, modules)) for name, path in modules.items()}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_package_has_a_declared_place() -> None:
    packages = {_package(m) for m in _modules()} - {""}
    assert packages == set(MAY_IMPORT), "declare new packages in MAY_IMPORT"


def test_nothing_imports_upward() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _package(target) not in {_package(module), *MAY_IMPORT[_package(module)]}
    ]
    assert wrong == []


def test_common_imports_no_web_framework_no_ray_no_torch() -> None:
    wrong = {
        name: sorted(_third_party(path) & COMMON_MUST_NOT_IMPORT)
        for name, path in _modules().items()
        if _package(name) == "common"
    }
    assert {name: found for name, found in wrong.items() if found} == {}
    assert len(wrong) > 5  # the walk found the package


def test_the_import_graph_has_no_cycles() -> None:
    graph = _graph()
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_see_real_imports() -> None:
    graph = _graph()
    assert "serve_app.common.errors" in graph["serve_app.ingress.middleware"]
    assert "serve_app.ingress.png" in graph["serve_app.ingress.imaging"]
    assert "serve_app.pipeline.loader" in graph["serve_app.app"]  # imported inside a function


def test_the_ingress_side_never_loads_torch_or_diffusers() -> None:
    modules = [
        m
        for m in _modules()
        if (_package(m) in TORCH_FREE or m == "serve_app") and not m.endswith(".__main__")
    ]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert len(modules) > 20  # the walk found the packages
