"""model.path as a Hugging Face id: resolved through the Hub's cache, offline, on CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from serve_app.common.config import GenerationConfig, ModelConfig, load_config
from serve_app.pipeline.loading.hub import ModelSourceError, resolve_model_path
from serve_app.pipeline.loading.loader import load_runner
from tests.fixtures import make_job
from tests.hub_cache import COMMIT, add_to_hub_cache
from tests.pipeline.conftest import TinyModels

REPO = "test-org/tiny-qwen-image-edit"


def test_a_local_folder_is_used_as_it_is(tiny_models: TinyModels) -> None:
    def no_download(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a local folder must not reach the Hub")

    folder = tiny_models("2509")
    assert resolve_model_path(str(folder), download=no_download) == folder


def test_an_id_resolves_to_its_cached_snapshot_offline(
    tiny_models: TinyModels, hub_cache: Path
) -> None:
    snapshot = add_to_hub_cache(tiny_models("2509"), hub_cache, REPO)
    resolved = resolve_model_path(REPO)
    assert resolved == snapshot
    assert (resolved / "model_index.json").is_file()
    assert (resolved / "model_index.json").is_symlink()  # the real cache layout: blobs + links


def test_a_revision_pin_picks_that_snapshot(tiny_models: TinyModels, hub_cache: Path) -> None:
    add_to_hub_cache(tiny_models("2509"), hub_cache, REPO)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    pinned = add_to_hub_cache(tiny_models("2511"), hub_cache, REPO, ref="v2", commit=other)
    assert resolve_model_path(REPO, revision="v2") == pinned
    assert resolve_model_path(REPO, revision=other) == pinned
    assert resolve_model_path(REPO).name == COMMIT


def test_the_replica_loads_a_model_by_id(tiny_models: TinyModels, hub_cache: Path) -> None:
    add_to_hub_cache(tiny_models("2511"), hub_cache, REPO)
    config = load_config({"model": {"device_map": "cpu"}}, environ={"QWEN_MODEL_DIR": REPO})
    assert config.model.path == REPO
    runner = load_runner(config.model, GenerationConfig())
    assert runner.info.variant == "Qwen-Image-Edit-2511"
    output = runner.run(make_job())
    assert output.images[0].shape == (32, 32, 3)


def test_an_id_missing_offline_fails_at_start_naming_it_and_the_fix(hub_cache: Path) -> None:
    model = ModelConfig(path="Qwen/Qwen-Image-Edit-2511", device_map="cpu")
    with pytest.raises(ModelSourceError) as caught:
        load_runner(model, GenerationConfig())
    message = str(caught.value)
    assert "Qwen/Qwen-Image-Edit-2511" in message
    assert "HF_HUB_OFFLINE" in message
    assert str(hub_cache) in message
    assert "`hf download Qwen/Qwen-Image-Edit-2511`" in message


def test_a_missing_revision_is_named_in_the_fix(tiny_models: TinyModels, hub_cache: Path) -> None:
    add_to_hub_cache(tiny_models("2509"), hub_cache, REPO)
    with pytest.raises(ModelSourceError, match=r"hf download .* --revision v9"):
        resolve_model_path(REPO, revision="v9")


@pytest.mark.parametrize("path", ["/no/such/folder", "./relative/missing", "not-an-id", "a/b/c"])
def test_neither_a_folder_nor_an_id(path: str) -> None:
    with pytest.raises(ModelSourceError, match="no such local folder, and not a Hugging Face"):
        resolve_model_path(path, download=lambda *a, **k: "unused")


def _hub_error(kind: type[Exception], status: int) -> Exception:
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return kind("denied", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (
            _hub_error(GatedRepoError, 401),
            "is gated: accept its terms on huggingface.co and set HF_TOKEN",
        ),
        (
            _hub_error(RepositoryNotFoundError, 404),
            "not found on the Hub: check the id, or set HF_TOKEN",
        ),
    ],
)
def test_hub_refusals_name_the_token(error: Exception, needle: str) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise error

    with pytest.raises(ModelSourceError, match=needle):
        resolve_model_path(REPO, download=refuse)


def test_download_progress_goes_to_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """snapshot_download drives the given tqdm class; each bar becomes log lines, not a bar."""

    def download(repo_id: str, *, revision: str | None, tqdm_class: Any) -> str:
        assert (repo_id, revision) == (REPO, "main")
        files = tqdm_class(total=3, desc="Fetching 3 files", name="huggingface_hub")
        data = tqdm_class(total=2 * 10**9, desc="Downloading bytes", unit="B", unit_scale=True)
        for _ in range(4):
            data.update(5 * 10**8)
            files.update(1) if files.n < 3 else None
        data.close()
        files.close()
        return "/cache/snapshot"

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert resolve_model_path(REPO, revision="main", download=download) == Path(
            "/cache/snapshot"
        )
    lines = [r.message for r in caplog.records if r.message.startswith("download: ")]
    assert "download: Downloading bytes: 2.00GB / 2.00GB (100 %)" in [
        line.split(",")[0] for line in lines
    ]
    assert any(line.startswith("download: Fetching 3 files: 3 it / 3 it (100 %)") for line in lines)
    assert any(f"model {REPO}@main: /cache/snapshot" in r.message for r in caplog.records)
