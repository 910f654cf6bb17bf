"""`model.path` as a Hugging Face id through the real app: offline, from a laid-out hub cache.

The model replica resolves the id (HF_HOME, HF_HUB_OFFLINE in its environment); the ingress
never looks at it. A second application with an id that is not cached fails to deploy, and
Serve's status carries the replica's message: the id and how to fix it.
"""

from __future__ import annotations

import base64
import copy
import io
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from PIL import Image

from serve_app.pipeline.random_weights.tiny import ensure_tiny_model
from tests.fakes import png_bytes
from tests.hub_cache import add_to_hub_cache
from tests.integration.conftest import TEST_ARGS, Cluster, Server, deploy_app, remove_app

pytestmark = pytest.mark.integration

REPO = "test-org/tiny-qwen-image-edit-2509"
MISSING = "test-org/not-downloaded"


APP = "model-id"


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The model replica's environment: a hub cache holding REPO, and no network."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    add_to_hub_cache(ensure_tiny_model(variant="2509"), hf_home / "hub", REPO)
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}


def with_env(env: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": "QwenImageEditModel", "ray_actor_options": {"runtime_env": {"env_vars": env}}}]


@pytest.fixture(scope="module")
def hub_server(serve_cluster: Cluster, hub_env: dict[str, str]) -> Iterator[Server]:
    args = copy.deepcopy(TEST_ARGS)
    args["model"] = {"source": "local", "path": REPO, "device_map": "cpu"}
    srv = deploy_app(serve_cluster, APP, args=args, deployments=with_env(hub_env))
    try:
        yield srv
    finally:
        remove_app(serve_cluster, APP)


def test_edit_with_a_model_loaded_by_id(hub_server: Server) -> None:
    client = openai.OpenAI(base_url=f"{hub_server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.edit(
        model="qwen-image-edit",
        image=("in.png", png_bytes(64, 48), "image/png"),
        prompt="make it blue",
        size="64x64",
        extra_body={"seed": 1, "num_inference_steps": 2},
    )
    assert result.data and result.data[0].b64_json
    out = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert out.size == (64, 64)
    (card,) = client.models.list().data
    assert (
        card.model_extra and card.model_extra["metadata"]["pipeline"] == "QwenImageEditPlusPipeline"
    )


def test_an_id_missing_offline_fails_the_deploy_with_the_fix(
    serve_cluster: Cluster, hub_server: Server, hub_env: dict[str, str]
) -> None:
    from ray import serve

    bad = copy.deepcopy(TEST_ARGS)
    bad["model"] = {"source": "local", "path": MISSING, "device_map": "cpu"}
    # Declarative: the running app stays in the config unchanged, so only this one is new.
    deploy_app(serve_cluster, "missing-model", args=bad, deployments=with_env(hub_env), wait=False)
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get("missing-model")
            if status is not None and status.status == "DEPLOY_FAILED":
                break
            time.sleep(1)
        assert status is not None and status.status == "DEPLOY_FAILED", status
        message = status.deployments["QwenImageEditModel"].message  # the replica's traceback
        assert "ModelSourceError" in message
        assert MISSING in message
        assert "HF_HUB_OFFLINE" in message
        assert f"hf download {MISSING}" in message
        # The first application keeps serving.
        assert serve.status().applications[APP].status == "RUNNING"
    finally:
        remove_app(serve_cluster, "missing-model")
