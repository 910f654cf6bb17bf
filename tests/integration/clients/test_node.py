"""The official `openai` npm package (pinned in tests/node/package-lock.json) against the real app:
one image, an array of two, n=2, webp, a stream with partial images, and an error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.integration.clients.conftest import API_KEY, ROOT
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

NODE_DIR = ROOT / "tests" / "node"
# The pinned openai 6.x runs on Node 20 (openai 7 needs Node 22).
MIN_NODE = 20


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (Debian: apt-get install nodejs npm)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(re.match(r"v(\d+)", version.stdout.strip()).group(1))  # type: ignore[union-attr]
    if major < MIN_NODE:
        pytest.skip(f"node {version.stdout.strip()} is older than the SDK's minimum {MIN_NODE}")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        # `.ci/run` installs it; a developer's first `make test` does it here.
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("tests/node/node_modules is missing and npm is not installed")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300,
            capture_output=True,
        )  # fmt: skip
    return node


@pytest.fixture(scope="module")
def node_results(keyed_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    node = _node()
    work = tmp_path_factory.mktemp("node")
    images = []
    for name, size, color in (
        ("first.png", (120, 90), (30, 140, 200)),
        ("second.png", (80, 80), (200, 90, 40)),
    ):
        Image.new("RGB", size, color).save(work / name)
        images.append(str(work / name))
    done = subprocess.run(
        [node, "edit_cases.mjs", f"{keyed_server.url}/v1", API_KEY, *images, str(work)],
        cwd=NODE_DIR, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check(path: str, fmt: str, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert (image.format, image.size) == (fmt, size), path


def test_the_sdk_version_is_the_pinned_one() -> None:
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
    assert lock["packages"]["node_modules/openai"]["version"] == pinned


def test_one_image(node_results: Any) -> None:
    one = node_results["one"]
    assert (one["size"], one["output_format"]) == ("64x48", "png")
    (path,) = one["files"]
    _check(path, "PNG", (64, 48))


def test_an_array_of_two_images(node_results: Any) -> None:
    (path,) = node_results["two"]["files"]
    _check(path, "PNG", (64, 48))


def test_n2(node_results: Any) -> None:
    files = node_results["n2"]["files"]
    assert len(files) == 2
    for path in files:
        _check(path, "PNG", (64, 48))
    assert Path(files[0]).read_bytes() != Path(files[1]).read_bytes()  # seed 11 and 12


def test_webp(node_results: Any) -> None:
    webp = node_results["webp"]
    assert webp["output_format"] == "webp"
    _check(webp["files"][0], "WEBP", (64, 48))


def test_stream_with_two_partial_images(node_results: Any) -> None:
    events = node_results["stream"]["events"]
    assert [(e["type"], e["index"]) for e in events] == [
        ("image_edit.partial_image", 0),
        ("image_edit.partial_image", 1),
        ("image_edit.completed", None),
    ]
    for event in events:
        assert event["size"] == "64x48"
        _check(event["file"], "PNG", (64, 48))


def test_the_servers_error_reaches_node_as_its_sdk_error(node_results: Any) -> None:
    error = node_results["error"]
    assert error["class"] == "BadRequestError"
    assert (error["status"], error["param"]) == (400, "size")
    assert "size 13x13 is out of range" in error["message"]
