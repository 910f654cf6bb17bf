"""Dependencies: the extras, the exact pins of the tools, the tested GPU set, and that what the
Dockerfile installs resolves (against PyPI, for the image's platform and Python).

The two resolution tests ask PyPI (`pip install --dry-run --report`: metadata only, nothing is
installed); CI reaches the package registries, so they run there like every other test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from tests.deploy.files import (
    CONSTRAINTS,
    DOCKERFILE,
    PYPROJECT,
    ROOT,
    constraints,
    dockerfile_extras,
    dockerfile_pip_install,
    dockerfile_python,
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
# The image's platform: manylinux wheels up to its glibc (Ubuntu 22.04 in Ray's images: 2.35).
# pip takes --platform literally, so every manylinux level a wheel may be tagged with is listed.
LINUX_X86_64 = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 36)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


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


# --- resolution against PyPI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This project built as a wheel (from a copy: the build leaves nothing in the clone)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "serve_app", src / "serve_app", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(src))
    (built,) = out.glob("qwen_image_edit_serve-*.whl")
    return built


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip {' '.join(args[:3])} failed:\n{done.stderr[-4000:]}"


def _resolve(tmp_path: Path, *args: str) -> dict[str, str]:
    """{package: version} pip would install (`--dry-run --ignore-installed --report`)."""
    report = tmp_path / "report.json"
    # A dropped connection resumes the download (some wheels have no metadata-only file and are
    # fetched whole, hundreds of MB) instead of failing the test.
    _pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--resume-retries", "20",
        "--report", str(report), *args,
    )  # fmt: skip
    install: list[dict[str, Any]] = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in install}


def test_the_dockerfile_install_resolves_for_the_image(wheel: Path, tmp_path: Path) -> None:
    """What `pip install -c constraints-gpu.txt "./src[EXTRAS]"` installs in the image, for
    Linux x86_64 and the base image's Python (PyPI's torch 2.11.0 is the CUDA 13 build)."""
    platforms = [arg for p in LINUX_X86_64 for arg in ("--platform", p)]
    resolved = _resolve(
        tmp_path,
        "--only-binary=:all:",
        "--python-version", dockerfile_python(),
        *platforms,
        "--target", str(tmp_path / "target"),
        "-c", str(CONSTRAINTS),
        f"{wheel}[{','.join(dockerfile_extras())}]",
    )  # fmt: skip
    for package, version in TESTED_GPU_SET.items():
        assert resolved.get(package) == version, (package, resolved.get(package))
    assert {"peft", "s3fs", "gcsfs", "redis", "huggingface-hub", "python-multipart"} <= set(
        resolved
    )
    cuda = {name for name in resolved if name.startswith("nvidia-") and name.endswith("-cu13")}
    assert cuda, f"torch 2.11.0 resolved without CUDA 13 libraries: {sorted(resolved)}"


def test_the_wheel_carries_the_files_the_code_reads_and_the_cli(wheel: Path) -> None:
    """Package data (the playground's page, the tiny models' configs) reaches the image's
    site-packages, which has no source tree beside it; the console script is declared."""
    package = ROOT / "serve_app"
    data = {
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    }
    assert "serve_app/ingress/playground/static/index.html" in data
    with zipfile.ZipFile(wheel) as built:
        names = set(built.namelist())
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = built.read(entry_points).decode()
    assert sorted(data - names) == []
    assert "qwen-image-edit = serve_app.client:main" in scripts


def test_the_client_install_resolves_without_torch_or_ray(wheel: Path, tmp_path: Path) -> None:
    resolved = _resolve(tmp_path, str(wheel))
    assert "openai" in resolved and "httpx" in resolved
    assert not set(resolved) & SERVER_ONLY, sorted(set(resolved) & SERVER_ONLY)
