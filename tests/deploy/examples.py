"""The examples a user copies from the docs: fenced blocks of README.md and docs/*.md that call the
server `make run` starts (127.0.0.1:8000, the `qwen-image-edit` command's default), and what they
ask of it (steps, sizes, n, model). Shared by tests/deploy/test_examples.py (against make run's
limits) and tests/integration/clients/test_docs_examples.py (run for real)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.common.config import AppConfig
from tests.deploy.files import README, ROOT

DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAKE_RUN_URL = "http://127.0.0.1:8000"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Where a block talks to make run's server: its address, the command (whose default it is), or
# docs/api.md's `client` (declared once there as OpenAI(base_url="http://127.0.0.1:8000/v1")).
_TARGETS = re.compile(
    r"127\.0\.0\.1:8000|\bqwen-image-edit (edit|models|health)\b|\bclient\.images\.edit\("
)
# LoRA names a doc configures in its own YAML (`- name: ...`): examples may use them.
_CONFIGURED_NAME = re.compile(r"^\s*- name: ([\w.-]+)", re.M)
# What an example asks for, in the spellings of curl (-F k=v), the CLI, Python and JavaScript.
_STEPS = re.compile(r"""(?:num_inference_steps["']?\s*[=:]\s*|--steps[ =])(\d+)""")
_SIZE = re.compile(r"""(?:\bsize["']?\s*[=:]\s*["']?|--size[ =])(\d+)x(\d+)""")
_N = re.compile(r"""(?:(?<![\w-])n["']?\s*[=:]\s*|(?<!\w)-n[ =]|--n[ =])(\d+)\b""")
_MODEL = re.compile(r"""(?:\bmodel["']?\s*[=:]\s*["']?|--model[ =])([A-Za-z][\w.-]*)""")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    language: str
    code: str
    steps: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(code: str, *, path: Path = README, line: int = 0, language: str = "") -> Example:
    return Example(
        path=path,
        line=line,
        language=language,
        code=code,
        steps=[int(s) for s in _STEPS.findall(code)],
        sizes=[(int(w), int(h)) for w, h in _SIZE.findall(code)],
        ns=[int(n) for n in _N.findall(code)],
        models=_MODEL.findall(code),
    )


def configured_models(path: Path) -> set[str]:
    """The extra model ids (LoRAs) a doc's own config snippets define for its examples."""
    return set(_CONFIGURED_NAME.findall(path.read_text()))


def problems(example: Example, config: AppConfig) -> list[str]:
    """What of `example` a server with `config` refuses (its limits, its model ids)."""
    gen, limits = config.generation, config.limits
    found = [f"{s} steps > max_steps {gen.max_steps}" for s in example.steps if s > gen.max_steps]
    for w, h in example.sizes:
        sides = (limits.min_output_side, limits.max_output_side)
        if not (sides[0] <= min(w, h) and max(w, h) <= sides[1]):
            found.append(f"size {w}x{h} outside {sides[0]}..{sides[1]}")
        if w * h > limits.max_output_pixels:
            found.append(f"size {w}x{h} > max_output_pixels {limits.max_output_pixels}")
    found += [f"n {n} > max_n {limits.max_n}" for n in example.ns if n > limits.max_n]
    known = {*config.model.model_ids, *configured_models(example.path)}
    found += [f"model {m} not served" for m in example.models if m not in known]
    return found


def examples(paths: list[Path] = DOCS) -> Iterator[Example]:
    """Every fenced block of `paths` that targets make run's server."""
    for path in paths:
        text = path.read_text()
        for match in _FENCE.finditer(text):
            language, code = match.group(1), match.group(2)
            if _TARGETS.search(code):
                line = text.count("\n", 0, match.start()) + 1
                yield parse(code, path=path, line=line, language=language)
