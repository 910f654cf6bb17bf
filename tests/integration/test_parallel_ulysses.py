"""CFG 2 x Ulysses 2 over four CPU ranks through the real app (a module of its own: one Ray
instance per test module)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.fixtures import random_image
from tests.integration.conftest import Cluster, deploy_app, remove_app
from tests.integration.test_parallel import SHRUNK_4_HEADS, _args, _edit, _single_process_image

pytestmark = pytest.mark.integration


def test_cfg_and_ulysses_over_four_ranks_give_the_single_process_pixels(
    serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """CFG 2 x Ulysses 2: the text (prompt and negative prompt) and image token counts are not
    multiples of 2 here, so padding and the work size are exercised too."""
    args = _args(
        tmp_path_factory.mktemp("u2"),
        parallel={"gpus": 4},
        model={"source": "synthetic", "synthetic_overrides": SHRUNK_4_HEADS, "dtype": "float32"},
    )
    reference = random_image(40, 56, seed=4)
    prompt = "turn the red square into a blue circle"
    srv = deploy_app(serve_cluster, "parallel-u2", args=args)
    try:
        got = _edit(srv, reference, prompt)
        ready = httpx.get(f"{srv.url}/ready", timeout=10).json()["parallel"]
    finally:
        remove_app(serve_cluster, "parallel-u2")
    assert (ready["cfg"], ready["ulysses"]) == (2, 2)
    want = _single_process_image(args, reference, prompt)
    assert got.shape == want.shape
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 2


def test_a_cfg_off_model_id_gets_ulysses_over_every_rank(
    serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A fused distilled LoRA (no true CFG by its recipe) on two ranks: `parallel: auto` plans
    Ulysses 2, not a CFG split whose second rank would idle, and gives the single-process pixels."""
    from serve_app.pipeline.random_weights.synthetic import build_synthetic_lora

    lora = build_synthetic_lora(
        "2509", tmp_path_factory.mktemp("lora"), rank=4, overrides=SHRUNK_4_HEADS
    )
    lora_id = "fast-4"
    args = _args(
        tmp_path_factory.mktemp("u2-lora"),
        parallel={"gpus": 2},
        model={
            "source": "synthetic", "synthetic_overrides": SHRUNK_4_HEADS, "dtype": "float32",
            "lora_mode": "fused",
            "loras": [{"name": lora_id, "path": str(lora), "recipe": "lightning-4"}],
        },
    )  # fmt: skip
    reference = random_image(40, 56, seed=6)
    prompt = "make it snow"
    srv = deploy_app(serve_cluster, "parallel-u2-lora", args=args)
    try:
        got = _edit(srv, reference, prompt, model=lora_id, extra={"true_cfg_scale": 1.0})
        ready = httpx.get(f"{srv.url}/ready", timeout=10).json()["parallel"]
    finally:
        remove_app(serve_cluster, "parallel-u2-lora")
    assert (ready["gpus"], ready["cfg"], ready["ulysses"]) == (2, 1, 2)
    want = _single_process_image(args, reference, prompt, model=lora_id, true_cfg_scale=1.0)
    assert got.shape == want.shape
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 2
