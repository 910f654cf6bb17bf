"""One real app with API keys on, shared by this package's client tests: the browser playground,
the `qwen-image-edit` CLI and the official Node SDK (one Ray start for the three)."""

from __future__ import annotations

import copy
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import (
    TEST_ARGS,
    Cluster,
    Server,
    deploy_app,
    ingress_with_api_keys,
    remove_app,
)

API_KEY = "sk-clients-test"
MAX_STEPS = 400
ROOT = Path(__file__).resolve().parents[3]
# Screenshots and other things a person may want to look at after a run (git-ignored; CI keeps
# the folder as its artifacts).
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="package")
def keyed_server(
    serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    args = copy.deepcopy(TEST_ARGS)
    args["model"]["path"] = str(tmp_path_factory.mktemp("tiny") / "model")
    # Room for an edit long enough to be stopped mid-way on any machine (the playground's Stop).
    args["generation"]["max_steps"] = MAX_STEPS
    srv = deploy_app(
        serve_cluster, "clients", args=args, deployments=[ingress_with_api_keys(API_KEY)]
    )
    try:
        yield srv
    finally:
        remove_app(serve_cluster, "clients")


def photo_png(width: int, height: int, *, seed: int = 0) -> bytes:
    """A smooth colour picture (not a flat colour), so screenshots show what was uploaded."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, np.pi, 3)
    channels = [127 + 127 * np.sin(x / width * 3 + y / height * 2 + p) for p in phase]
    buf = io.BytesIO()
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    paths = []
    for i, (w, h) in enumerate([(200, 150), (120, 120)]):
        path = tmp_path / f"picture{i + 1}.png"
        path.write_bytes(photo_png(w, h, seed=i))
        paths.append(path)
    return paths


def artifacts_dir(name: str) -> Path:
    folder = ARTIFACTS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
