"""The planned load path on CPU: GPU tables are faked, GPU indices are mapped to "cpu"."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.common.config import GenerationConfig, ModelConfig
from serve_app.common.jobs import EditJob
from serve_app.pipeline.loading.loader import load_runner
from serve_app.pipeline.placement.dispatch import load_local_pipeline
from serve_app.pipeline.placement.measure import component_sizes_from_configs
from serve_app.pipeline.placement.planner import (
    GiB,
    GpuMemory,
    PlacementError,
    plan_placement,
)
from serve_app.pipeline.random_weights import tiny
from serve_app.pipeline.running.profiling import StageTimer
from tests.fixtures import TRUE_CFG, make_job, random_image
from tests.pipeline.placement.test_load_plan import gpus
from tests.pipeline.random_weights.test_synthetic import SHRUNK


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def edit_job(side: int = 64, steps: int = 2, seed: int = 0) -> EditJob:
    return make_job(
        images=[random_image(64, 48, seed)], prompt="make it red", num_inference_steps=steps,
        width=side, height=side, seeds=[seed], **TRUE_CFG,
    )  # fmt: skip


# --- loading ----------------------------------------------------------------------------------


def _tiny_edit(pipe: Any) -> np.ndarray:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = pipe(
        image=[image],
        prompt="make it red",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    return np.asarray(out.images[0])


@pytest.mark.parametrize("fit", ["components", "split"])
def test_local_folder_loads_per_component_as_planned(tiny_dir: pathlib.Path, fit: str) -> None:
    sizes = component_sizes_from_configs(tiny_dir, dtype_bytes=4)
    t, te, vae = (c.weight_bytes for c in sizes)
    if fit == "split":  # the transformer fits neither GPU alone
        table = [
            GpuMemory(0, "fake", GiB, int(0.7 * t)),
            GpuMemory(1, "fake", GiB, int(0.7 * t) + te + vae),
        ]
    else:
        table = [GpuMemory(0, "fake", GiB, te + vae + 2), GpuMemory(1, "fake", GiB, te + vae + 1)]
    placement = plan_placement(sizes, table, activation_headroom_bytes=0, aux_headroom_bytes=0)
    assert placement.strategy == fit
    pipe = load_local_pipeline(
        tiny_dir,
        "QwenImageEditPlusPipeline",
        placement,
        dtype=torch.float32,
        to_device=lambda d: "cpu",
    )
    pipe.set_progress_bar_config(disable=True)
    assert hasattr(pipe.transformer, "_hf_hook") and hasattr(pipe.text_encoder, "_hf_hook")
    if fit == "split":
        assert set(pipe.transformer.hf_device_map) == {n for n, _ in sizes[0].blocks or []}
    reference = tiny.build_tiny_model(tiny_dir)  # same folder: the plain pipeline for comparison
    from diffusers import QwenImageEditPlusPipeline

    plain = QwenImageEditPlusPipeline.from_pretrained(reference, dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_tiny_edit(pipe), _tiny_edit(plain), atol=1e-5)


@pytest.mark.parametrize("fit", ["single", "split"])
def test_eight_bit_layers_are_quantized_as_they_arrive(
    tiny_dir: pathlib.Path, fit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each layer the config loads in 8 bits is handed to the quantizer on its device (the
    quantizer is faked: torchao runs in tests/gpu), the rest of the component follows."""
    import serve_app.pipeline.speed.quantization as quantization
    from serve_app.pipeline.placement.load_plan import eight_bit_for

    handed: list[str] = []
    monkeypatch.setattr(quantization, "quantize_linear", lambda module, kind: handed.append(kind))
    cfg = ModelConfig(
        source="synthetic",
        quantization="fp8",
        quantize_at_load=True,
        compile=True,
        text_encoder="int8",
    )
    eight_bit = eight_bit_for(cfg)
    sizes = component_sizes_from_configs(tiny_dir, dtype_bytes=4, eight_bit=eight_bit)
    t, te, vae = (c.weight_bytes for c in sizes)
    if fit == "split":
        # The tiny text encoder outweighs its transformer: it leaves no room for all of it.
        table = [
            GpuMemory(0, "fake", GiB, int(0.7 * t)),
            GpuMemory(1, "fake", GiB, int(0.9 * t) + te),
        ]
    else:
        table = [GpuMemory(0, "fake", GiB, t + te + vae)]
    placement = plan_placement(sizes, table, activation_headroom_bytes=0, aux_headroom_bytes=0)
    assert placement.strategy == fit
    pipe = load_local_pipeline(
        tiny_dir,
        "QwenImageEditPlusPipeline",
        placement,
        dtype=torch.float32,
        to_device=lambda d: "cpu",
        eight_bit=eight_bit,
    )
    expected = [
        eight_bit(name, m, fqn)
        for name in ("transformer", "text_encoder")
        for fqn, m in getattr(pipe, name).named_modules()
    ]
    assert sorted(handed) == sorted(k for k in expected if k is not None)
    assert {"fp8", "int8"} <= set(handed)


def test_local_source_with_two_gpus_plans_and_reports_what_is_missing(
    tiny_dir: pathlib.Path,
) -> None:
    cfg = ModelConfig(source="local", path=str(tiny_dir), device_map="auto")
    with pytest.raises(PlacementError, match="must sit on one GPU"):
        load_runner(cfg, GenerationConfig(), gpu_probe=lambda: gpus(0.5, 0.5))


def test_synthetic_source_loads_through_the_planner_on_cpu(tiny_dir: pathlib.Path) -> None:
    cfg = ModelConfig(
        source="synthetic",
        synthetic_variant="2511",
        path=str(tiny_dir),  # tokenizer source
        device_map="cpu",
        synthetic_overrides=SHRUNK,
        warmup=True,
        attention_backend="native",
    )
    runner = load_runner(cfg, GenerationConfig(auto_size_pixels=64 * 64))
    assert runner.info.source == "synthetic"
    assert runner.info.device_map == {"transformer": "cpu", "text_encoder": "cpu", "vae": "cpu"}
    assert "placement strategy: single" in runner.info.placement_table
    assert "attention backend: native" in runner.info.speed_notes
    assert "attention backend" not in runner.info.placement_table  # the table only
    out = runner.run(edit_job())
    assert out.images[0].shape == (64, 64, 3)
    assert {"pipeline", "text_encoder", "vae_encode", "vae_decode", "denoise"} <= set(out.timings_s)
    assert out.timings_s["denoise"] <= out.timings_s["pipeline"]


def test_strip_inner_hooks_keeps_only_the_top_level_hook() -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_execution_device_hook

    from serve_app.pipeline.placement.dispatch import strip_inner_hooks

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    x = torch.randn(3, 4)
    expected = module(x)
    add_hook_to_module(module, AlignDevicesHook("cpu", io_same_device=True))
    attach_execution_device_hook(module, "cpu")
    assert hasattr(module[0], "_hf_hook") and hasattr(module[1][0], "_hf_hook")
    assert strip_inner_hooks(module)
    assert hasattr(module, "_hf_hook")
    assert not hasattr(module[0], "_hf_hook") and not hasattr(module[1][0], "_hf_hook")
    torch.testing.assert_close(module(x), expected)
    assert not strip_inner_hooks(torch.nn.Linear(2, 2))  # no hooks: nothing to do


# --- stage timer -----------------------------------------------------------------------------


def test_stage_timer_wraps_the_pipeline_stages() -> None:
    class Vae:
        def decode(self, x: int) -> int:
            return x + 1

    class Pipe:
        vae = Vae()

        def encode_prompt(self, x: int) -> int:
            return x * 2

    pipe = Pipe()
    timer = StageTimer.install(pipe)
    assert pipe.encode_prompt(2) == 4 and pipe.vae.decode(1) == 2
    pipe.encode_prompt(1)
    stages = timer.snapshot()
    assert set(stages) == {"text_encoder", "vae_decode"} and all(v >= 0 for v in stages.values())
    timer.reset()
    assert timer.snapshot() == {}


# --- bench helpers (CPU) ----------------------------------------------------------------------


def test_transformer_flops_match_a_count_by_hand() -> None:
    from bench.flops import image_tokens, transformer_flops
    from serve_app.pipeline.random_weights.synthetic import variant_dir

    config = json.loads((variant_dir("2511") / "transformer" / "config.json").read_text())
    assert image_tokens(1024, 1024, references=1) == 8192
    flops = transformer_flops(config, image_tokens=8192, text_tokens=300)
    # The full model by hand: 60 blocks of width 3072 over 8192 + 300 joint tokens; per block
    # the Q/K/V, output and 4x-wide MLP products (24 S D^2) and the attention (4 S^2 D).
    s, d = 8192 + 300, 3072
    assert flops == pytest.approx(60 * (24 * s * d**2 + 4 * s**2 * d), rel=0.01)


def test_bench_scenarios_parse() -> None:
    from bench.run import Scenario

    sc = Scenario.parse("name=cfg2,ranks=2,cfg=2,compile=1,backend=_native_cudnn")
    assert (sc.name, sc.ranks, sc.replicas, sc.compile, sc.cfg) == ("cfg2", 2, 1, True, "2")
    assert sc.mode == "ranks=2(cfg=2,ulysses=auto)+compile+attn=_native_cudnn"
    with pytest.raises(ValueError, match="unknown scenario key"):
        Scenario.parse("name=x,bogus=1")
