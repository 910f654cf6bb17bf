"""Qwen-Image-Edit, -2509 and -2511 folders: identified from config, served by the real runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.pipeline.random_weights.tiny import _is_complete
from serve_app.pipeline.running.variants import (
    EDIT,
    EDIT_2509,
    EDIT_2511,
    detect_variant,
    variant_from_config,
)
from tests.fixtures import make_job, red_left
from tests.pipeline.conftest import TinyModels, final_latents, make_runner

EXPECTED = {
    "edit": (EDIT, "QwenImageEditPipeline", 1, False),
    "2509": (EDIT_2509, "QwenImageEditPlusPipeline", 3, False),
    "2511": (EDIT_2511, "QwenImageEditPlusPipeline", 3, True),
}


@pytest.mark.parametrize("variant", ["edit", "2509", "2511"])
def test_each_variant_is_detected_loaded_and_runs(tiny_models: TinyModels, variant: str) -> None:
    name, pipeline_class, max_images, zero_cond_t = EXPECTED[variant]
    folder = tiny_models(variant)
    detected = detect_variant(folder)
    assert (detected.name, detected.pipeline_class, detected.zero_cond_t) == (
        name, pipeline_class, zero_cond_t,
    )  # fmt: skip

    runner = make_runner(folder)
    assert runner.info.variant == name
    assert runner.info.pipeline_class == pipeline_class
    assert runner.info.max_input_images == max_images
    assert bool(runner.pipe.transformer.config.zero_cond_t) is zero_cond_t

    images = [red_left(), red_left(32, 32)][:max_images]  # Plus: two references, Edit: one
    tokens: list[int] = []
    hook = runner.pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        out = runner.run(make_job(images=images, width=48, height=32))
    finally:
        hook.remove()
    assert len(out.images) == 1 and out.images[0].shape == (32, 48, 3)
    # The usage it reports is what the transformer was given: output and reference tokens.
    assert out.output_image_tokens == 3 * 2
    assert set(tokens) == {out.output_image_tokens + out.input_image_tokens}
    again = runner.run(make_job(images=images, width=48, height=32))
    assert np.array_equal(out.images[0], again.images[0])  # same seed, same bytes


def test_zero_cond_t_and_template_change_the_result(tiny_models: TinyModels) -> None:
    # The three folders hold the same weights (same seed): only the class and zero_cond_t
    # differ, so different latents show each variant's own code path really runs.
    latents = {
        variant: final_latents(make_runner(tiny_models(variant)))
        for variant in ("edit", "2509", "2511")
    }
    assert torch.allclose(latents["2509"], final_latents(make_runner(tiny_models("2509"))))
    assert (latents["2509"] - latents["2511"]).abs().max() > 1e-3  # zero_cond_t
    assert (latents["2509"] - latents["edit"]).abs().max() > 1e-3  # prompt template / class


def test_variant_from_config_rules() -> None:
    assert variant_from_config("QwenImageEditPlusPipeline", {}).name == EDIT_2509
    assert variant_from_config("QwenImageEditPlusPipeline", {"zero_cond_t": True}).name == EDIT_2511
    assert variant_from_config("QwenImageEditPipeline", {}).max_input_images == 1
    with pytest.raises(ValueError, match="QwenImagePipeline"):
        variant_from_config("QwenImagePipeline", {})


def test_detect_variant_reads_only_config_files(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "QwenImageEditPlusPipeline"})
    )
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"zero_cond_t": True}))
    assert detect_variant(tmp_path).name == EDIT_2511


def test_tiny_build_marker_records_the_variant(tiny_models: TinyModels) -> None:
    folder = tiny_models("2511")
    assert _is_complete(folder, 0, "2511")
    assert not _is_complete(folder, 0, "2509")  # a different variant is rebuilt, not reused
