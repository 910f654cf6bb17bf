"""A clone stands alone: no file of the project reads or names a path outside the repository,
nor the tooling of the machines it was developed on."""

from __future__ import annotations

import subprocess

from tests.deploy.files import ROOT

# Spelled in pieces so this file does not match itself.
FORBIDDEN = (
    "../" + "shared",
    "." + "dev" + "kit",
    "device" + " tool",
    "/work" + "/shared",
    "field" + "-notes",
)
SKIP_SUFFIXES = (".png", ".whl", ".safetensors")


def _project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a commit of this tree would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [p for p in listed.stdout.splitlines() if (ROOT / p).is_file()]


def test_no_file_names_a_path_outside_the_repository() -> None:
    files = _project_files()
    assert "pyproject.toml" in files and "README.md" in files
    hits = []
    for path in files:
        if path.endswith(SKIP_SUFFIXES):
            continue
        text = (ROOT / path).read_text(errors="replace")
        hits += [f"{path}: {needle}" for needle in FORBIDDEN if needle in text]
    assert hits == []
