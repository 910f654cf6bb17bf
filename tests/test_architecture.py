"""The architecture as docs/architecture.md draws it: which package may import which, no import
cycles, and a CPU ingress that never loads torch."""

from __future__ import annotations

import ast
import functools
import json
import re
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


# Inside pipeline/: its sub-packages (and top modules) from the top down; each may import only
# those below it, never one above or beside a higher one. The tree reads as the path of a model:
# the engine over several ranks loads; loading builds a runner from placed, sped-up modules.
PIPELINE_LAYERS: list[set[str]] = [
    {"parallel_engine"},  # the engine over several ranks: drives loading in each rank
    {"loading"},  # config -> loaded, placed, sped-up pipeline -> runner (sources, hub, LoRAs)
    {"running"},  # edits on a loaded pipeline (runner, inpaint, previews, schedulers, variants)
    {"random_weights"},  # the tiny model and the full-size synthetic one (built, then placed)
    {"placement"},  # which device holds what (planner, measure, dispatch)
    {"parallel"},  # ranks: plan, process group, sequence-parallel attention and transformer
    {"speed"},  # speed switches and kernels on the loaded transformer
]


def _pipeline_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "pipeline" else None


def test_every_pipeline_part_has_a_layer() -> None:
    parts = {_pipeline_part(m) for m in _modules()} - {None}
    assert parts == set().union(*PIPELINE_LAYERS), "place new pipeline parts in PIPELINE_LAYERS"


def test_pipeline_parts_import_only_downward() -> None:
    level = {part: i for i, layer in enumerate(PIPELINE_LAYERS) for part in layer}
    graph = _graph()
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if (part := _pipeline_part(module)) is not None
        for target in targets
        if (other := _pipeline_part(target)) is not None
        and other != part
        and level[other] <= level[part]
    ]
    assert wrong == []
    # The check sees real imports across the layers (it would pass vacuously otherwise).
    assert "serve_app.pipeline.running.runner" in graph["serve_app.pipeline.loading.loader"]


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
    assert (
        "serve_app.pipeline.loading.loader" in graph["serve_app.app"]
    )  # imported inside a function


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


# docs/architecture.md stays true: every path it names exists, every `module.name` it cites is
# defined there, and every name in backticks in its "What each package owns" table is a module or
# a name of that package. (Name a module in backticks or as a path to have it checked.)
ARCHITECTURE_MD = ROOT.parent / "docs" / "architecture.md"
_PATH = re.compile(r"(?<![\w/.:-])(\.?[A-Za-z_][\w.-]*(?:/[\w.-]+)*/?)(?![\w/])")
_FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".txt", ".js", ".mjs", ".toml")
_TOP_FOLDERS = {"serve_app", "tests", "bench", "deploy", "docs", "examples", *MAY_IMPORT}
_DOTTED = re.compile(r"(?<![\w./])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\.([A-Za-z_]\w*)\b")


def _repo_paths() -> set[str]:
    """Every tracked file of the repository and every folder above one ("a/b/" for folders)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT.parent, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    paths = set(out)
    for file in out:
        parts = file.split("/")
        paths.update("/".join(parts[:i]) + "/" for i in range(1, len(parts)))
    return paths


def _is_path(token: str) -> bool:
    """A file name, a folder (trailing slash) or a slashed name under one of our folders (not
    prose such as "png/jpeg/webp")."""
    if "://" in token or token.startswith("/"):
        return False
    first = token.split("/")[0]
    return token.endswith(("/", *_FILE_SUFFIXES)) or ("/" in token and first in _TOP_FOLDERS)


def _resolves(token: str, context: str, paths: set[str]) -> bool:
    """`token` names a file or folder under `context` ("" for the root) or under serve_app/."""
    # A folder with or without its slash; a data file may be named without its suffix.
    names = {token, token.rstrip("/") + "/", *(token + suffix for suffix in _FILE_SUFFIXES)}
    for base in {context, "", "serve_app/"}:
        for name in names:
            if base + name in paths:
                return True
            if any(p.startswith(base) and p.endswith("/" + name) for p in paths):
                return True
    return False


def _doc_paths(text: str) -> Iterator[tuple[str, str]]:
    """(path token, the folder it is relative to) for every path the document names. In the
    layout (its first code block) an entry's description may name paths relative to the entry:
    `serve_app/`'s entries under serve_app/, a top-level entry's under its top folder."""
    blocks, context = 0, ""
    for line in text.splitlines():
        if line.startswith("```"):
            blocks += 1
            continue
        in_layout = blocks == 1
        if in_layout and re.match(r"^\S", line):
            first = line.split()[0]
            context = first.split("/")[0] + "/" if "/" in first else ""
        elif in_layout and re.match(r"^  \S", line):
            name = line.split()[0]
            context = "serve_app/" + (name if name.endswith("/") else "")
        elif not in_layout:
            context = ""
        for token in _PATH.findall(line):
            token = token.rstrip(".,;:")
            if _is_path(token):
                yield token, context


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _defined_names(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("serve_app"):
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _modules_named(dotted: str, modules: dict[str, Path]) -> list[Path]:
    """The modules whose dotted name is `dotted` or ends with it (`routes`, `parallel.plan`)."""
    return [p for m, p in modules.items() if m == dotted or m.endswith("." + dotted)]


def _owns_rows(text: str) -> dict[str, str]:
    """The "What each package owns" table: package (e.g. "pipeline") -> its row's text."""
    section = text.split("## What each package owns", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| `([\w.]+?)(?:/|\.py)?` \|(.*)$", line)
        if match:
            rows[match[1]] = match[2]
    return rows


def _missing_paths(text: str) -> list[str]:
    paths = _repo_paths()
    return sorted({t for t, ctx in _doc_paths(text) if not _resolves(t, ctx, paths)})


def _undefined_names(text: str) -> list[str]:
    modules = _modules()
    wrong = []
    for module, name in set(_DOTTED.findall(text)):
        if "." + name in _FILE_SUFFIXES:
            continue  # a file name, checked as a path
        found = _modules_named(module, modules)
        if (
            found
            and name not in _defined_names(found)
            and not _modules_named(f"{module}.{name}", modules)
        ):
            wrong.append(f"{module}.{name}")
    for package, row in _owns_rows(text).items():
        files = [
            p for m, p in modules.items() if _package(m) == package or m == f"serve_app.{package}"
        ]
        module_names = {p.stem for p in files} | {p.parent.name for p in files}
        defined = _defined_names(files) | module_names | set(MAY_IMPORT)
        wrong.extend(
            f"{package}: {name}"
            for name in re.findall(r"`([A-Za-z_]\w*)/?`", row)
            if name not in defined
        )
    return sorted(wrong)


def test_architecture_md_names_only_paths_that_exist() -> None:
    text = ARCHITECTURE_MD.read_text()
    assert _missing_paths(text) == []
    assert len(list(_doc_paths(text))) > 30  # the walk found the paths


def test_architecture_md_cites_only_names_that_are_defined() -> None:
    text = ARCHITECTURE_MD.read_text()
    assert _undefined_names(text) == []
    assert len(_owns_rows(text)) >= 6  # the table was found


def test_the_doc_checks_catch_a_stale_name() -> None:
    text = ARCHITECTURE_MD.read_text()
    stale = (
        text.replace("`pipeline/running/runner.py`", "`pipeline/runner.py`", 1)
        .replace("routes.create_app", "routes.make_app", 1)
        .replace("`loader`", "`loaders`", 1)
        .replace("  engine.py  ", "  engines.py ", 1)
    )
    assert _missing_paths(stale) == ["engines.py", "pipeline/runner.py"]
    assert _undefined_names(stale) == ["pipeline: loaders", "routes.make_app"]
