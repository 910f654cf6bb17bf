"""LoRAs: loaded once, chosen per request by `model`, the base model untouched afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch

from serve_app.common.config import AppConfig, LoraConfig
from serve_app.pipeline.lora import AdapterSwitch
from serve_app.pipeline.runner import EditRunner
from tests.fixtures import make_job, red_left
from tests.pipeline.conftest import TinyModels, final_latents, make_runner


@pytest.fixture(scope="module")
def runner(tiny_models: TinyModels, tiny_lora: Path) -> EditRunner:
    # One pipeline, three adapters over the same weights file, loaded once.
    loras = [
        {"name": "fast", "path": str(tiny_lora)},
        {"name": "folder", "path": str(tiny_lora.parent), "weight_name": tiny_lora.name},
        {"name": "off", "path": str(tiny_lora), "scale": 0.0},
    ]
    return make_runner(tiny_models("2509"), loras=loras)


@pytest.fixture(scope="module")
def base_latents(runner: EditRunner) -> torch.Tensor:
    runner.run(make_job(model="qwen-image-edit"))
    return final_latents(runner)


def test_selecting_a_lora_changes_the_output_and_base_is_restored(
    runner: EditRunner, base_latents: torch.Tensor
) -> None:
    base = runner.run(make_job(model="qwen-image-edit")).images[0]
    with_lora = runner.run(make_job(model="fast")).images[0]
    lora_latents = final_latents(runner)  # the runner left "fast" active
    base_again = runner.run(make_job(model="qwen-image-edit")).images[0]

    assert not np.array_equal(base, with_lora)
    assert np.array_equal(base, base_again)
    # On latents the effect is large (the tiny VAE hides most of it in the pixels).
    assert (lora_latents - base_latents).abs().max() > 0.05
    assert torch.equal(final_latents(runner), base_latents)


def test_lora_scale_and_folder_form_from_config(
    runner: EditRunner, base_latents: torch.Tensor
) -> None:
    runner.run(make_job(model="off"))
    assert torch.allclose(final_latents(runner), base_latents, atol=1e-6)  # scale 0 = base
    runner.run(make_job(model="folder"))  # folder + weight_name: the same weights as "fast"
    folder_latents = final_latents(runner)
    runner.run(make_job(model="fast"))
    assert (folder_latents - base_latents).abs().max() > 0.05
    assert torch.equal(folder_latents, final_latents(runner))


def test_a_missing_lora_path_fails_at_load(tiny_models: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        make_runner(tiny_models("2509"), loras=[{"name": "x", "path": str(tmp_path / "nope")}])


def test_lora_applies_to_mask_edits_too(runner: EditRunner) -> None:
    # The inpaint pipeline shares the transformer, adapters included.
    mask = np.zeros((40, 48), np.uint8)
    mask[:, :24] = 255
    job: dict[str, Any] = dict(images=[red_left()], mask=mask)
    base = runner.run(make_job(model="qwen-image-edit", **job)).images[0]
    with_lora = runner.run(make_job(model="fast", **job)).images[0]
    assert not np.array_equal(base, with_lora)


# --- the switch, with a recording fake pipeline ---------------------------------------------


class RecordingTransformer:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_on = fail_on

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] == self.fail_on:
            self.fail_on = None
            raise RuntimeError("boom")

    def enable_lora(self) -> None:
        self._record("enable")

    def disable_lora(self) -> None:
        self._record("disable")

    def set_adapters(self, names: list[str], weights: list[float]) -> None:
        self._record("set", names, weights)


class Pipe:
    """A pipeline as AdapterSwitch sees it: the adapters live on its transformer."""

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer


SPECS = [LoraConfig(name="a", path="/x", scale=0.7), LoraConfig(name="b", path="/y")]


def test_switch_enables_before_setting_and_skips_repeats() -> None:
    model = RecordingTransformer()
    switch = AdapterSwitch(Pipe(model), SPECS)
    switch.activate("qwen-image-edit")  # base, and nothing active yet: no call
    switch.activate("a")
    switch.activate("a")
    switch.activate("b")
    switch.activate("qwen-image-edit")
    assert model.calls == [
        ("enable",), ("set", ["a"], [0.7]),
        ("enable",), ("set", ["b"], [1.0]),
        ("disable",),
    ]  # fmt: skip


def test_switch_redoes_a_switch_that_failed_half_way() -> None:
    model = RecordingTransformer(fail_on="set")
    switch = AdapterSwitch(Pipe(model), SPECS)
    with pytest.raises(RuntimeError):
        switch.activate("a")  # enabled, then failed: LoRA state unknown
    switch.activate("qwen-image-edit")
    assert model.calls[-1] == ("disable",)


def test_switch_reaches_the_model_inside_a_parallel_wrapper() -> None:
    """A replica over ranks wraps the transformer (CfgSplitTransformer.inner)."""
    model = RecordingTransformer()

    class Wrapper:
        inner = model

    AdapterSwitch(Pipe(Wrapper()), SPECS).activate("b")
    assert model.calls == [("enable",), ("set", ["b"], [1.0])]


def test_switch_without_loras_never_touches_the_pipeline() -> None:
    model = RecordingTransformer()
    AdapterSwitch(Pipe(model), []).activate("anything")
    assert model.calls == []


# --- config ---------------------------------------------------------------------------------


def config(**model: Any) -> AppConfig:
    return AppConfig.model_validate(
        {"model": {"source": "tiny", **model}, "generation": {"default_steps": 30, "max_steps": 40}}
    )


def test_lora_ids_and_defaults() -> None:
    cfg = config(
        aliases=["alias"],
        loras=[
            {
                "name": "lightning-8",
                "path": "/l8",
                "default_steps": 8,
                "default_true_cfg_scale": 1.0,
            },
            {"name": "style", "path": "/s", "default_steps": 400},
        ],
    )
    assert cfg.model.model_ids == ["qwen-image-edit", "alias", "lightning-8", "style"]
    assert cfg.defaults_for("lightning-8") == (8, 1.0)
    assert cfg.defaults_for("style") == (40, 4.0)  # capped at max_steps; CFG as the base
    assert cfg.defaults_for("qwen-image-edit") == (30, 4.0)


@pytest.mark.parametrize(
    "loras",
    [
        [{"name": "qwen-image-edit", "path": "/a"}],  # clashes with the served name
        [{"name": "x", "path": "/a"}, {"name": "x", "path": "/b"}],
        [{"name": "", "path": "/a"}],
        [{"name": "x", "path": "/a", "surprise": 1}],
    ],
)
def test_bad_lora_configs_are_rejected(loras: list[dict[str, Any]]) -> None:
    with pytest.raises(pydantic.ValidationError):
        config(loras=loras)
