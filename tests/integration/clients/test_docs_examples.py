"""The README's first examples, run as written against an app deployed with `make run`'s own
args (deploy/local.yaml): the curl, the `qwen-image-edit` command and the Python client. Only the
address changes (the test app's, for 127.0.0.1:8000). Every other docs example is checked against
the same config's limits in tests/deploy/test_examples.py."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.deploy.examples import MAKE_RUN_URL, Example, examples
from tests.deploy.files import LOCAL_CONFIG, README, app, manifest
from tests.integration.conftest import Cluster, Server, deploy_app, remove_app

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def make_run_server(
    serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    application = app(manifest(LOCAL_CONFIG))
    args = copy.deepcopy(application["args"])
    # The tiny model is built in a fresh folder, not the user's cache; every limit is make run's.
    args["model"]["path"] = str(tmp_path_factory.mktemp("tiny") / "model")
    srv = deploy_app(
        serve_cluster, "make-run", args=args, deployments=copy.deepcopy(application["deployments"])
    )
    try:
        yield srv
    finally:
        remove_app(serve_cluster, "make-run")


def readme_example(language: str, contains: str) -> Example:
    (example,) = [e for e in examples([README]) if e.language == language and contains in e.code]
    return example


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A folder laid out like the clone the README's commands run in."""
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples/input.png", tmp_path / "examples/input.png")
    (tmp_path / ".venv").symlink_to(BIN.parent)
    return tmp_path


def run(
    code: str, server: Server, cwd: Path, *, shell: list[str]
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QWEN_IMAGE_EDIT_URL": server.url}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [*shell, code.replace(MAKE_RUN_URL, server.url)],
        cwd=cwd, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", size)


def test_the_readme_curl(make_run_server: Server, clone: Path) -> None:
    example = readme_example("bash", "curl")
    done = run(example.code, make_run_server, clone, shell=["bash", "-c"])
    assert done.returncode == 0, done.stderr
    assert_png(clone / "out.png", (256, 256))


def test_the_readme_command(make_run_server: Server, clone: Path) -> None:
    example = readme_example("bash", "qwen-image-edit edit")
    done = run(example.code, make_run_server, clone, shell=["bash", "-c"])
    assert done.returncode == 0, done.stderr
    assert_png(clone / "cli.png", (256, 256))
    # make run's model is the random-weight demo: the command says so.
    assert "random weights: its images are noise" in done.stderr
    # Run again as written: the file exists now, and the command will not overwrite it.
    again = run(example.code, make_run_server, clone, shell=["bash", "-c"])
    assert again.returncode == 1 and "cli.png already exists" in again.stderr


def test_the_readme_python_client(make_run_server: Server, clone: Path) -> None:
    example = readme_example("python", "OpenAI(")
    done = run(example.code, make_run_server, clone, shell=[sys.executable, "-c"])
    assert done.returncode == 0, done.stderr
    assert_png(clone / "out.png", (256, 256))
    assert done.stdout.startswith("256x256 ")  # print(result.size, result.usage)
