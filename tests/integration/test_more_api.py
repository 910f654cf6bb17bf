"""The rest of the OpenAI edit API over the real Ray Serve app: streaming, url results, masks,
LoRA model ids and variant metadata, with the official openai client where it has a call.

This module deploys its own application ("more-api", with LoRAs and a memory:// image store)
under the route prefix /more, so the URLs it builds also prove the route prefix is honoured.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
from PIL import Image

from tests.integration.conftest import Cluster, Server, deploy_app, remove_app

pytestmark = pytest.mark.integration

APP = "more-api"
PREFIX = "/more"
LORA_ID = "qwen-image-edit-fast"
RECIPE_ID = "qwen-image-edit-lightning-4"  # the same adapter file, with the lightning-4 recipe
ARGS: dict[str, Any] = {
    "model": {"source": "tiny", "device_map": "cpu"},
    "generation": {"default_steps": 2, "max_steps": 1000, "auto_size_pixels": 64 * 64},
    "limits": {"max_n": 2, "min_output_side": 32, "max_output_side": 256},
    "storage": {"url": "memory://more-api-images", "ttl_s": 600, "max_total_bytes": 10**6},
    "ready_timeout_s": 2,
}


@pytest.fixture(scope="module")
def more(serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from serve_app.pipeline.random_weights.tiny import build_tiny_lora, ensure_tiny_model

    # The LoRA is made here from the same (cached) tiny model the replica will load.
    lora = build_tiny_lora(ensure_tiny_model(), tmp_path_factory.mktemp("lora"))
    args = json.loads(json.dumps(ARGS))
    args["model"]["loras"] = [
        {"name": LORA_ID, "path": str(lora), "default_steps": 3, "default_true_cfg_scale": 1.0},
        {"name": RECIPE_ID, "path": str(lora), "recipe": "lightning-4"},
    ]
    srv = deploy_app(serve_cluster, APP, args=args, route_prefix=PREFIX)
    try:
        yield srv
    finally:
        remove_app(serve_cluster, APP)


@pytest.fixture(scope="module")
def client(more: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{more.url}/v1", api_key="unused", max_retries=0, timeout=120)


def png(width: int = 48, height: int = 40, color: Any = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def left_transparent_mask(width: int = 48, height: int = 40, *, alpha: bool = True) -> bytes:
    img = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    (img if alpha else img.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


# --- stream=true ---------------------------------------------------------------------------


def test_openai_client_reads_the_stream(client: openai.OpenAI) -> None:
    stream = client.images.edit(
        image=("in.png", png(), "image/png"),
        prompt="add a hat",
        size="64x48",
        stream=True,
        partial_images=2,
        extra_body={"num_inference_steps": 6, "seed": 11},
    )
    events = list(stream)
    assert [type(e) for e in events] == [
        ImageEditPartialImageEvent,
        ImageEditPartialImageEvent,
        ImageEditCompletedEvent,
    ]
    partials, done = events[:2], events[2]
    assert [p.partial_image_index for p in partials] == [0, 1]  # type: ignore[union-attr]
    for event in events:
        assert event.size == "64x48" and event.output_format == "png"
        assert decode(event.b64_json).size == (64, 48)
    assert isinstance(done, ImageEditCompletedEvent)
    assert done.usage.output_tokens == 4 * 3
    # Previews are mid-denoising decodes, not copies of the final image.
    assert decode(partials[0].b64_json).tobytes() != decode(done.b64_json).tobytes()


def test_stream_rejects_n_above_one(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(
            image=("in.png", png(), "image/png"), prompt="x", n=2, stream=True, size="32x32"
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"


def test_client_disconnect_stops_the_edit(more: Server) -> None:
    from ray import serve

    model = serve.get_deployment_handle("QwenImageEditModel", app_name=APP)
    data = {"prompt": "x", "size": "64x64", "stream": "true", "partial_images": "3",
            "num_inference_steps": "400", "negative_prompt": " ", "true_cfg_scale": "4"}  # fmt: skip
    files = [("image", ("a.png", png(), "image/png"))]
    t0 = time.monotonic()
    with httpx.stream("POST", f"{more.url}/v1/images/edits", data=data, files=files,
                      timeout=120) as resp:  # fmt: skip
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines) == "event: image_edit.partial_image"  # a quarter of the steps done
        to_first = time.monotonic() - t0
        # The replica takes one request at a time: while the edit runs, info() must wait.
        with pytest.raises(TimeoutError):
            model.info.remote().result(timeout_s=1)
    # Response closed = client gone. The rest of the edit (~3x to_first) must not run: a
    # small edit right after needs the pipeline, which a still-running edit would hold.
    t1 = time.monotonic()
    small = httpx.post(f"{more.url}/v1/images/edits", files=files, timeout=120,
                       data={"prompt": "x", "size": "32x32", "num_inference_steps": "2"})  # fmt: skip
    follow_up = time.monotonic() - t1
    assert small.status_code == 200, small.text
    assert to_first > 2, "the edit was too quick to tell a stop from a finish"
    assert follow_up < to_first, (follow_up, to_first)


# --- response_format=url -------------------------------------------------------------------


def test_openai_client_url_result_then_fetch(client: openai.OpenAI, more: Server) -> None:
    result = client.images.edit(
        image=("in.png", png(), "image/png"),
        prompt="x",
        size="64x32",
        n=2,
        response_format="url",
        output_format="webp",
    )
    urls = [d.url for d in result.data]
    assert all(u and u.startswith(f"{more.url}/v1/images/img-") for u in urls)
    assert all(d.b64_json is None for d in result.data)
    fetched = httpx.get(str(urls[0]), timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 32)
    assert httpx.get(str(urls[1]), timeout=30).content != fetched.content


def test_unknown_image_is_openai_404(more: Server) -> None:
    resp = httpx.get(f"{more.url}/v1/images/img-1700000000000-{'0' * 32}.png", timeout=30)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "image_not_found"


# --- mask ----------------------------------------------------------------------------------


def test_openai_client_mask_edit(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=("in.png", png(), "image/png"),
        mask=("mask.png", left_transparent_mask(), "image/png"),
        prompt="a blue sky on the left",
        size="64x48",
        extra_body={"seed": 5},
    )
    assert result.size == "64x48"
    assert decode(result.data[0].b64_json).size == (64, 48)  # type: ignore[arg-type]


def test_mask_errors_name_the_mask(client: openai.OpenAI) -> None:
    for mask in (left_transparent_mask(alpha=False), left_transparent_mask(30, 30)):
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(
                image=("in.png", png(), "image/png"),
                mask=("mask.png", mask, "image/png"),
                prompt="x",
            )
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "mask"


# --- LoRA model ids and variant metadata ---------------------------------------------------


def test_models_list_the_lora_with_metadata(client: openai.OpenAI, more: Server) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["qwen-image-edit", LORA_ID, RECIPE_ID]
    meta = models[LORA_ID].model_extra["metadata"]  # type: ignore[index]
    assert meta["lora"] == LORA_ID and meta["default_steps"] == 3
    assert meta["default_true_cfg_scale"] == 1.0
    assert meta["variant"] == "Qwen-Image-Edit-2509"
    assert meta["lora_mode"] == "hotswap" and meta["scheduler"] is None  # the model's own
    base_meta = models["qwen-image-edit"].model_extra["metadata"]  # type: ignore[index]
    assert base_meta["lora"] is None and base_meta["default_steps"] == 2
    # What the recipe id runs with: its steps, no CFG, the Lightning scheduler.
    recipe = models[RECIPE_ID].model_extra["metadata"]  # type: ignore[index]
    assert (recipe["recipe"], recipe["default_steps"], recipe["default_true_cfg_scale"]) == (
        "lightning-4", 4, 1.0,
    )  # fmt: skip
    assert recipe["scheduler_base"] == "recipe"
    assert recipe["scheduler"]["base_shift"] == recipe["scheduler"]["max_shift"]
    assert abs(recipe["scheduler"]["base_shift"] - math.log(3)) < 1e-12
    ready = httpx.get(f"{more.url}/ready", timeout=30).json()
    assert ready["variant"] == "Qwen-Image-Edit-2509" and ready["loras"] == [LORA_ID, RECIPE_ID]


def test_a_recipe_id_runs_its_recipe_when_the_request_says_nothing(
    client: openai.OpenAI,
) -> None:
    def edit(model: str, **extra: Any) -> np.ndarray:
        result = client.images.edit(
            model=model, image=("in.png", png(), "image/png"), prompt="x", size="32x32",
            extra_body={"seed": 42, **extra},
        )  # fmt: skip
        return np.asarray(decode(result.data[0].b64_json))  # type: ignore[arg-type]

    plain = edit(RECIPE_ID)
    assert np.array_equal(plain, edit(RECIPE_ID, num_inference_steps=4, true_cfg_scale=1.0))
    assert not np.array_equal(plain, edit(RECIPE_ID, num_inference_steps=2))


def test_lora_is_chosen_by_model_and_base_is_unchanged(client: openai.OpenAI) -> None:
    def edit(model: str) -> np.ndarray:
        result = client.images.edit(
            model=model,
            image=("in.png", png(), "image/png"),
            prompt="x",
            size="32x32",
            extra_body={"seed": 42, "num_inference_steps": 2, "true_cfg_scale": 1.0},
        )
        return np.asarray(decode(result.data[0].b64_json))  # type: ignore[arg-type]

    base = edit("qwen-image-edit")
    lora = edit(LORA_ID)
    assert not np.array_equal(base, lora)
    assert np.array_equal(base, edit("qwen-image-edit"))


def test_unknown_model_lists_the_lora(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", png(), "image/png"), prompt="x", model="nope")
    assert LORA_ID in str(info.value)
