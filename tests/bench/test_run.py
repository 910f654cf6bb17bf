"""bench.run's scenarios on CPU: the one-card keys become the app config the replica gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run
from bench.run import Scenario, app_config
from serve_app.common.config import load_config


def test_memory_cap_scenario_caps_the_replica_and_plans_for_the_card() -> None:
    sc = Scenario.parse(
        "name=24gb,gpus=1,compile=1,dynamic=1,fp8=1,memory_cap_gib=23.5,"
        "text_encoder=offload,vae_tiling=1,max_pixels=1048576"
    )
    assert (sc.memory_cap_gib, sc.text_encoder, sc.vae_tiling) == (23.5, "offload", True)
    assert "text_encoder=offload" in sc.mode and "cap=23.5GiB" in sc.mode
    config = app_config(sc, steps=4)
    model = config["args"]["model"]
    assert model["max_memory_gib"] == {0: 23.5} and model["headroom_max_pixels"] == 1048576
    assert (model["text_encoder"], model["vae_tiling"], model["quantization"]) == (
        "offload",
        True,
        "fp8",
    )
    assert model["quantize_at_load"]  # as the one-card configs: bf16 never has to fit
    options = config["deployments"][0]["ray_actor_options"]
    assert options["runtime_env"] == {"env_vars": {"QWEN_CUDA_MEMORY_CAP_GIB": "23.5"}}


def test_a_scenario_without_a_cap_is_unchanged() -> None:
    config = app_config(Scenario.parse("name=plain,gpus=1"), steps=4)
    model = config["args"]["model"]
    assert not {"max_memory_gib", "text_encoder", "vae_tiling"} & set(model)
    assert "runtime_env" not in config["deployments"][0]["ray_actor_options"]


def test_a_lightning_scenario_on_a_capped_card_fuses_on_arrival(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The one-card Lightning measurement: the LoRA fused as each layer loads, then 8-bit."""
    from serve_app.pipeline.loading.lora import fuses_on_arrival

    monkeypatch.setattr(run, "synthetic_lora", lambda variant, rank: tmp_path / "lora.safetensors")
    sc = Scenario.parse(
        "name=24gb-l4,gpus=1,compile=1,dynamic=1,fp8=1,memory_cap_gib=23.5,"
        "text_encoder=offload,vae_tiling=1,max_pixels=1048576,lora=lightning-4"
    )
    model = load_config(app_config(sc, steps=4)["args"], environ={}).model
    assert fuses_on_arrival(model) and model.model_ids == [run.LORA_ID]
