"""The figures in the README, the docs and the config comments agree with bench/results.

A passage (a markdown paragraph, list item or table row; a run of YAML comment lines) that
names result files (`h100-1gpu-fp8.json`, `bench/results/h100-2gpu-cfg-*.json`) may only quote
measurements found in them: every number with a unit (s, ms, GiB, %, img/min) must equal, at
the precision shown, a number in one of those files (a fraction also counts as a percentage).
Approximate figures (`~13 s`) are not checked. And the README's GPU table must cite a file in
every row that quotes a time, as must every config comment that quotes one.

One figure per run a user reads: the latency figure (docs/figures/latency.png, bench/plot.py)
labels a headline run per precision, GPU model and GPUs per replica with its seconds and results
file; the README's GPU table quotes exactly those, and the README and the config comments quote
no other standard-edit latency of one replica unless it is a comparison listed here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import plot
from tests.deploy.files import README, ROOT, name

RESULTS = ROOT / "bench/results"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "deploy").rglob("*.yaml"))]

# Runs of one replica that the README or a config comment quotes beside a headline, as what it
# is compared with (another parallel layout), never as the figure for its GPUs.
COMPARISONS = {"h200-2gpu-ulysses2-bf16": "Ulysses 2, which CFG 2 is measured faster than"}
# The README GPU table's rows by GPUs per replica, and its columns by precision.
_TABLE_ROWS = {1: "| 1 x 1 GPU |", 2: "| 1 x 2 GPUs as 2 ranks"}
_TABLE_COLUMNS = {"bf16": 3, "fp8": 4}

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


def _headlines() -> list[plot.Run]:
    runs, _ = plot.load_runs(RESULTS)
    return plot.headlines(runs)


def _table_row(gpus: int) -> list[str]:
    (row,) = [p for p in passages(README) if p.startswith("|") and _TABLE_ROWS[gpus] in p]
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_the_readme_table_quotes_the_figures_labelled_points() -> None:
    """The figure's label and the README's cell name the same seconds and the same file."""
    headlines = _headlines()
    assert {(r.precision, r.gpus) for r in headlines} >= {("bf16", 1), ("fp8", 1), ("bf16", 2)}
    for run in headlines:
        cell = _table_row(run.gpus)[_TABLE_COLUMNS[run.precision]]
        seconds, file = f"{run.seconds:g} s", f"{run.name}.json"
        assert f"{seconds} on {run.gpu_model}" in cell and file in cell, (run.label, cell)
        assert seconds in run.label and file in run.label


def test_every_time_in_a_config_comment_cites_its_results_file() -> None:
    for path in CONFIGS:
        for passage in passages(path):
            times = [f for f in _FIGURE.findall(passage) if f[1] in ("s", "ms")]
            if times and re.search(r"measured|per edit|faster", passage):
                assert cited_files(passage), f"{name(path)}: {passage[:120]}"


def _one_replica_runs() -> dict[str, plot.Run]:
    runs, _ = plot.load_runs(RESULTS)
    return {run.name: run for run in runs if run.replicas == 1}


def quoted_besides_headlines(texts: list[str]) -> set[str]:
    """The one-replica runs whose latency `texts` quote, beside the headlines and comparisons."""
    headline_names = {run.name for run in _headlines()}
    candidates = _one_replica_runs()
    quoted = set()
    for passage in texts:
        figures = {float(n) for n, unit in _FIGURE.findall(passage) if unit == "s"}
        for file in cited_files(passage):
            run = candidates.get(file.stem)
            if run is not None and any(abs(run.seconds - f) < 0.006 for f in figures):
                quoted.add(run.name)
    return quoted - headline_names - set(COMPARISONS)


@pytest.mark.parametrize("path", [README, *CONFIGS], ids=name)
def test_latencies_quoted_are_the_headlines_or_listed_comparisons(path: Path) -> None:
    """A second figure for the same GPUs and precision (another host's run, an older one) is
    what made the README, the figure and the configs disagree: only headlines are quoted."""
    assert quoted_besides_headlines(passages(path)) == set()


def test_the_headline_check_catches_a_second_figure() -> None:
    # What the README said before: a slower run of the same GPUs and precision.
    assert quoted_besides_headlines(["fp8: 25.42 s on H100 (h100-1gpu-fp8.json)"]) == {
        "h100-1gpu-fp8"
    }
    assert quoted_besides_headlines(["fp8: 25.361 s on H100 (h100-1gpu-fp8-x2host.json)"]) == set()
    # A run with a switch the configs leave off is a dot in the figure, not its label.
    assert quoted_besides_headlines(["25.144 s (h100-1gpu-fp8-cppwrapper.json)"]) == {
        "h100-1gpu-fp8-cppwrapper"
    }
    # The comparison the 2-GPU config makes with Ulysses 2 is allowed.
    assert quoted_besides_headlines(["19.15 s, h200-2gpu-ulysses2-bf16.json"]) == set()
