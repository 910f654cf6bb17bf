"""LoRAs as model ids: fused or hot-swapped, each with its recipe's scheduler, equal to the
published recipe written with plain diffusers; the base model untouched by switching."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch

from serve_app.common.config import AppConfig, LoraConfig, ModelConfig
from serve_app.pipeline.loading.hub import ModelSourceError
from serve_app.pipeline.loading.lora import HotSwap, resolve_lora
from serve_app.pipeline.random_weights.tiny import build_tiny_lora
from serve_app.pipeline.running.runner import EditRunner
from tests.fixtures import make_job, red_left
from tests.hub_cache import add_to_hub_cache
from tests.pipeline.conftest import TinyModels, decoded_latents, make_runner

BASE = "qwen-image-edit"
# The published recipe as its authors wrote it (ModelTC/Qwen-Image-Lightning,
# generate_with_diffusers.py), independently of serve_app.common.recipes.
PUBLISHED_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
STEPS = 4  # lightning-4
# What the ingress fills in for a lightning-4 id (its recipe's defaults).
LIGHTNING: dict[str, Any] = {"num_inference_steps": STEPS, "true_cfg_scale": 1.0}


@pytest.fixture(scope="module")
def model_dir(tiny_models: TinyModels) -> Path:
    return tiny_models("2511")


@pytest.fixture(scope="module")
def loras(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs of different ranks."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "l4": build_tiny_lora(model_dir, root / "a", seed=1, rank=4),
        "other": build_tiny_lora(model_dir, root / "b", seed=2, rank=8),
    }


def published_recipe(model_dir: Path, lora: Path, *, steps: int = STEPS) -> tuple[Any, Any]:
    """(latents the VAE decodes, sigmas) of the published recipe run with plain diffusers:
    its scheduler, load_lora_weights, true_cfg_scale 1, the same seed as `make_job`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from PIL import Image

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(PUBLISHED_SCHEDULER)
    pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    with decoded_latents(pipe) as seen, torch.inference_mode():
        pipe(
            image=[Image.fromarray(red_left())],
            prompt="make it blue",
            negative_prompt=" ",
            true_cfg_scale=1.0,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(7),
            height=32,
            width=32,
            output_type="np",
        )
    return seen[0], pipe.scheduler.sigmas.clone()


def served(runner: EditRunner, model: str, **job: Any) -> tuple[Any, Any]:
    """(latents the VAE decodes, sigmas stepped) of one edit through the runner."""
    with decoded_latents(runner.pipe) as seen:
        runner.run(make_job(model=model, **{"negative_prompt": " ", **job}))
    return seen[0], runner.pipe.scheduler.sigmas.clone()


@pytest.fixture(scope="module")
def hotswap(model_dir: Path, loras: dict[str, Path]) -> EditRunner:
    return make_runner(
        model_dir,
        loras=[
            {"name": "l4", "path": str(loras["l4"]), "recipe": "lightning-4"},
            {"name": "other", "path": str(loras["other"]), "scale": 0.5},
        ],
    )


@pytest.fixture(scope="module")
def recipe(model_dir: Path, loras: dict[str, Path]) -> tuple[Any, Any]:
    return published_recipe(model_dir, loras["l4"])


def test_hotswap_equals_the_published_recipe(hotswap: EditRunner, recipe: tuple[Any, Any]) -> None:
    latents, sigmas = served(hotswap, "l4", **LIGHTNING)
    torch.testing.assert_close(sigmas, recipe[1])
    torch.testing.assert_close(latents, recipe[0], rtol=1e-4, atol=1e-5)


def test_fused_equals_the_published_recipe(
    model_dir: Path, loras: dict[str, Path], recipe: tuple[Any, Any]
) -> None:
    runner = make_runner(
        model_dir,
        lora_mode="fused",
        loras=[{"name": "l4", "path": str(loras["l4"]), "recipe": "lightning-4"}],
    )
    assert runner.info.served_names == ["l4"]  # the base model's weights are gone
    latents, sigmas = served(runner, "l4", **LIGHTNING)
    torch.testing.assert_close(sigmas, recipe[1])
    torch.testing.assert_close(latents, recipe[0], rtol=1e-4, atol=1e-5)
    # No adapter layers are left: the LoRA is in the weights.
    assert not any("lora_" in name for name, _ in runner.pipe.transformer.named_parameters())


def test_switching_ids_swaps_lora_and_scheduler_and_gives_the_base_back(
    hotswap: EditRunner, recipe: tuple[Any, Any]
) -> None:
    base, base_sigmas = served(hotswap, BASE, num_inference_steps=STEPS)
    lora, lora_sigmas = served(hotswap, "l4", **LIGHTNING)
    other, _ = served(hotswap, "other", **LIGHTNING)
    base_again, base_sigmas_again = served(hotswap, BASE, num_inference_steps=STEPS)

    assert torch.equal(base, base_again)  # bit for bit: the base weights come back
    assert torch.equal(base_sigmas, base_sigmas_again)
    # The LoRA id stepped through the recipe's sigmas, the base id through its own.
    assert torch.equal(lora_sigmas, recipe[1])
    assert not torch.allclose(base_sigmas, lora_sigmas)
    # Each adapter visibly changes the edit (the test would pass vacuously otherwise).
    assert (lora - base).abs().max() > 0.05
    assert (other - base).abs().max() > 0.05
    assert (other - lora).abs().max() > 0.05


def test_a_lora_without_recipe_keeps_the_model_scheduler(hotswap: EditRunner) -> None:
    served(hotswap, BASE)
    base_scheduler = hotswap.pipe.scheduler
    served(hotswap, "other", true_cfg_scale=1.0)
    assert hotswap.pipe.scheduler is base_scheduler


def test_hotswap_scale_is_the_configured_one(
    model_dir: Path, loras: dict[str, Path], hotswap: EditRunner
) -> None:
    """`other` at scale 0.5, switched in, equals diffusers' own adapter at weight 0.5."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras["other"].parent), adapter_name="other")
    pipe.set_adapters(["other"], [0.5])
    runner = EditRunner(pipe, model=ModelConfig(source="tiny"), generation=_gen(), device_map={})
    want, _ = served(runner, BASE, true_cfg_scale=1.0)
    got, _ = served(hotswap, "other", true_cfg_scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_switching_never_recompiles_the_compiled_blocks(hotswap: EditRunner) -> None:
    """Switching rewrites weights in place, modules and shapes stay: with dynamo told to fail
    on any recompile, each id runs through the blocks compiled by the first edit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    transformer = hotswap.pipe.transformer
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    try:
        served(hotswap, "l4", **LIGHTNING)  # compiled on this first call
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for model in (BASE, "other", "l4", BASE):
                served(hotswap, model, true_cfg_scale=1.0)
    finally:
        for block in transformer.transformer_blocks:
            block._compiled_call_impl = None  # back to eager for the other tests
        torch._dynamo.reset()
    assert graphs >= 1  # the blocks did run compiled
    assert counters["stats"]["unique_graphs"] == graphs


def test_hotswap_leaves_plain_linears_and_keeps_each_adapted_base_aside(
    hotswap: EditRunner,
) -> None:
    """No adapter layers stay in the transformer (fp8 and compile see plain linears); every
    linear either LoRA adapts is held, with its base weight kept aside."""
    swap = hotswap._hotswap
    assert isinstance(swap, HotSwap)
    assert swap.names == ["l4", "other"]
    transformer = hotswap.pipe.transformer
    assert not any("lora_" in name for name, _ in transformer.named_parameters())
    adapted = {name for lin in swap._linears for name, m in transformer.named_modules()
               if m is lin.module}  # fmt: skip
    assert adapted and all(".attn." in name for name in adapted)
    assert swap.linears == len(adapted)
    for lin in swap._linears:
        assert lin.base.data_ptr() != lin.module.weight.data_ptr()  # a copy, not a view


def test_hotswap_gives_the_fused_weights(
    hotswap: EditRunner, model_dir: Path, loras: dict[str, Path]
) -> None:
    """A switched-in LoRA is the weights `lora_mode: fused` builds with diffusers' fuse_lora."""
    fused = make_runner(
        model_dir,
        lora_mode="fused",
        loras=[{"name": "other", "path": str(loras["other"]), "scale": 0.5}],
    )
    served(hotswap, "other", true_cfg_scale=1.0)
    want = dict(fused.pipe.transformer.named_parameters())
    for name, got in hotswap.pipe.transformer.named_parameters():
        torch.testing.assert_close(got, want[name], rtol=1e-5, atol=1e-6)
    served(hotswap, BASE, true_cfg_scale=1.0)
    base = dict(make_runner(model_dir).pipe.transformer.named_parameters())
    for name, got in hotswap.pipe.transformer.named_parameters():
        assert torch.equal(got, base[name]), name


# --- LoRAs by Hugging Face id ---------------------------------------------------------------


def test_a_lora_by_hub_id_loads_from_the_cache(
    model_dir: Path, loras: dict[str, Path], hub_cache: Path
) -> None:
    add_to_hub_cache(loras["l4"].parent, hub_cache, "test-org/tiny-lightning")
    spec = LoraConfig(
        name="l4", path="test-org/tiny-lightning", weight_name=loras["l4"].name, revision="main"
    )
    folder, weight_name = resolve_lora(spec)
    assert Path(folder).is_relative_to(hub_cache) and weight_name == loras["l4"].name
    by_id = make_runner(model_dir, loras=[{**spec.model_dump(), "recipe": "lightning-4"}])
    by_path = make_runner(
        model_dir, loras=[{"name": "l4", "path": str(loras["l4"]), "recipe": "lightning-4"}]
    )
    assert torch.equal(served(by_id, "l4", **LIGHTNING)[0], served(by_path, "l4", **LIGHTNING)[0])


def test_a_hub_lora_needs_its_weight_name(hub_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weight_name"):
        resolve_lora(LoraConfig(name="x", path="test-org/tiny-lightning"))


def test_a_hub_lora_missing_offline_names_the_fix(hub_cache: Path) -> None:
    spec = LoraConfig(name="x", path="org/absent", weight_name="w.safetensors", revision="v1")
    with pytest.raises(ModelSourceError) as caught:
        resolve_lora(spec)
    message = str(caught.value)
    assert "org/absent/w.safetensors" in message
    assert "hf download org/absent w.safetensors --revision v1" in message


def test_a_missing_lora_path_fails_at_load(tiny_models: TinyModels, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        make_runner(tiny_models("2509"), loras=[{"name": "x", "path": str(tmp_path / "nope")}])


def test_lora_applies_to_mask_edits_too(hotswap: EditRunner) -> None:
    # The inpaint pipeline shares the transformer (so the switched weights) and the scheduler.
    mask = np.zeros((40, 48), np.uint8)
    mask[:, :24] = 255
    job: dict[str, Any] = dict(images=[red_left()], mask=mask, negative_prompt=" ")
    with decoded_latents(hotswap.pipe) as seen:
        hotswap.run(make_job(model=BASE, **job))
        hotswap.run(make_job(model="l4", **{**job, **LIGHTNING}))
    assert (seen[0] - seen[1]).abs().max() > 0.05
    assert hotswap._inpaint.scheduler is hotswap.pipe.scheduler


# --- config ---------------------------------------------------------------------------------


def _gen() -> Any:
    from serve_app.common.config import GenerationConfig

    return GenerationConfig()


def config(**model: Any) -> AppConfig:
    return AppConfig.model_validate(
        {"model": {"source": "tiny", **model}, "generation": {"default_steps": 30, "max_steps": 40}}
    )


def test_lora_ids_and_defaults() -> None:
    cfg = config(
        aliases=["alias"],
        loras=[
            {"name": "lightning-4", "path": "/l4", "recipe": "lightning-4"},
            {"name": "lightning-8", "path": "/l8", "recipe": "lightning-8", "default_steps": 6},
            {"name": "style", "path": "/s", "default_steps": 400},
        ],
    )
    assert cfg.model.model_ids == [
        "qwen-image-edit",
        "alias",
        "lightning-4",
        "lightning-8",
        "style",
    ]
    assert cfg.defaults_for("lightning-4") == (4, 1.0)
    assert cfg.defaults_for("lightning-8") == (6, 1.0)  # the entry's own field wins
    assert cfg.defaults_for("style") == (40, 4.0)  # capped at max_steps; CFG as the base
    assert cfg.defaults_for("qwen-image-edit") == (30, 4.0)


def test_a_recipe_carries_its_scheduler_and_fields_override_it() -> None:
    lora = LoraConfig(name="x", path="/x", recipe="lightning-8", scheduler={"shift_terminal": 0.1})
    assert lora.scheduler_config == {**PUBLISHED_SCHEDULER, "shift_terminal": 0.1}
    assert LoraConfig(name="y", path="/y").scheduler_config is None
    assert LoraConfig(name="z", path="/z", scheduler={"shift": 2.0}).scheduler_config == {
        "shift": 2.0
    }


def test_a_fused_lora_is_the_only_model_id() -> None:
    cfg = config(lora_mode="fused", loras=[{"name": "fast", "path": "/f", "recipe": "lightning-4"}])
    assert cfg.model.model_ids == ["fast"]


def test_fp8_combines_with_loras() -> None:
    model = {"device_map": "cuda", "quantization": "fp8", "compile": True}
    assert config(**model, loras=[{"name": "f", "path": "/f"}], lora_mode="fused").model.loras


@pytest.mark.parametrize(
    "model",
    [
        {"loras": [{"name": "qwen-image-edit", "path": "/a"}]},  # clashes with the served name
        {"loras": [{"name": "x", "path": "/a"}, {"name": "x", "path": "/b"}]},
        {"loras": [{"name": "", "path": "/a"}]},
        {"loras": [{"name": "x", "path": "/a", "surprise": 1}]},
        {"loras": [{"name": "x", "path": "/a", "recipe": "lightning-3"}]},
        {"lora_mode": "fused", "loras": []},  # fused folds exactly one
        {"lora_mode": "fused", "loras": [{"name": "x", "path": "/a"}, {"name": "y", "path": "/b"}]},
    ],
)
def test_bad_lora_configs_are_rejected(model: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        config(**model)


# --- fused as each layer loads (quantize_at_load: the one-card configs) ---------------------

ONE_CARD = {"quantization": "fp8", "compile": True, "quantize_at_load": True}


def one_card_fused(lora: Path, **model: Any) -> ModelConfig:
    """A one-card model (8-bit layers made on arrival) serving `lora` fused, its recipe's id."""
    return ModelConfig.model_validate(
        {
            "source": "local",
            "path": "/unused",
            "device_map": "cuda",
            **ONE_CARD,
            "lora_mode": "fused",
            "loras": [{"name": "l4", "path": str(lora), "recipe": "lightning-4"}],
            **model,
        }
    )


def test_fused_on_arrival_is_the_fused_path_quantized_layer_by_layer(
    model_dir: Path, loras: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-card loader (`load_local_pipeline`, each 8-bit layer moved and quantized alone;
    GPUs mapped to the CPU, the quantizer faked: torchao runs in tests/gpu) with the LoRA fused
    on arrival: every layer reaches the quantizer already holding base + B @ A * scale, and the
    transformer and the edit equal `lora_mode: fused` today (diffusers' fuse_lora on the loaded
    weights) BIT FOR BIT: the same product, scale and sum in the same dtype (float32 here; on a
    GPU peft's merge computes in bf16 as `fused_weight` does)."""
    import serve_app.pipeline.speed.quantization as quantization
    from serve_app.pipeline.loading.lora import FuseOnArrival, fuses_on_arrival
    from serve_app.pipeline.placement.dispatch import load_local_pipeline
    from serve_app.pipeline.placement.load_plan import eight_bit_for
    from serve_app.pipeline.placement.measure import (
        build_empty_component,
        component_sizes_from_configs,
    )
    from serve_app.pipeline.placement.planner import GiB, GpuMemory, plan_placement

    handed: dict[int, Any] = {}  # id(module) -> the weight the quantizer was handed
    monkeypatch.setattr(
        quantization,
        "quantize_linear",
        lambda module, kind: handed.setdefault(id(module), module.weight.detach().clone()),
    )
    cfg = one_card_fused(loras["l4"])
    assert fuses_on_arrival(cfg)
    eight_bit = eight_bit_for(cfg)
    sizes = component_sizes_from_configs(model_dir, dtype_bytes=4, eight_bit=eight_bit)
    placement = plan_placement(
        sizes,
        [GpuMemory(0, "fake", GiB, sum(c.weight_bytes for c in sizes))],
        activation_headroom_bytes=0,
        aux_headroom_bytes=0,
    )
    fuse = FuseOnArrival.load(
        cfg, build_empty_component(model_dir, "transformer"), dtype=torch.float32
    )
    pipe = load_local_pipeline(
        model_dir,
        "QwenImageEditPlusPipeline",
        placement,
        dtype=torch.float32,
        to_device=lambda d: "cpu",
        eight_bit=eight_bit,
        on_arrival=fuse,
    )
    fuse.finish(pipe.transformer)
    assert fuse.pending == []

    existing = make_runner(
        model_dir,
        lora_mode="fused",
        loras=[{"name": "l4", "path": str(loras["l4"]), "recipe": "lightning-4"}],
    )
    base = dict(make_runner(model_dir).pipe.transformer.named_parameters())
    want = dict(existing.pipe.transformer.named_parameters())
    modules = dict(pipe.transformer.named_modules())
    adapted = [n for n, got in pipe.transformer.named_parameters() if not torch.equal(got, base[n])]
    assert adapted and all(".attn." in n for n in adapted)  # the LoRA's layers, and only those
    for name, got in pipe.transformer.named_parameters():
        assert torch.equal(got, want[name]), name
    quantized = [n for n, m in modules.items() if id(m) in handed]
    assert any(f"{n}.weight" in adapted for n in quantized)  # fused layers were quantized too
    for name in quantized:  # each handed over fused, not fused after quantizing
        assert torch.equal(handed[id(modules[name])], want[f"{name}.weight"]), name

    # The loader's last steps (`_finish`) as on a GPU, less fp8 and compile (faked / CUDA only):
    # the LoRA is not loaded a second time.
    from serve_app.pipeline.loading.loader import _finish
    from serve_app.pipeline.loading.sources import LoadedPipeline

    on_cpu = cfg.model_copy(update={"quantization": "none", "compile": False})
    loaded = LoadedPipeline(pipe, {}, "", pipe.transformer, lora_fused=True)
    ours = _finish(loaded, on_cpu, _gen())
    assert ours.info.served_names == ["l4"]
    latents, sigmas = served(ours, "l4", **LIGHTNING)
    want_latents, want_sigmas = served(existing, "l4", **LIGHTNING)
    assert torch.equal(sigmas, want_sigmas)
    assert torch.equal(latents, want_latents)


def test_the_synthetic_loader_fuses_each_layer_as_it_is_made(tmp_path: Path) -> None:
    """The synthetic source (the GPU tests' and benchmarks') adds the LoRA to each linear as
    the linear is made: the transformer equals the same synthetic model with the LoRA fused by
    diffusers after loading, bit for bit (float32 on the CPU), and the loader says it fused."""
    from serve_app.pipeline.loading.lora import hold_loras
    from serve_app.pipeline.loading.sources import Target, load_synthetic
    from serve_app.pipeline.random_weights.synthetic import build_synthetic_lora
    from tests.pipeline.random_weights.test_synthetic import SHRUNK

    lora = build_synthetic_lora("2511", tmp_path / "lora", rank=4, overrides=SHRUNK)
    target = Target(gpus=[], device_map="cpu", dtype=torch.float32)
    synthetic = {"source": "synthetic", "synthetic_variant": "2511",
                 "synthetic_overrides": SHRUNK}  # fmt: skip
    # One-card settings on the CPU: past validation (fp8 needs GPUs), the quantizer not reached.
    cfg = one_card_fused(lora, **synthetic).model_copy(update={"device_map": "cpu"})
    loaded = load_synthetic(cfg, target)
    assert loaded.lora_fused

    plain = ModelConfig.model_validate({**synthetic, "device_map": "cpu"})
    existing = load_synthetic(plain, target)
    assert not existing.lora_fused
    fused = ModelConfig.model_validate(
        {**synthetic, "device_map": "cpu", "lora_mode": "fused",
         "loras": [{"name": "l4", "path": str(lora)}]}
    )  # fmt: skip
    base = {n: p.clone() for n, p in existing.transformer.named_parameters()}
    hold_loras(existing.pipe, fused)
    want = dict(existing.transformer.named_parameters())
    changed = 0
    for name, got in loaded.transformer.named_parameters():
        assert torch.equal(got, want[name]), name
        changed += not torch.equal(got, base[name])
    assert changed == 12 * 2  # the 12 attention and feed-forward linears of both blocks


def test_a_lora_of_another_model_fails_on_arrival(model_dir: Path, loras: dict[str, Path]) -> None:
    from serve_app.pipeline.loading.lora import FuseOnArrival
    from serve_app.pipeline.placement.measure import build_empty_component

    fuse = FuseOnArrival.load(
        one_card_fused(loras["l4"]),
        build_empty_component(model_dir, "transformer"),
        dtype=torch.float32,
    )
    with pytest.raises(ValueError, match="not in the transformer"):
        fuse.finish(torch.nn.Module())


def test_one_card_settings_combine_with_a_fused_lora_not_with_hotswap() -> None:
    lora = [{"name": "f", "path": "/f", "recipe": "lightning-4"}]
    model = {"device_map": "cuda", **ONE_CARD, "text_encoder": "offload", "vae_tiling": True}
    cfg = config(**model, loras=lora, lora_mode="fused")
    assert cfg.model.quantize_at_load and cfg.model.model_ids == ["f"]
    with pytest.raises(pydantic.ValidationError, match="lora_mode: fused"):
        config(**model, loras=lora, lora_mode="hotswap")
    # Without LoRAs the default lora_mode (hotswap) is no concern.
    assert config(**model).model.lora_mode == "hotswap"
