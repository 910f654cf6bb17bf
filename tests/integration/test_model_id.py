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

from serve_app.pipeline.tiny import ensure_tiny_model
from tests.fakes import png_bytes
from tests.hub_cache import add_to_hub_cache
from tests.integration.conftest import APP_NAME, TEST_ARGS, Server, start_server, stop_server

pytestmark = pytest.mark.integration

REPO = "test-org/tiny-qwen-image-edit-2509"
MISSING = "test-org/not-downloaded"


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    hf_home = tmp_path_factory.mktemp("hf-home")
    add_to_hub_cache(ensure_tiny_model(variant="2509"), hf_home / "hub", REPO)
    args = copy.deepcopy(TEST_ARGS)
    args["model"] = {"source": "local", "path": REPO, "device_map": "cpu"}
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
    srv = start_server(args=args, env=env)
    try:
        yield srv
    finally:
        stop_server()


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


def test_an_id_missing_offline_fails_the_deploy_with_the_fix(hub_server: Server) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    good = copy.deepcopy(TEST_ARGS)
    good["model"] = {"source": "local", "path": REPO, "device_map": "cpu"}
    bad = copy.deepcopy(good)
    bad["model"]["path"] = MISSING

    def app(name: str, prefix: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "route_prefix": prefix, "import_path": "serve_app.app:build_app",
                "args": args}  # fmt: skip

    # Declarative: the running app is listed unchanged, so only the second one is new.
    config = {"applications": [app(APP_NAME, "/", good), app("missing-model", "/missing", bad)]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
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
    assert serve.status().applications[APP_NAME].status == "RUNNING"
