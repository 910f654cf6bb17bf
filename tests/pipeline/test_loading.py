"""The planned load path on CPU: GPU tables are faked, GPU indices are mapped to "cpu"."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import GenerationConfig, ModelConfig
from serve_app.jobs import EditJob
from serve_app.pipeline import tiny
from serve_app.pipeline.cfg_parallel import CfgParallelTransformer, move_to, replicate_module
from serve_app.pipeline.loading import (
    DEFAULT_HEADROOM_PIXELS,
    VAE_HEADROOM_MARGIN,
    LoadPlan,
    device_labels,
    headroom_for,
    load_local_pipeline,
    max_memory_for,
    plan_cfg_parallel,
    plan_load,
    probe_gpus,
)
from serve_app.pipeline.placement import (
    ComponentSize,
    GiB,
    GpuMemory,
    PlacementError,
    component_sizes_from_configs,
    estimate_activation_headroom,
    estimate_vae_headroom,
    plan_placement,
)
from serve_app.pipeline.profiling import StageTimer
from serve_app.pipeline.runner import apply_speed_switches, find_cxx_compiler, load_runner

from .test_synthetic import SHRUNK

# The full-size model's weights (bf16), from the bundled configs.
BLOCKS = [("img_in", 2**20)] + [(f"transformer_blocks.{i}", int(0.634 * GiB)) for i in range(60)]
FULL = [
    ComponentSize("transformer", sum(b for _, b in BLOCKS), BLOCKS),
    ComponentSize("text_encoder", int(15.45 * GiB)),
    ComponentSize("vae", int(0.24 * GiB)),
]


def gpus(*free_gib: float) -> list[GpuMemory]:
    return [GpuMemory(i, "fake", int(80 * GiB), int(f * GiB)) for i, f in enumerate(free_gib)]


def model(**fields: Any) -> ModelConfig:
    return ModelConfig(**{"source": "synthetic", **fields})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def edit_job(side: int = 64, steps: int = 2, seed: int = 0) -> EditJob:
    image = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return EditJob(
        request_id="t",
        model="qwen-image-edit",
        images=[image],
        prompt="make it red",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=steps,
        width=side,
        height=side,
        seeds=[seed],
    )


# --- planning ---------------------------------------------------------------------------------


def test_headroom_defaults_to_the_largest_edit_the_default_limits_accept() -> None:
    cfg = model(max_input_images=3)
    assert headroom_for(cfg) == (
        estimate_activation_headroom(max_pixels=DEFAULT_HEADROOM_PIXELS, num_ref_images=3),
        estimate_vae_headroom(max_pixels=DEFAULT_HEADROOM_PIXELS) + VAE_HEADROOM_MARGIN,
    )
    small = model(headroom_max_pixels=1024 * 1024, headroom_ref_images=1)
    assert headroom_for(small)[0] < headroom_for(cfg)[0]


def test_max_memory_ignores_gpus_the_replica_does_not_see() -> None:
    cfg = model(max_memory_gib={0: 30, 1: 30.5})
    assert max_memory_for(cfg, gpus(80)) == {0: 30 * GiB}
    assert max_memory_for(cfg, gpus(80, 80)) == {0: 30 * GiB, 1: int(30.5 * GiB)}
    assert max_memory_for(model(), gpus(80)) is None


def test_probe_gpus_uses_the_injected_functions() -> None:
    table = probe_gpus(
        device_count=lambda: 2,
        mem_get_info=lambda i: ((10 + i) * GiB, 80 * GiB),
        name_of=lambda i: f"GPU{i}",
    )
    assert table == [
        GpuMemory(0, "GPU0", 80 * GiB, 10 * GiB),
        GpuMemory(1, "GPU1", 80 * GiB, 11 * GiB),
    ]


def test_cfg_parallel_puts_a_copy_on_each_of_two_gpus_and_the_primary_with_the_vae() -> None:
    plan = plan_cfg_parallel(FULL, gpus(78, 78), headroom=2 * GiB, aux_headroom=3 * GiB)
    assert plan is not None and plan.uncond_device is not None
    placement = plan.placement
    primary = placement.device_map["transformer"]
    assert {primary, plan.uncond_device} == {0, 1}
    assert placement.device_map["vae"] == primary
    # Balanced: the text encoder goes with the copy, the VAE with the primary.
    assert placement.device_map["text_encoder"] == plan.uncond_device
    assert placement.bytes_on(0) + placement.bytes_on(1) == 2 * FULL[0].weight_bytes + sum(
        c.weight_bytes for c in FULL[1:]
    )
    table = plan.table()
    assert "uncond copy (cfg_parallel)" in table and "unconditional pass on cuda:" in table


def test_cfg_parallel_needs_room_for_two_copies() -> None:
    assert plan_cfg_parallel(FULL, gpus(40, 40), headroom=2 * GiB, aux_headroom=3 * GiB) is None
    cfg = model(cfg_parallel=True, headroom_max_pixels=1024 * 1024, headroom_ref_images=1)
    plan = plan_load(cfg, FULL, gpus(45, 45))
    assert plan.uncond_device is None and plan.placement.strategy == "components"
    assert any("cfg_parallel off" in n for n in plan.notes)
    assert "cfg_parallel off" in plan.table()
    one = plan_load(cfg, FULL, gpus(80))
    assert one.uncond_device is None and "needs 2 GPUs" in one.notes[0]


def test_plan_load_respects_max_memory_and_raises_when_nothing_fits() -> None:
    cfg = model(
        max_memory_gib={0: 31, 1: 31}, headroom_max_pixels=1024 * 1024, headroom_ref_images=1
    )
    plan = plan_load(cfg, FULL, gpus(78, 78))
    assert plan.placement.strategy == "split"
    assert all(plan.placement.bytes_on(i) <= 31 * GiB for i in (0, 1))
    with pytest.raises(PlacementError, match="must sit on one GPU"):
        plan_load(model(max_memory_gib={0: 20, 1: 20}), FULL, gpus(78, 78))
    offload = plan_load(
        model(max_memory_gib={0: 20, 1: 20}, allow_cpu_offload=True), FULL, gpus(78, 78)
    )
    assert offload.placement.strategy == "cpu_offload"


def test_device_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    cfg = model(headroom_max_pixels=1024 * 1024, headroom_ref_images=1)
    split = plan_load(
        model(
            max_memory_gib={0: 31, 1: 31},
            **cfg.model_dump(include={"headroom_max_pixels", "headroom_ref_images"}),
        ),
        FULL,
        gpus(78, 78),
    )
    labels = device_labels(split)
    assert labels["transformer"] == "cuda:0,cuda:1" and labels["cuda_visible_devices"] == "2,3"
    parallel = plan_cfg_parallel(FULL, gpus(78, 78), headroom=GiB, aux_headroom=GiB)
    assert parallel is not None
    assert device_labels(parallel)["transformer_uncond"] == f"cuda:{parallel.uncond_device}"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cpu = LoadPlan(plan_placement(FULL, [], activation_headroom_bytes=0))
    assert device_labels(cpu) == {"transformer": "cpu", "text_encoder": "cpu", "vae": "cpu"}


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
    assert "attention backend: native" in runner.info.placement_table
    out = runner.run(edit_job())
    assert out.images[0].shape == (64, 64, 3)
    assert {"pipeline", "text_encoder", "vae_encode", "vae_decode", "denoise"} <= set(out.timings_s)
    assert out.timings_s["denoise"] <= out.timings_s["pipeline"]


def test_strip_inner_hooks_keeps_only_the_top_level_hook() -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_execution_device_hook

    from serve_app.pipeline.loading import strip_inner_hooks

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


# --- CFG parallel -----------------------------------------------------------------------------


def test_cfg_parallel_proxy_gives_the_same_edit(tiny_dir: pathlib.Path) -> None:
    from diffusers import QwenImageEditPlusPipeline

    pipe: Any = QwenImageEditPlusPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = _tiny_edit(pipe)
    primary = pipe.transformer
    copy = replicate_module(primary, "cpu")
    assert copy is not primary and all(
        torch.equal(a, b)
        for a, b in zip(primary.state_dict().values(), copy.state_dict().values(), strict=True)
    )
    proxy = CfgParallelTransformer(primary, copy)
    pipe.transformer = proxy
    assert pipe.transformer.config.in_channels == primary.config.in_channels
    np.testing.assert_array_equal(_tiny_edit(pipe), expected)
    # Step 1: uncond launched after cond (inputs prefetched); step 2: on the worker thread.
    assert (proxy.overlapped_calls, proxy.speculative_calls, proxy.serial_calls) == (1, 1, 0)
    assert set(proxy._negative) == {"encoder_hidden_states", "encoder_hidden_states_mask"}
    proxy.reset()
    np.testing.assert_array_equal(_tiny_edit(pipe), expected)
    assert (proxy.overlapped_calls, proxy.speculative_calls) == (2, 2)


def test_cfg_parallel_proxy_routes_by_cache_context() -> None:
    calls: list[tuple[str, Any]] = []

    class Fake(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = {"name": name}

        def cache_context(self, name: str) -> Any:
            import contextlib

            return contextlib.nullcontext()

        def forward(self, **kwargs: Any) -> Any:
            calls.append((self.name, kwargs["encoder_hidden_states"]))
            return (kwargs["hidden_states"] + 1,)

    proxy = CfgParallelTransformer(Fake("a"), Fake("b"))
    hidden, neg = torch.zeros(2), torch.ones(3)
    with proxy.cache_context("cond"):
        proxy(hidden_states=hidden, encoder_hidden_states=torch.zeros(3), img_shapes=[(1, 2, 2)])
    with proxy.cache_context("uncond"):
        out = proxy(hidden_states=hidden, encoder_hidden_states=neg, img_shapes=[(1, 2, 2)])
    assert [c[0] for c in calls] == ["a", "b"] and calls[1][1] is neg  # same device: no copy
    assert torch.equal(out[0], hidden + 1) and proxy.overlapped_calls == 1
    # Next step: the cond call starts the uncond pass on the worker (negative embeddings known).
    step2 = torch.full((2,), 5.0)
    with proxy.cache_context("cond"):
        proxy(hidden_states=step2, encoder_hidden_states=torch.zeros(3), img_shapes=[(1, 2, 2)])
    with proxy.cache_context("uncond"):
        out = proxy(hidden_states=step2, encoder_hidden_states=neg, img_shapes=[(1, 2, 2)])
    assert torch.equal(out[0], step2 + 1) and proxy.speculative_calls == 1 and len(calls) == 4
    assert sorted(c[0] for c in calls[2:]) == ["a", "b"]
    # A speculation whose arguments differ from the real call is discarded and recomputed.
    with proxy.cache_context("cond"):
        proxy(hidden_states=step2, encoder_hidden_states=torch.zeros(3), img_shapes=[(1, 2, 2)])
    other = torch.full((3,), 7.0)
    with proxy.cache_context("uncond"):
        proxy(hidden_states=step2, encoder_hidden_states=other, img_shapes=[(1, 2, 2)])
    assert proxy.speculative_calls == 1 and calls[-1] == ("b", other)
    with proxy.cache_context("uncond"):  # no cond call before it: copied at call time
        proxy(hidden_states=torch.zeros(2), encoder_hidden_states=neg, img_shapes=[])
    assert proxy.serial_calls == 1
    proxy.reset()
    assert proxy._negative == {} and proxy._prefetched is None and proxy._speculative is None


def test_move_to_walks_nested_outputs() -> None:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    value = {
        "a": (torch.zeros(1), [torch.ones(1), 3]),
        "b": Transformer2DModelOutput(sample=torch.zeros(2)),
    }
    moved = move_to(value, torch.device("cpu"))
    assert moved["a"][1][1] == 3 and isinstance(moved["b"], Transformer2DModelOutput)


# --- speed switches, stage timer --------------------------------------------------------------


class FakeTransformer:
    def __init__(self, devices: list[str], hooked: bool = False) -> None:
        self._params = [torch.zeros(1, device="cpu") for _ in devices]
        self._devices = devices
        if hooked:
            self._hf_hook = object()
        self.backend: str | None = None
        self.compiled: dict[str, Any] | None = None

    def parameters(self) -> Any:
        class P:
            def __init__(self, device: str) -> None:
                self.device = device

        return [P(d) for d in self._devices]

    def set_attention_backend(self, name: str) -> None:
        self.backend = name

    def compile_repeated_blocks(self, **kwargs: Any) -> None:
        self.compiled = kwargs


@pytest.fixture
def restore_compile_globals() -> Iterator[None]:
    """apply_speed_switches patches process-wide state (diffusers' RoPE, inductor's config)."""
    import torch._inductor.config

    from serve_app.pipeline.rope import uninstall_real_rope

    cpp_wrapper = torch._inductor.config.cpp_wrapper
    yield
    uninstall_real_rope()
    torch._inductor.config.cpp_wrapper = cpp_wrapper


def test_speed_switches_apply_to_every_copy(restore_compile_globals: None) -> None:
    import torch._inductor.config

    copies = [FakeTransformer(["cuda:0"]), FakeTransformer(["cuda:1"])]
    cfg = model(compile=True, compile_dynamic=True, attention_backend="_native_cudnn")
    notes = apply_speed_switches(copies, cfg)  # type: ignore[arg-type]
    assert all(c.backend == "_native_cudnn" for c in copies)
    assert all(c.compiled == {"fullgraph": True, "dynamic": True} for c in copies)
    assert any("compile" in n for n in notes)
    assert "rotary embedding: real arithmetic (fused by compile)" in notes
    assert not torch._inductor.config.cpp_wrapper


def test_cpp_wrapper_switch_sets_inductor_before_compiling(restore_compile_globals: None) -> None:
    import torch._inductor.config

    seen: list[bool] = []

    class Recording(FakeTransformer):
        def compile_repeated_blocks(self, **kwargs: Any) -> None:
            seen.append(torch._inductor.config.cpp_wrapper)

    cfg = model(compile=True, compile_cpp_wrapper=True)
    notes = apply_speed_switches(
        [Recording(["cuda:0"])],  # type: ignore[list-item]
        cfg,
        find_cxx=lambda: "/usr/bin/g++",
    )
    assert seen == [True]
    assert "compile: inductor C++ wrapper (kernel launches from C++)" in notes


def test_cpp_wrapper_stays_off_without_a_compiler(
    restore_compile_globals: None, caplog: pytest.LogCaptureFixture
) -> None:
    import torch._inductor.config

    seen: list[bool] = []

    class Recording(FakeTransformer):
        def compile_repeated_blocks(self, **kwargs: Any) -> None:
            seen.append(torch._inductor.config.cpp_wrapper)

    cfg = model(compile=True, compile_cpp_wrapper=True)
    with caplog.at_level("WARNING", logger="ray.serve"):
        notes = apply_speed_switches(
            [Recording(["cuda:0"])],  # type: ignore[list-item]
            cfg,
            find_cxx=lambda: None,
        )
    # Still compiled, without the wrapper, and the replica log says why and how to fix it.
    assert seen == [False]
    (warning,) = [n for n in notes if "compile_cpp_wrapper" in n]
    assert "no C++ compiler" in warning and "CXX" in warning and "g++" in warning
    assert any(r.levelname == "WARNING" and "no C++ compiler" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("environ", "found", "expected"),
    [
        ({}, {"g++": "/usr/bin/g++"}, "/usr/bin/g++"),
        (
            {"CXX": "clang++"},
            {"clang++": "/opt/llvm/bin/clang++", "g++": "/usr/bin/g++"},
            "/opt/llvm/bin/clang++",
        ),
        # inductor takes $CXX or g++ and nothing else: c++ / clang++ alone are not used.
        ({}, {"c++": "/usr/bin/c++", "clang++": "/usr/bin/clang++"}, None),
        ({"CXX": "/missing/g++"}, {"g++": "/usr/bin/g++"}, None),
    ],
)
def test_find_cxx_compiler_looks_where_inductor_does(
    environ: dict[str, str], found: dict[str, str], expected: str | None
) -> None:
    assert find_cxx_compiler(environ=environ, which=found.get) == expected


def test_compile_is_skipped_for_a_split_transformer() -> None:
    split = FakeTransformer(["cuda:0", "cuda:1"], hooked=True)
    notes = apply_speed_switches([split], model(compile=True))  # type: ignore[list-item]
    assert split.compiled is None and "compile skipped" in notes[0]
    assert apply_speed_switches([FakeTransformer(["cpu"])], model()) == []  # type: ignore[list-item]


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


def test_transformer_flops_match_the_field_notes_baseline() -> None:
    from bench.flops import image_tokens, transformer_flops
    from serve_app.pipeline.synthetic import variant_dir

    config = json.loads((variant_dir("2511") / "transformer" / "config.json").read_text())
    assert image_tokens(1024, 1024, references=1) == 8192
    flops = transformer_flops(config, image_tokens=8192, text_tokens=300)
    # Field notes: 402 ms per forward = 419 TFLOP/s at 8192 + 300 tokens.
    assert flops / 0.402 / 1e12 == pytest.approx(419, rel=0.01)


def test_bench_scenarios_parse() -> None:
    from bench.run import Scenario

    sc = Scenario.parse("name=cfg2,gpus=2,replicas=1,compile=1,cfg=1,backend=_native_cudnn")
    assert (sc.name, sc.gpus, sc.replicas, sc.compile, sc.cfg) == ("cfg2", 2, 1, True, True)
    assert sc.mode == "cfg_parallel+compile+attn=_native_cudnn"
    with pytest.raises(ValueError, match="unknown scenario key"):
        Scenario.parse("name=x,bogus=1")
