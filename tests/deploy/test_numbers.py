"""The figures in the README, the docs and the config comments agree with bench/results.

A passage (a markdown paragraph, list item or table row; a run of YAML comment lines) that
names result files (`h100-1gpu-fp8.json`, `bench/results/h100-2gpu-cfg-*.json`) may only quote
measurements found in them: every number with a unit (s, ms, GiB, %, img/min) must equal, at
the precision shown, a number in one of those files (a fraction also counts as a percentage).
Approximate figures (`~13 s`) are not checked. And the README's GPU table must cite a file in
every row that quotes a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.files import README, ROOT, name

RESULTS = ROOT / "bench/results"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "deploy").rglob("*.yaml"))]

_CITATION = re.compile(r"([A-Za-z0-9*_.-]+)\.json")
_FIGURE = re.compile(r"(?<![~\w.])(\d+(?:\.\d+)?)\s?(ms|s|GiB|%|img/min)(?![\w/])")


def _passages_md(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        starts_item = line.lstrip().startswith(("|", "- ", "* ")) or not line.strip()
        if starts_item and block:
            yield " ".join(block)
            block = []
        if line.strip():
            block.append(line.strip())


def _passages_yaml(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
        elif "#" in line and not stripped.startswith(("-", '"')):
            yield line.split("#", 1)[1]  # a trailing comment stands alone
        elif block:
            yield " ".join(block)
            block = []


def passages(path: Path) -> list[str]:
    text = path.read_text()
    return list(_passages_md(text) if path.suffix == ".md" else _passages_yaml(text))


def cited_files(passage: str) -> list[Path]:
    files: list[Path] = []
    for stem in _CITATION.findall(passage):
        files += sorted(RESULTS.glob(f"{Path(stem).name}.json"))
    return files


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)


def unsourced(passage: str) -> list[str]:
    """The figures of `passage` that none of the files it cites holds."""
    files = cited_files(passage)
    if not files:
        return []
    known = [n for f in files for n in _numbers(json.loads(f.read_text()))]
    missing = []
    for number, unit in _FIGURE.findall(passage):
        shown = float(number)
        decimals = len(number.split(".")[1]) if "." in number else 0
        tolerance = 0.5 * 10**-decimals + 1e-9
        candidates = known + [100 * k for k in known] if unit == "%" else known
        if not any(abs(shown - k) <= tolerance for k in candidates):
            missing.append(f"{number} {unit}")
    return missing


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=name)
def test_cited_figures_are_in_the_cited_results(path: Path) -> None:
    problems = [(p[:100], bad) for p in passages(path) if (bad := unsourced(p))]
    assert problems == []


def test_every_citation_names_a_result_file() -> None:
    for path in DOCS + CONFIGS:
        for passage in passages(path):
            for stem in _CITATION.findall(passage):
                if "results" in passage or stem.startswith("h100-"):
                    assert list(RESULTS.glob(f"{Path(stem).name}.json")), (name(path), stem)


def test_readme_gpu_rows_cite_their_measurements() -> None:
    rows = [p for p in passages(README) if p.startswith("|") and "`" in p and ".yaml`" in p]
    assert rows
    for row in rows:
        if re.search(r"\d\s?s\b", row):
            assert cited_files(row), f"README row quotes a time without its result file: {row}"


def test_the_check_catches_a_wrong_figure() -> None:
    right = "1 GPU, bf16: 31.46 s per edit (h100-1gpu-bf16-ref.json), 0.27 % overhead"
    assert unsourced(right) == []
    assert unsourced(right.replace("31.46", "30.46")) == ["30.46 s"]
    assert unsourced("2.5 % relative L2 (h100-2gpu-cfg-fp8.json)") == []
    assert unsourced("2.8 % relative L2 (h100-2gpu-cfg-fp8.json)") == ["2.8 %"]
    assert unsourced("~2.8 % relative L2 (h100-2gpu-cfg-fp8.json)") == []
