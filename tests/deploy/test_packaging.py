"""Dependencies: the extras, the exact pins of the tools, the tested GPU set and the Dockerfile's
install command. That the install resolves against PyPI, and what the built wheel carries:
test_resolution.py (the `network` suite marker).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tests.deploy.files import (
    DOCKERFILE,
    PYPROJECT,
    ROOT,
    constraints,
    dockerfile_extras,
    dockerfile_pip_install,
    pyproject,
    requirement,
    requirements,
)

SERVER_ONLY = {"torch", "ray", "diffusers", "transformers", "accelerate", "torchvision", "numpy"}
# The GPU set every figure in bench/results was measured with.
TESTED_GPU_SET = {
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "torchao": "0.17.0",
    "diffusers": "0.42.1",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "ray": "2.60.0",
}


# --- pyproject.toml --------------------------------------------------------------------------


def test_lint_and_test_tools_are_pinned_exactly() -> None:
    tools = requirements("test")
    assert {r.name for r in tools} >= {"ruff", "mypy", "pytest"}
    for req in tools:
        assert [s.operator for s in req.specifier] == ["=="], f"{req}: pin tools exactly"


@pytest.mark.parametrize("extra", [None, "serve", "fp8", "lora", "s3", "gcs"])
def test_runtime_requirements_have_lower_bounds(extra: str | None) -> None:
    for req in requirements(extra):
        assert any(s.operator in (">=", "==") for s in req.specifier), f"{req}: no lower bound"


def test_every_upper_bound_says_why() -> None:
    """A cap (`<`) carries a comment on its line or right above it."""
    lines = PYPROJECT.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r'^\s*"([^"]+)",?\s*(#.*)?$', line)
        if not match or "<" not in match[1] or match[1].startswith("qwen-image-edit-serve"):
            continue
        above = lines[i - 1].strip() if i else ""
        assert match[2] or above.startswith("#"), f"{match[1]}: say why it is capped"


def test_the_base_install_is_the_client() -> None:
    base = {r.name for r in requirements()}
    assert {"openai", "httpx"} <= base
    assert not base & SERVER_ONLY, base & SERVER_ONLY


def test_client_imports_without_torch_or_ray() -> None:
    """serve_app.client in a process where the server's packages cannot be imported at all."""
    # pydantic stays importable: the openai SDK the CLI is built on needs it.
    blocked = sorted(SERVER_ONLY | {"PIL", "starlette", "yaml"})
    code = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import raises ImportError
        import serve_app.client as client
        assert callable(client.main)
        print("ok", sorted(m for m in {blocked!r} if sys.modules.get(m) is not None))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"


def test_fp8_pins_torchao_to_the_torch_it_is_built_for() -> None:
    torchao = requirement("torchao", "fp8")
    torch = requirement("torch", "fp8")
    assert [s.operator for s in torchao.specifier] == ["=="]
    assert torchao.specifier.contains(constraints()["torchao"])
    assert torch.specifier.contains(constraints()["torch"])
    assert not torch.specifier.contains("2.12.0"), "torchao 0.17's kernels are torch 2.11's"


def test_constraints_are_the_tested_gpu_set_within_the_ranges() -> None:
    pins = constraints()
    assert pins == TESTED_GPU_SET
    ranges = {r.name: r for extra in ("serve", "fp8") for r in requirements(extra)}
    for package, version in pins.items():
        assert ranges[package].specifier.contains(version), (package, version, ranges[package])


def test_the_dockerfile_installs_with_the_constraints() -> None:
    command = dockerfile_pip_install()
    copied = re.findall(r"^COPY .*deploy/constraints-gpu\.txt (\S+)$", DOCKERFILE.read_text(), re.M)
    assert copied == ["src/constraints-gpu.txt"]
    assert "-c src/constraints-gpu.txt" in command
    assert '"./src[${EXTRAS}]"' in command
    assert set(dockerfile_extras()) <= set(pyproject()["project"]["optional-dependencies"])
    assert "serve" in dockerfile_extras()
