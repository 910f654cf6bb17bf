"""One replica over several ranks (processes) on CPU, through the real Ray Serve app: each parallel
shape gives the single-process pixels; previews stream; one rank out of memory costs that edit a
500 and the replica keeps serving; a killed rank costs one 503, then Serve replaces the whole
replica and it serves again."""

from __future__ import annotations

import base64
import copy
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from serve_app.common.config import AppConfig
from tests.fixtures import random_image
from tests.integration.conftest import TEST_ARGS, Cluster, Server, deploy_app, remove_app

pytestmark = pytest.mark.integration

SEED, SIDE = 5, 64
LORA_ID = "qwen-image-edit-lora"
# Four heads, so Ulysses 2 gives each rank whole heads (the tiny model has one).
SHRUNK_4_HEADS: dict[str, Any] = {
    "transformer": {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 4,
                    "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 64},
    "text_encoder": {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rope_scaling": {"mrope_section": [2, 3, 3]}},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1]},
    },
    "vae": {"base_dim": 2, "num_res_blocks": 1},
}  # fmt: skip


def _args(tmp: Any, *, parallel: dict[str, Any], model: dict[str, Any] | None = None) -> dict:
    args = copy.deepcopy(TEST_ARGS)
    args["model"]["path"] = str(tmp / "model")
    args["model"].update(model or {})
    args["model"]["parallel"] = {"cpus_per_rank": 0.5, "timeout_s": 60, **parallel}
    return args


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _single_process_image(
    args: dict[str, Any],
    reference: np.ndarray,
    prompt: str,
    *,
    model: str = "qwen-image-edit",
    true_cfg_scale: float = 4.0,
) -> np.ndarray:
    """The same edit on one process (no Ray): what every parallel shape must reproduce."""
    from serve_app.common.jobs import EditJob
    from serve_app.pipeline.loading.loader import load_runner

    config = AppConfig.model_validate({**args, "model": {**args["model"], "parallel": {}}})
    runner = load_runner(config.model, config.generation)
    job = EditJob(
        request_id="ref", model=model, images=[reference], prompt=prompt,
        negative_prompt=" ", true_cfg_scale=true_cfg_scale, num_inference_steps=2, width=SIDE,
        height=SIDE, seeds=[SEED],
    )  # fmt: skip
    return runner.run(job).images[0]


def _edit(
    server: Server,
    reference: np.ndarray,
    prompt: str,
    *,
    model: str = "qwen-image-edit",
    extra: dict[str, Any] | None = None,
) -> np.ndarray:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.edit(
        image=("in.png", _png(reference), "image/png"), prompt=prompt, size=f"{SIDE}x{SIDE}",
        model=model,
        extra_body={"seed": SEED, "num_inference_steps": 2, **(extra or {})},
    )  # fmt: skip
    assert result.data is not None and result.data[0].b64_json
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))


@pytest.fixture(scope="module")
def cfg2(
    serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, dict[str, Any]]]:
    """The tiny model over 2 ranks, CFG split, with a LoRA; health checked every second (the
    kill test)."""
    from serve_app.pipeline.random_weights.tiny import build_tiny_lora, ensure_tiny_model

    lora = build_tiny_lora(ensure_tiny_model(), tmp_path_factory.mktemp("lora"))
    args = _args(
        tmp_path_factory.mktemp("cfg2"),
        parallel={"gpus": 2},
        model={"loras": [{"name": LORA_ID, "path": str(lora)}]},
    )
    srv = deploy_app(
        serve_cluster,
        "parallel-cfg2",
        args=args,
        deployments=[{"name": "QwenImageEditModel", "health_check_period_s": 1}],
    )
    try:
        yield srv, args
    finally:
        remove_app(serve_cluster, "parallel-cfg2")


def test_cfg_split_over_two_ranks_gives_the_single_process_pixels(
    cfg2: tuple[Server, dict[str, Any]],
) -> None:
    server, args = cfg2
    reference = random_image(48, 40, seed=3)
    got = _edit(server, reference, "make the sky purple")
    want = _single_process_image(args, reference, "make the sky purple")
    assert got.shape == want.shape == (SIDE, SIDE, 3)
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1


def test_an_edit_without_true_cfg_over_two_ranks_gives_the_single_process_pixels(
    cfg2: tuple[Server, dict[str, Any]],
) -> None:
    """Without true CFG there is no negative branch: both ranks encode and run the prompt (with
    it each rank encodes only its own branch's prompt, as the test above checks by its pixels)."""
    server, args = cfg2
    reference = random_image(48, 40, seed=5)
    got = _edit(server, reference, "add a hat", extra={"true_cfg_scale": 1.0})
    want = _single_process_image(args, reference, "add a hat", true_cfg_scale=1.0)
    cfg = _single_process_image(args, reference, "add a hat")
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1
    assert not np.array_equal(want, cfg)  # the edit did change with true CFG off


def test_a_lora_over_two_ranks_gives_the_single_process_pixels(
    cfg2: tuple[Server, dict[str, Any]],
) -> None:
    """Every rank loads the adapters and switches to the job's model id (CFG split included)."""
    server, args = cfg2
    reference = random_image(40, 48, seed=4)
    got = _edit(server, reference, "make it snow", model=LORA_ID)
    want = _single_process_image(args, reference, "make it snow", model=LORA_ID)
    base = _single_process_image(args, reference, "make it snow")
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1
    assert not np.array_equal(want, base)  # the adapter changed the edit


def test_ready_shows_the_ranks(cfg2: tuple[Server, dict[str, Any]]) -> None:
    ready = httpx.get(f"{cfg2[0].url}/ready", timeout=10).json()
    parallel = ready["parallel"]
    assert (parallel["gpus"], parallel["cfg"], parallel["ulysses"]) == (2, 2, 1)
    assert [r["rank"] for r in parallel["ranks"]] == [0, 1]
    assert [r["cfg_group"] for r in parallel["ranks"]] == [0, 1]
    assert len({r["pid"] for r in parallel["ranks"]}) == 2  # one process per rank


def _streamed_event_types(server: Server) -> list[str]:
    """A streaming edit with one preview, through the official client: its events' types."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    events = client.images.edit(
        image=("in.png", _png(random_image(32, 32)), "image/png"),
        prompt="add a hat",
        size="64x64",
        stream=True,
        partial_images=1,
        extra_body={"num_inference_steps": 4},
    )
    return [e.type for e in events]


def test_streaming_previews_come_from_rank_zero(cfg2: tuple[Server, dict[str, Any]]) -> None:
    want = ["image_edit.partial_image", "image_edit.completed"]
    assert _streamed_event_types(cfg2[0]) == want


def _rank_actors() -> list[tuple[str, str]]:
    """(name, namespace) of every rank actor (ranks 1..N-1 of each parallel replica)."""
    import ray

    return [
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("qwen-rank-")
    ]


def test_one_rank_out_of_memory_is_answered_and_the_replica_keeps_serving(
    cfg2: tuple[Server, dict[str, Any]],
) -> None:
    import ray

    server, _ = cfg2
    before = _rank_actors()
    assert len(before) == 1
    rank1 = ray.get_actor(before[0][0], namespace=before[0][1])

    def fail_next_forward(worker: Any) -> None:
        """On rank 1 only: its next transformer forward runs out of memory (on a GPU a real
        allocation that cannot fit; on CPU torch's own error), then forwards work again."""
        import torch

        inner = worker._rank.runner.pipe.transformer.inner

        def forward(*args: Any, **kwargs: Any) -> Any:
            del inner.forward  # once
            if torch.cuda.is_available():
                torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

        inner.forward = forward

    ray.get(rank1.__ray_call__.remote(fail_next_forward))
    files = {"image": ("in.png", _png(random_image(32, 32)), "image/png")}
    data = {"prompt": "add a hat", "size": "64x64", "num_inference_steps": "3"}
    t0 = time.monotonic()
    answer = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=120)
    assert answer.status_code == 500, answer.text
    assert answer.json()["error"]["code"] == "gpu_out_of_memory"
    # Answered at the step's end, not after the collective timeout (60 s here).
    assert time.monotonic() - t0 < 30
    # The same ranks answer the next edit: nothing was replaced.
    answer = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=120)
    assert answer.status_code == 200, answer.text
    assert _rank_actors() == before


def test_a_killed_rank_costs_one_503_then_the_replica_is_replaced(
    cfg2: tuple[Server, dict[str, Any]],
) -> None:
    import ray

    server, _ = cfg2
    before = _rank_actors()
    assert len(before) == 1  # rank 1; rank 0 is the replica itself
    ray.kill(ray.get_actor(before[0][0], namespace=before[0][1]))
    files = {"image": ("in.png", _png(random_image(32, 32)), "image/png")}
    data = {"prompt": "add a hat", "size": "64x64"}
    answer = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=120)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "replica_unavailable"
    assert "retry-after" in answer.headers
    # Serve's health checks fail; it replaces the replica (a new placement group, new ranks).
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = _rank_actors()
        if now and now != before and httpx.get(f"{server.url}/ready", timeout=10).is_success:
            break
        time.sleep(1)
    else:
        pytest.fail("the replica was not replaced within 240 s")
    answer = httpx.post(f"{server.url}/v1/images/edits", files=files, data=data, timeout=120)
    assert answer.status_code == 200, answer.text
