"""The Makefile's test suites: every test file in exactly one, so none falls out of CI.

`make test` and `make test-integration` select tests by pytest markers (`-m`); a file's suite is
chosen by its module-level `pytestmark`. The checks read the Makefile's own expressions and
evaluate them as pytest does, against the markers each test file declares: every file lands in
one suite, a suite marker is never set on a single test (a file is not split), what needs a Ray
cluster or spawns processes stays out of the fast suite, and CI runs both suites.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

from tests.deploy.files import ROOT

MAKEFILE = ROOT / "Makefile"
CI = ROOT / ".ci/run"
TESTS = ROOT / "tests"
SUITES = ("test", "test-integration")  # the Makefile targets that run pytest
SUITE_MARKERS = {"integration", "multiprocess", "network"}


def _make_variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+) :?= (.*)$", text, flags=re.MULTILINE))


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: _expand(variables.get(m[1], m[0]), variables), value)


def suite_expressions(text: str) -> dict[str, str]:
    """Each suite target's `-m` expression, its Make variables expanded."""
    variables = _make_variables(text)
    found = {}
    for target in SUITES:
        recipe = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.MULTILINE)
        assert recipe, f"the Makefile has no recipe for `{target}`"
        marker = re.search(r'-m "([^"]+)"', recipe[1])
        assert marker, f"`make {target}` selects no markers (-m)"
        found[target] = _expand(marker[1], variables)
    return found


def _mark_names(node: ast.AST) -> set[str]:
    """X of every `pytest.mark.X` (called or not) inside `node`."""
    return {
        sub.attr
        for sub in ast.walk(node)
        if isinstance(sub, ast.Attribute)
        and isinstance(sub.value, ast.Attribute)
        and sub.value.attr == "mark"
    }


def file_markers(source: str) -> tuple[set[str], set[str]]:
    """The markers of a test module's `pytestmark`, and the suite markers set anywhere else."""
    tree = ast.parse(source)
    module: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            module |= _mark_names(node)
    elsewhere = _mark_names(tree) - module
    return module, elsewhere & SUITE_MARKERS


def suites_of(markers: set[str], expressions: dict[str, str]) -> list[str]:
    return [
        target
        for target, expr in expressions.items()
        if Expression.compile(expr).evaluate(lambda name, **_: name in markers)
    ]


def _needs(path: Path, source: str) -> str | None:
    """Why a file cannot run in the fast suite, or None."""
    if "integration" in path.relative_to(TESTS).parts:
        return "it starts the Ray Serve app"
    if re.search(
        r"^import torch\.multiprocessing|^from torch import multiprocessing", source, re.M
    ):
        return "it spawns processes"
    return None


def _problems(path: Path, source: str, expressions: dict[str, str]) -> list[str]:
    module, elsewhere = file_markers(source)
    name = path.relative_to(ROOT)
    problems = [f"{name}: set {m} in its module-level pytestmark" for m in sorted(elsewhere)]
    suites = suites_of(module, expressions)
    if len(suites) != 1:
        problems.append(f"{name} is in {len(suites)} suites: {suites}")
    why = _needs(path, source)
    if why and suites == ["test"]:
        problems.append(f"{name} runs in `make test`, but {why}: mark it integration/multiprocess")
    return problems


TEST_FILES = sorted(TESTS.rglob("test_*.py"))


def test_every_test_file_is_in_exactly_one_suite() -> None:
    expressions = suite_expressions(MAKEFILE.read_text())
    problems = [p for path in TEST_FILES for p in _problems(path, path.read_text(), expressions)]
    assert problems == []
    assert len(TEST_FILES) > 50  # the walk found the tests


def test_each_suite_has_files() -> None:
    expressions = suite_expressions(MAKEFILE.read_text())
    counts = {target: 0 for target in SUITES}
    for path in TEST_FILES:
        for target in suites_of(file_markers(path.read_text())[0], expressions):
            counts[target] += 1
    assert all(n > 3 for n in counts.values()), counts


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        ("tests/integration/test_x.py", "def test_a(): pass\n", "runs in `make test`"),
        ("tests/pipeline/test_x.py", "import torch.multiprocessing as mp\n", "spawns processes"),
        ("tests/ingress/test_x.py", "@pytest.mark.integration\ndef test_a(): pass\n", "module"),
    ],
)
def test_the_check_catches_a_file_outside_its_suite(
    relative: str, source: str, expected: str
) -> None:
    problems = _problems(ROOT / relative, source, suite_expressions(MAKEFILE.read_text()))
    assert any(expected in p for p in problems), problems


def test_the_check_catches_suites_that_overlap() -> None:
    everything = {target: "not nothing" for target in SUITES}
    problems = _problems(ROOT / "tests/ingress/test_x.py", "def test_a(): pass\n", everything)
    assert problems == ["tests/ingress/test_x.py is in 2 suites: ['test', 'test-integration']"]


def test_ci_runs_every_suite() -> None:
    text = MAKEFILE.read_text()
    all_target = re.search(r"^test-all:([^\n]*)$", text, re.MULTILINE)
    assert all_target and set(all_target[1].split()) >= set(SUITES)
    assert re.search(r"^make test-all\b", CI.read_text(), re.MULTILINE)
