"""From a `ModelConfig` to a ready `EditRunner`: resolve the target (GPUs, device map, dtype),
load through the source's loader (`sources`), then LoRAs, hooks, speed switches and warm-up."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from serve_app.common.config import GenerationConfig, ModelConfig
from serve_app.common.jobs import EditJob
from serve_app.common.sizing import square_side
from serve_app.pipeline.loading.lora import hold_loras
from serve_app.pipeline.loading.sources import LOADERS, LoadedPipeline, Target
from serve_app.pipeline.parallel.rank import RankHooks
from serve_app.pipeline.placement.dispatch import strip_inner_hooks
from serve_app.pipeline.placement.measure import GpuProbe, probe_gpus
from serve_app.pipeline.running.profiling import StageTimer
from serve_app.pipeline.running.runner import EditRunner
from serve_app.pipeline.speed.switches import apply_speed_switches, compile_text_encoder

logger = logging.getLogger("ray.serve")


def load_runner(
    model: ModelConfig,
    generation: GenerationConfig,
    *,
    gpu_probe: GpuProbe | None = None,
    rank_hooks: RankHooks | None = None,
) -> EditRunner:
    """Load the configured pipeline onto the GPUs this process can see.

    `gpu_probe` returns the visible GPUs' memory (`measure.probe_gpus` by default; tests inject a
    fake table). With the planner (synthetic source; local source with 2+ GPUs and device_map
    auto/balanced) the placement table is logged and kept in `ModelInfo.placement_table`
    (what the speed switches did in `ModelInfo.speed_notes`).
    `rank_hooks`: this process is one rank of a parallel replica (`parallel_engine`); every rank
    loads, compiles and warms up together.
    """
    t0 = time.perf_counter()
    cap_memory_from_env()
    target = resolve_target(model, gpu_probe or probe_gpus)
    loaded = LOADERS[model.source](model, target)
    if rank_hooks is not None:
        rank_hooks.prepare(loaded.pipe)  # context parallelism before quantization and compile
    runner = _finish(loaded, model, generation, rank_hooks=rank_hooks)
    logger.info(
        "loaded %s (%s) in %.1f s; placement:\n%s",
        runner.info.pipeline_class, runner.info.variant, time.perf_counter() - t0,
        "\n".join([runner.info.placement_table, *runner.info.speed_notes]),
    )  # fmt: skip
    if model.warmup if model.warmup is not None else model.compile:
        warm_up(runner, generation, model_ids=_warm_up_ids(model))
    return runner


# Benchmarks emulate a smaller card: the allocator of this process is capped to this many GiB
# per GPU (`torch.cuda.set_per_process_memory_fraction`); the planner sees the cap as free memory.
ENV_MEMORY_CAP_GIB = "QWEN_CUDA_MEMORY_CAP_GIB"


def cap_memory_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """Apply `QWEN_CUDA_MEMORY_CAP_GIB` to every visible GPU; returns the cap, None if unset."""
    value = (os.environ if environ is None else environ).get(ENV_MEMORY_CAP_GIB)
    if not value:
        return None
    import torch

    cap = float(value)
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1024**3 / total), index)
    logger.warning("GPU memory capped at %.2f GiB per GPU (%s)", cap, ENV_MEMORY_CAP_GIB)
    return cap


def _warm_up_ids(model: ModelConfig) -> list[str]:
    """The default id, then each hot-swapped LoRA's (the base model's aliases run the same)."""
    default = model.model_ids[0]
    return [default, *(lora.name for lora in model.loras if lora.name != default)]


def resolve_target(model: ModelConfig, gpu_probe: GpuProbe) -> Target:
    gpus = gpu_probe() if model.device_map != "cpu" else []
    device_map = resolve_device_map(model.device_map, gpu_count=len(gpus))
    if model.quantization != "none" and device_map == "cpu":
        # Fail before loading tens of GiB that could not be quantized anyway.
        from serve_app.pipeline.speed.quantization import QuantizationError

        raise QuantizationError(
            f"quantization {model.quantization} needs GPUs; this replica sees none"
            " (give it ray_actor_options.num_gpus, or set model.quantization: none)"
        )
    return Target(
        gpus=gpus, device_map=device_map, dtype=_dtype(model.dtype, on_gpu=device_map != "cpu")
    )


def resolve_device_map(requested: str, *, gpu_count: int) -> str:
    if requested != "auto":
        return requested
    if gpu_count >= 2:
        return "balanced"
    return "cuda" if gpu_count == 1 else "cpu"


def _dtype(name: str, *, on_gpu: bool) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def _finish(
    loaded: LoadedPipeline,
    model: ModelConfig,
    generation: GenerationConfig,
    *,
    rank_hooks: RankHooks | None = None,
) -> EditRunner:
    """LoRAs, hooks, speed switches, stage timers; then the runner."""
    pipe = loaded.pipe
    pipe.set_progress_bar_config(disable=True)
    # LoRAs before fp8 and compile: fused weights are what gets quantized, and the compiled
    # blocks see plain linears whichever LoRA is switched in. (Fused as the layers were loaded,
    # with quantize_at_load: nothing left to do.)
    hotswap = None if loaded.lora_fused else hold_loras(pipe, model)
    # Whole-GPU components need only their top-level accelerate hook (see strip_inner_hooks).
    for module in (loaded.transformer, pipe.text_encoder, pipe.vae):
        strip_inner_hooks(module)
    notes = apply_speed_switches(
        loaded.transformer, model, schedule=lambda: getattr(pipe.scheduler, "timesteps", None)
    )
    if model.compile_text_encoder:
        notes.append(compile_text_encoder(pipe.text_encoder))
    if model.vae_tiling:
        pipe.vae.enable_tiling()  # a fixed VAE peak, whatever the image size
        notes.append("vae: tiled encode and decode")
    if model.text_encoder != "resident":
        notes.append(f"text encoder: {model.text_encoder}")
    if rank_hooks is not None:
        rank_hooks.wrap(pipe)
        notes.append(
            f"parallel: {rank_hooks.group.plan.describe()}, this is rank {rank_hooks.rank}"
        )
    return EditRunner(
        pipe,
        model=model,
        generation=generation,
        device_map=loaded.device_map,
        placement_table=loaded.table,
        speed_notes=notes,
        stage_timer=StageTimer.install(pipe),
        rank_hooks=rank_hooks,
        hotswap=hotswap,
    )


def warm_up(
    runner: EditRunner, generation: GenerationConfig, *, model_ids: Sequence[str] = ()
) -> float:
    """One small true-CFG edit (2 steps) per model id at the default size with one reference of
    that size, so compilation and CUDA/cuDNN autotuning happen before the replica reports ready,
    and every id's LoRA and scheduler have run once."""
    side = square_side(generation.auto_size_pixels)
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for model_id in model_ids or runner.info.served_names[:1]:
        job = EditJob(
            request_id="warm-up",
            model=model_id,
            images=[image],
            prompt="warm-up edit",
            negative_prompt=" ",
            true_cfg_scale=4.0,
            num_inference_steps=2,
            width=side,
            height=side,
            seeds=[0],
        )
        try:
            runner.run(job)
        except Exception:
            logger.exception("warm-up edit (%s) failed; the replica cannot start", model_id)
            raise
    elapsed = time.perf_counter() - t0
    logger.info("warm-up edits (%dx%d, 2 steps, true CFG) took %.1f s", side, side, elapsed)
    return elapsed
