"""The `qwen-image-edit` console script (the installed entry point, in a subprocess) against the
real app with API keys on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.clients.conftest import API_KEY, photo_png
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "qwen-image-edit"


def cli(
    server: Server, *args: str, key: str | None = API_KEY, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    if key is not None:
        env["OPENAI_API_KEY"] = key
    return subprocess.run(
        [str(CLI), "--url", server.url, *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(photo_png(120, 90))
    return path


def test_the_console_script_is_installed() -> None:
    assert CLI.exists(), "run `make install`: it registers the qwen-image-edit console script"


def test_health_and_models(keyed_server: Server) -> None:
    health = cli(keyed_server, "health")
    assert health.returncode == 0, health.stderr
    assert health.stdout.splitlines()[0] == "health: ok"
    assert health.stdout.splitlines()[1].startswith("ready: qwen-image-edit (QwenImageEdit")
    models = cli(keyed_server, "models")
    assert models.returncode == 0, models.stderr
    assert models.stdout.split() == ["qwen-image-edit", "qwen-image-edit-2509"]


def test_edit_n2_with_a_seed_writes_numbered_files_of_the_size_asked(
    keyed_server: Server, picture: Path, tmp_path: Path
) -> None:
    out = tmp_path / "edit.png"
    args = ["edit", "-i", str(picture), "-p", "make it blue", "-n", "2", "--seed", "5"]
    done = cli(keyed_server, *args, "--size", "64x48", "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    paths = [tmp_path / "edit.png", tmp_path / "edit-1.png"]
    assert done.stdout.split() == [str(p) for p in paths]
    for path, seed in zip(paths, (5, 6), strict=True):
        with Image.open(path) as image:
            assert (image.format, image.size) == ("PNG", (64, 48))
        assert f"{path}: 64x48, seed {seed}" in done.stderr


def test_stream_shows_a_progress_bar_and_saves_previews(
    keyed_server: Server, picture: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.webp"
    args = ["edit", "-i", str(picture), "-p", "p", "--stream", "--partial-images", "2"]
    done = cli(keyed_server, *args, "--steps", "4", "--save-partials", "--out", str(out))
    assert done.returncode == 0, done.stderr
    # tqdm's bar: 2 previews + the completed image = 3 events, all seen.
    assert re.search(r"image 1/1: 100%.*\| 3/3 ", done.stderr), done.stderr
    with Image.open(out) as image:
        assert image.format == "WEBP"
    partials = sorted(p.name for p in tmp_path.glob("s.partial*.webp"))
    assert partials == ["s.partial0.webp", "s.partial1.webp"]


def test_a_masked_edit(keyed_server: Server, picture: Path, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    alpha = Image.new("L", (120, 90), 255)
    alpha.paste(0, (30, 20, 90, 70))  # the transparent box is repainted
    rgba = Image.new("RGBA", (120, 90))
    rgba.putalpha(alpha)
    rgba.save(mask)
    out = tmp_path / "m.png"
    done = cli(
        keyed_server, "edit", "-i", str(picture), "-p", "p", "--mask", str(mask),
        "--steps", "2", "--size", "64x64", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_a_bad_size_prints_the_servers_error(keyed_server: Server, picture: Path) -> None:
    done = cli(keyed_server, "edit", "-i", str(picture), "-p", "p", "--size", "13x13")
    assert done.returncode == 1
    line = done.stderr.splitlines()[-1]
    assert line.startswith("error: size 13x13 is out of range"), line
    assert "(400, invalid_request_error, param: size, code: invalid_value)" in line


def test_without_the_key_it_says_so(keyed_server: Server) -> None:
    done = cli(keyed_server, "models", key=None)
    assert done.returncode == 1
    assert "401" in done.stderr and "--api-key or set $OPENAI_API_KEY" in done.stderr
