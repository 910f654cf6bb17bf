"""What the Dockerfile installs resolves, against PyPI, for the image's platform and Python; the
client install pulls neither torch nor Ray; the built wheel carries the files the code reads.

These ask PyPI (`pip install --dry-run --report`: metadata only, nothing is installed), so they
take as long as the registry does: they are marked `network` and run in `make test-integration`,
not in the fast loop. CI reaches the package registries and runs them there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from tests.deploy.files import CONSTRAINTS, ROOT, dockerfile_extras, dockerfile_python
from tests.deploy.test_packaging import SERVER_ONLY, TESTED_GPU_SET

pytestmark = pytest.mark.network

# The image's platform: manylinux wheels up to its glibc (Ubuntu 22.04 in Ray's images: 2.35).
# pip takes --platform literally, so every manylinux level a wheel may be tagged with is listed.
LINUX_X86_64 = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 36)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


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
