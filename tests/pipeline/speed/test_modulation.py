"""Modulation tables: each block's timestep modulation made once per edit gives diffusers' values.

On CPU in float32 the batched products round like the per-forward ones to ~1e-7; tests/gpu
compares the compiled bf16 forward on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from serve_app.pipeline.running.inpaint import inpaint_pipeline, mask_image
from serve_app.pipeline.running.runner import EditRunner
from serve_app.pipeline.speed.modulation import (
    TabledModulation,
    install_modulation_tables,
    table_rows,
    tables_fit,
    uninstall_modulation_tables,
)
from tests.fixtures import red_left
from tests.pipeline.conftest import TinyModels, make_runner


@pytest.fixture(scope="module", params=["2511", "2509", "edit"])
def runner(request: pytest.FixtureRequest, tiny_models: TinyModels) -> EditRunner:
    return make_runner(tiny_models(request.param))


def schedule_of(runner: EditRunner) -> Any:
    return lambda: runner.pipe.scheduler.timesteps


@pytest.fixture
def linear_calls(runner: EditRunner) -> Iterator[list[int]]:
    """How often the first block's image modulation linear runs."""
    calls = [0]
    linear = runner.pipe.transformer.transformer_blocks[0].img_mod[1]
    handle = linear.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    yield calls
    handle.remove()


def edit(runner: EditRunner, *, steps: int = 3, n: int = 1, seed: int = 7) -> torch.Tensor:
    """The denoised latents of a true-CFG edit (two forwards a step)."""
    with torch.inference_mode():
        return runner.pipe(
            image=Image.fromarray(red_left()),
            prompt="make it blue",
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            num_images_per_prompt=n,
            height=32,
            width=32,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).images


def without_tables(runner: EditRunner, call: Any) -> Any:
    transformer = runner.pipe.transformer
    assert uninstall_modulation_tables(transformer)
    try:
        return call()
    finally:
        assert install_modulation_tables(transformer, schedule_of(runner)) is not None


def test_the_loader_installs_them(runner: EditRunner) -> None:
    block = runner.pipe.transformer.transformer_blocks[0]
    assert type(block.img_mod) is TabledModulation
    assert type(block.txt_mod) is TabledModulation
    assert any(
        "modulation: 2 projections made once per edit" in line for line in runner.info.speed_notes
    )  # one block in the tiny model


@pytest.mark.parametrize("n", [1, 2])
def test_same_latents_and_one_product_per_edit(
    runner: EditRunner, linear_calls: list[int], n: int
) -> None:
    got = edit(runner, steps=3, n=n)
    assert linear_calls[0] == 1  # the table, for all 3 steps x 2 branches
    linear_calls[0] = 0
    want = without_tables(runner, lambda: edit(runner, steps=3, n=n))
    assert linear_calls[0] == 6  # per forward
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_tables_are_remade_for_each_edit(runner: EditRunner, linear_calls: list[int]) -> None:
    first = edit(runner, steps=2)
    second = edit(runner, steps=4)  # another schedule: a table of other timesteps
    assert linear_calls[0] == 2
    torch.testing.assert_close(
        second, without_tables(runner, lambda: edit(runner, steps=4)), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(first, edit(runner, steps=2), rtol=0, atol=0)


def test_inpaint_starts_part_way_down_the_schedule(runner: EditRunner) -> None:
    inpaint = inpaint_pipeline(runner.pipe)  # shares the scheduler and the transformer
    mask = red_left()[..., 0].copy()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return inpaint(
                image=Image.fromarray(red_left()),
                mask_image=mask_image(mask),
                prompt="make it blue",
                negative_prompt=" ",
                true_cfg_scale=4.0,
                strength=0.5,  # the last half of the timesteps only
                num_inference_steps=4,
                output_type="latent",
                generator=torch.Generator().manual_seed(3),
            ).images

    torch.testing.assert_close(run(), without_tables(runner, run), rtol=1e-5, atol=1e-5)


def forward_args(config: Any, timestep: float) -> dict[str, Any]:
    side = 4
    gen = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 2 * side * side, config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, 9, config.joint_attention_dim, generator=gen),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([timestep]),
        "img_shapes": [[(1, side, side), (1, side, side)]],
        "return_dict": False,
    }


def test_a_timestep_off_the_schedule_is_computed_per_forward(
    runner: EditRunner, linear_calls: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    transformer = runner.pipe.transformer
    runner.pipe.scheduler.set_timesteps(4, mu=1.0)  # the schedule has no 0.123
    caplog.set_level(logging.WARNING, logger="ray.serve")
    with torch.inference_mode():
        got = transformer(**forward_args(transformer.config, 0.123))[0]
    assert linear_calls[0] == 1  # diffusers' own path, no table
    assert "not the scheduler's" in caplog.text
    want = without_tables(runner, lambda: transformer(**forward_args(transformer.config, 0.123))[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_without_a_schedule_each_forward_computes_its_own(
    runner: EditRunner, linear_calls: list[int]
) -> None:
    transformer = runner.pipe.transformer
    schedule: list[Any] = [torch.linspace(1000, 0, 5)[:-1]]  # 500 among them
    uninstall_modulation_tables(transformer)
    tables = install_modulation_tables(transformer, lambda: schedule[0])
    assert tables is not None
    try:
        with torch.inference_mode():
            transformer(**forward_args(transformer.config, 0.5))
            assert linear_calls[0] == 1 and tables.active
            schedule[0] = None  # a caller without a pipeline
            got = transformer(**forward_args(transformer.config, 0.5))[0]
        assert linear_calls[0] == 2 and not tables.active
    finally:
        uninstall_modulation_tables(transformer)
        install_modulation_tables(transformer, schedule_of(runner))
    want = without_tables(runner, lambda: transformer(**forward_args(transformer.config, 0.5))[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [None, True])  # None: the shipped default
def test_compiled_blocks_take_tables_of_any_schedule_without_recompiling(
    runner: EditRunner, dynamic: bool | None
) -> None:
    import torch._dynamo

    transformer = runner.pipe.transformer
    want = without_tables(runner, lambda: edit(runner, steps=5))
    torch._dynamo.reset()
    try:
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, backend="eager")
        edit(runner, steps=2)  # compiles (as the warm-up edit does, with 2 steps)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = edit(runner, steps=5)  # a new table of other timesteps, the same graph
    finally:
        for block in transformer.transformer_blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_table_rows_come_in_few_sizes() -> None:
    assert [table_rows(k) for k in (2, 3, 51, 64, 65, 101)] == [64, 64, 64, 64, 128, 128]


def test_uninstall_restores_diffusers_modules(runner: EditRunner) -> None:
    transformer = runner.pipe.transformer
    keys = list(transformer.state_dict())
    assert install_modulation_tables(transformer, schedule_of(runner)) is None  # once only
    assert uninstall_modulation_tables(transformer)
    try:
        block = transformer.transformer_blocks[0]
        assert type(block.img_mod) is torch.nn.Sequential
        assert not hasattr(block.img_mod, "mod_table")
        assert list(transformer.state_dict()) == keys
        assert not uninstall_modulation_tables(transformer)
    finally:
        assert install_modulation_tables(transformer, schedule_of(runner)) is not None
    assert list(transformer.state_dict()) == keys  # tables are not weights


def test_lora_on_the_modulation_is_in_the_table(tiny_models: TinyModels) -> None:
    from peft import LoraConfig

    runner = make_runner(tiny_models("2511"))
    transformer = runner.pipe.transformer
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["img_mod.1", "txt_mod.1"],
                   init_lora_weights=False),
    )  # fmt: skip
    plain = without_tables(runner, lambda: transformer.disable_adapters() or edit(runner))
    transformer.enable_adapters()
    got = edit(runner)
    want = without_tables(runner, lambda: edit(runner))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter changed the edit


def test_what_cannot_take_tables(runner: EditRunner) -> None:
    transformer = runner.pipe.transformer
    assert tables_fit(transformer) is None
    assert tables_fit(torch.nn.Linear(2, 2)) == "not a Qwen-Image transformer"
    block = transformer.transformer_blocks[0]
    block.txt_mod._hf_hook = object()
    try:
        assert tables_fit(transformer) == "accelerate hooks move its weights"
    finally:
        del block.txt_mod._hf_hook
    embed = transformer.time_text_embed
    embed.use_additional_t_cond = True
    try:
        assert tables_fit(transformer) == "its timestep embedding takes another condition"
    finally:
        embed.use_additional_t_cond = False
