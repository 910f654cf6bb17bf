"""Loads a Qwen-Image-Edit diffusers pipeline and runs edits on it.

This package is the only place that knows diffusers: the model deployment sees `EditRunner`
(plain `EditJob` in, `EditOutput` out) and nothing else.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.config import GenerationConfig, ModelConfig
from serve_app.errors import InvalidRequestError
from serve_app.jobs import EditJob, EditOutput, ModelInfo
from serve_app.pipeline.inpaint import inpaint_pipeline, inpaint_size, mask_image
from serve_app.pipeline.lora import AdapterSwitch, load_adapters
from serve_app.pipeline.previews import decode_preview, preview_steps
from serve_app.pipeline.profiling import StageTimer
from serve_app.pipeline.variants import variant_of

logger = logging.getLogger("ray.serve")

# model_index.json `_class_name` -> how many reference images the pipeline takes.
SUPPORTED_PIPELINES: dict[str, int | None] = {
    "QwenImageEditPipeline": 1,
    "QwenImageEditPlusPipeline": None,  # several; capped by config.max_input_images
}
# The Plus pipeline encodes each reference at about 1 MP for the VAE.
_VAE_REFERENCE_PIXELS = 1024 * 1024


class EditStopped(Exception):
    """Raised from the step callback to abandon an edit at once."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PipelineOutOfMemory(Exception):
    """The accelerator ran out of memory; the cache was freed and the runner is usable."""


class PipelineBroken(Exception):
    """An unrecoverable device error (e.g. a CUDA fault): the replica must be replaced."""


# Called after each denoising step with (steps done, total); returns a reason to stop or None.
StepHook = Callable[[int, int], str | None]
PartialSink = Callable[[int, np.ndarray], None]  # (partial_image_index, uint8 RGB preview)


def pipeline_class_name(model_dir: str | Path) -> str:
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a diffusers model folder (no model_index.json). Download one"
            " with `hf download Qwen/Qwen-Image-Edit-2509 --local-dir DIR`."
        )
    name = json.loads(index.read_text())["_class_name"]
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{model_dir} holds a {name}; supported: {', '.join(SUPPORTED_PIPELINES)}."
        )
    return str(name)


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


def _vae_reference_tokens(image: np.ndarray, *, multiple: int) -> int:
    h, w = image.shape[:2]
    ratio = w / h
    vw = round(math.sqrt(_VAE_REFERENCE_PIXELS * ratio) / 32) * 32
    vh = round(vw / ratio / 32) * 32
    return (vw // multiple) * (vh // multiple)


def _fit(image: np.ndarray, *, width: int, height: int) -> np.ndarray:
    """`image` at exactly width x height (the inpaint pipeline works at its own size)."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def _variant_name(pipe: Any) -> str:
    try:
        return variant_of(pipe).name
    except ValueError:
        return ""  # a pipeline class this server does not know by name


class EditRunner:
    """A loaded pipeline; runs one edit at a time (diffusers pipelines are not thread-safe)."""

    def __init__(
        self,
        pipe: Any,
        *,
        model: ModelConfig,
        generation: GenerationConfig,
        device_map: dict[str, str],
        placement_table: str = "",
        stage_timer: StageTimer | None = None,
    ) -> None:
        self._pipe = pipe
        self._stage_timer = stage_timer
        self._model = model
        self._generation = generation
        self._lock = threading.Lock()
        self._class_name = type(pipe).__name__
        per_class = SUPPORTED_PIPELINES.get(self._class_name)
        self._max_images = per_class if per_class is not None else model.max_input_images
        self._multiple = int(pipe.vae_scale_factor) * 2
        self.info = ModelInfo(
            served_names=model.served_names,
            pipeline_class=self._class_name,
            max_input_images=self._max_images,
            size_multiple=self._multiple,
            default_steps=generation.default_steps,
            source=model.source,
            device_map=device_map,
            placement_table=placement_table,
            variant=_variant_name(pipe),
        )
        self._adapters = AdapterSwitch(pipe, model.loras)
        self._inpaint: Any = None  # built on the first mask edit, over the same modules

    @property
    def pipe(self) -> Any:
        return self._pipe

    def run(
        self,
        job: EditJob,
        *,
        step_hook: StepHook | None = None,
        on_partial: PartialSink | None = None,
    ) -> EditOutput:
        import torch

        with self._lock:
            try:
                return self._run_locked(job, step_hook, on_partial)
            except torch.OutOfMemoryError as exc:
                # Drop the failed edit's activations so the next request starts clean: the
                # traceback's frames hold them (and would keep them through the exception chain
                # that reaches the caller), so clear those frames before freeing the cache.
                traceback.clear_frames(exc.__traceback__)
                del exc
                gc.collect()
                torch.cuda.empty_cache()
                raise PipelineOutOfMemory(
                    f"out of accelerator memory at {job.width}x{job.height}, n={job.n}"
                ) from None
            except RuntimeError as exc:
                if "CUDA error" in str(exc) or "device-side assert" in str(exc):
                    raise PipelineBroken(str(exc)) from exc
                raise

    def memory_report(self) -> list[tuple[str, int, int]]:
        """(gpu, allocated bytes, peak bytes) for each visible GPU."""
        import torch

        if not torch.cuda.is_available():
            return []
        return [
            (str(i), torch.cuda.memory_allocated(i), torch.cuda.max_memory_allocated(i))
            for i in range(torch.cuda.device_count())
        ]

    def _run_locked(
        self, job: EditJob, step_hook: StepHook | None, on_partial: PartialSink | None = None
    ) -> EditOutput:
        import torch
        from PIL import Image

        t0 = time.perf_counter()
        pil_images = [Image.fromarray(a) for a in job.images]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in job.seeds]
        self._adapters.activate(job.model)
        pipe, inputs, (work_w, work_h) = self._pipeline_for(job, pil_images)
        schedule: list[int] | None = None  # known once the pipeline has set its timesteps

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            nonlocal schedule
            reason = step_hook(step + 1, job.num_inference_steps) if step_hook else None
            if reason is not None:
                raise EditStopped(reason)
            if on_partial is not None:
                if schedule is None:
                    schedule = preview_steps(pipe.num_timesteps, job.partial_images)
                if step in schedule:
                    preview = decode_preview(pipe, kwargs["latents"], width=work_w, height=work_h)
                    on_partial(
                        schedule.index(step), _fit(preview, width=job.width, height=job.height)
                    )
            return kwargs

        if self._stage_timer is not None:
            self._stage_timer.reset()
        from serve_app.pipeline.cfg_parallel import CfgParallelTransformer

        if isinstance(self._pipe.transformer, CfgParallelTransformer):
            self._pipe.transformer.reset()
        with torch.inference_mode():
            result = pipe(
                **inputs,
                prompt=job.prompt,
                negative_prompt=job.negative_prompt,
                true_cfg_scale=job.true_cfg_scale,
                num_inference_steps=job.num_inference_steps,
                num_images_per_prompt=job.n,
                generator=generators,
                output_type="np",
                callback_on_step_end=on_step_end,
            )
        images = [
            _fit(
                np.ascontiguousarray((frame * 255.0).round().clip(0, 255).astype(np.uint8)),
                width=job.width,
                height=job.height,
            )
            for frame in result.images
        ]
        elapsed = time.perf_counter() - t0
        timings = {"pipeline": elapsed}
        if self._stage_timer is not None:
            stages = self._stage_timer.snapshot()
            timings.update(stages)
            timings["denoise"] = max(0.0, elapsed - sum(stages.values()))
        # One parseable line per edit (bench/run.py reads it from the replica log).
        logger.info(
            "edit %s timings %s",
            job.request_id,
            json.dumps({k: round(v, 4) for k, v in timings.items()}, sort_keys=True),
        )
        return EditOutput(
            images=images,
            width=job.width,
            height=job.height,
            text_tokens=self._count_text_tokens(job.prompt),
            input_image_tokens=sum(
                _vae_reference_tokens(a, multiple=self._multiple) for a in job.images
            ),
            output_image_tokens=job.n
            * (job.width // self._multiple)
            * (job.height // self._multiple),
            timings_s=timings,
        )

    def _pipeline_for(
        self, job: EditJob, pil_images: list[Any]
    ) -> tuple[Any, dict[str, Any], tuple[int, int]]:
        """(pipeline, its image arguments, the (width, height) it denoises at)."""
        if job.mask is None:
            image = pil_images if self._max_images > 1 else pil_images[0]
            return (
                self._pipe,
                {"image": image, "height": job.height, "width": job.width},
                (job.width, job.height),
            )
        if len(job.images) != 1 or job.mask.shape != job.images[0].shape[:2]:
            raise InvalidRequestError(
                "mask needs exactly one image of the same size.", param="mask"
            )
        if self._inpaint is None:
            self._inpaint = inpaint_pipeline(self._pipe)
        inputs = {
            "image": pil_images[0],
            "mask_image": mask_image(job.mask),
            "strength": self._generation.mask_strength,
        }
        return self._inpaint, inputs, inpaint_size(pil_images[0].size, multiple=self._multiple)

    def _count_text_tokens(self, prompt: str) -> int:
        tokenizer = getattr(self._pipe, "tokenizer", None)
        if tokenizer is None:
            return 0
        return len(tokenizer(prompt)["input_ids"])


def _placement_of(pipe: Any, *, fallback: str) -> dict[str, str]:
    """Component -> device, from diffusers' hf_device_map (a dict, a device string, or None)."""
    hf_map = getattr(pipe, "hf_device_map", None)
    if isinstance(hf_map, dict) and hf_map:
        return {str(k): str(v) for k, v in hf_map.items()}
    device = str(hf_map) if hf_map else fallback
    return {name: device for name in ("transformer", "text_encoder", "vae")}


def load_runner(
    model: ModelConfig,
    generation: GenerationConfig,
    *,
    gpu_probe: Callable[[], list[Any]] | None = None,
) -> EditRunner:
    """Load the configured pipeline onto the GPUs this process can see.

    `gpu_probe` returns the visible GPUs' memory (`loading.probe_gpus` by default; tests inject a
    fake table). With the planner (synthetic source; local source with 2+ GPUs and device_map
    auto/balanced) the placement table is logged and kept in `ModelInfo.placement_table`.
    """
    from serve_app.pipeline.loading import probe_gpus

    t0 = time.perf_counter()
    probe = gpu_probe or probe_gpus
    gpus = probe() if model.device_map != "cpu" else []
    device_map = resolve_device_map(model.device_map, gpu_count=len(gpus))
    dtype = _dtype(model.dtype, on_gpu=device_map != "cpu")
    if model.quantization != "none" and device_map == "cpu":
        # Fail before loading tens of GiB that could not be quantized anyway.
        from serve_app.pipeline.quantization import QuantizationError

        raise QuantizationError(
            f"quantization {model.quantization} needs GPUs; this replica sees none"
            " (give it ray_actor_options.num_gpus, or set model.quantization: none)"
        )
    if model.source == "local" and model.path is not None:
        # A Hugging Face id becomes its snapshot folder (downloaded if missing) from here on.
        from serve_app.pipeline.hub import resolve_model_path

        resolved = resolve_model_path(model.path, revision=model.revision)
        model = model.model_copy(update={"path": str(resolved)})
    if model.source == "synthetic":
        return _load_planned(model, generation, gpus, device_map, dtype, t0)
    if model.source == "tiny":
        from serve_app.pipeline.tiny import ensure_tiny_model

        path = ensure_tiny_model(model.path, variant=model.tiny_variant)
        logger.warning(
            "!!! SERVING THE EMBEDDED TINY MODEL WITH RANDOM WEIGHTS (%s): outputs are noise."
            " Set model.source=local and model.path (or QWEN_MODEL_DIR) for real edits. !!!",
            path,
        )
    else:
        assert model.path is not None
        path = Path(model.path)
        if len(gpus) >= 2 and device_map == "balanced":
            return _load_planned(model, generation, gpus, device_map, dtype, t0)
    class_name = pipeline_class_name(path)
    logger.info(
        "loading %s from %s: device_map=%s dtype=%s visible GPUs=%d",
        class_name, path, device_map, dtype, len(gpus),
    )  # fmt: skip
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    pipe = pipeline_cls.from_pretrained(str(path), dtype=dtype, device_map=device_map)
    placement = _placement_of(pipe, fallback=device_map)
    table = "\n".join(f"  {name:<14} -> {dev}" for name, dev in placement.items())
    return _finish(pipe, model, generation, placement, table, t0, transformers=None)


def _load_planned(
    model: ModelConfig,
    generation: GenerationConfig,
    gpus: list[Any],
    device_map: str,
    dtype: Any,
    t0: float,
) -> EditRunner:
    """Synthetic or local weights through the placement planner (see `loading`)."""
    from serve_app.pipeline.cfg_parallel import CfgParallelTransformer, replicate_module
    from serve_app.pipeline.loading import device_labels, load_local_pipeline, plan_load
    from serve_app.pipeline.placement import PlacementError, component_sizes_from_configs

    if device_map == "cpu":
        gpus = []
    elif device_map == "cuda":
        gpus = gpus[:1]
    dtype_bytes = dtype.itemsize
    if model.source == "synthetic":
        from serve_app.pipeline.synthetic import synthetic_component_sizes

        sizes = synthetic_component_sizes(
            model.synthetic_variant, dtype_bytes=dtype_bytes, overrides=model.synthetic_overrides
        )
        what = f"synthetic Qwen-Image-Edit-{model.synthetic_variant} (random weights)"
    else:
        assert model.path is not None
        sizes = component_sizes_from_configs(model.path, dtype_bytes=dtype_bytes)
        what = str(model.path)
    try:
        plan = plan_load(model, sizes, gpus)
    except PlacementError as exc:
        logger.error("cannot place %s on this replica's GPUs: %s", what, exc)
        raise
    table = plan.table()
    logger.info("placement of %s (%s, visible GPUs %d):\n%s", what, dtype, len(gpus), table)
    if model.source == "synthetic":
        from serve_app.pipeline.synthetic import build_synthetic_pipeline

        logger.warning(
            "!!! SYNTHETIC MODEL: real architecture, RANDOM WEIGHTS: outputs are noise"
            " (benchmarks and GPU tests only). !!!"
        )
        pipe: Any = build_synthetic_pipeline(
            model.synthetic_variant,
            placement=plan.placement,
            dtype=dtype,
            tokenizer_source=_synthetic_tokenizer_source(model.path),
            overrides=model.synthetic_overrides,
        )
    else:
        assert model.path is not None
        pipe = load_local_pipeline(
            model.path, pipeline_class_name(model.path), plan.placement, dtype=dtype
        )
    copies = [pipe.transformer]
    if plan.uncond_device is not None and model.loras:
        # Adapters are switched on one module; a second copy would not follow them.
        logger.warning("cfg_parallel is off: it does not combine with LoRAs yet")
    elif plan.uncond_device is not None:
        t1 = time.perf_counter()
        copy = replicate_module(pipe.transformer, plan.uncond_device)
        copies.append(copy)
        pipe.transformer = CfgParallelTransformer(pipe.transformer, copy)
        logger.info(
            "cfg_parallel: transformer copied to cuda:%d in %.1f s",
            plan.uncond_device, time.perf_counter() - t1,
        )  # fmt: skip
    return _finish(pipe, model, generation, device_labels(plan), table, t0, transformers=copies)


def _synthetic_tokenizer_source(path: str | None) -> Path:
    """A folder with `tokenizer/` (e.g. a downloaded model's), else the embedded tiny model's
    (built on first use): its BPE, trained on the pipeline's prompt template, gives about the real
    Qwen tokenizer's text-token count (~220 for a short prompt and one reference)."""
    if path is not None and (Path(path) / "tokenizer").is_dir():
        return Path(path)
    from serve_app.pipeline.tiny import ensure_tiny_model

    return ensure_tiny_model(path)


def _finish(
    pipe: Any,
    model: ModelConfig,
    generation: GenerationConfig,
    placement: dict[str, str],
    table: str,
    t0: float,
    *,
    transformers: list[Any] | None,
) -> EditRunner:
    """Speed switches, stage timers, optional warm-up edit; then the runner is ready."""
    from serve_app.pipeline.loading import strip_inner_hooks

    pipe.set_progress_bar_config(disable=True)
    # LoRAs before compile: the compiled blocks then see the adapter layers from the start.
    load_adapters(pipe, model.loras)
    copies = transformers if transformers is not None else [pipe.transformer]
    # Whole-GPU components need only their top-level accelerate hook (see strip_inner_hooks).
    for module in [*copies, pipe.text_encoder, pipe.vae]:
        strip_inner_hooks(module)
    notes = apply_speed_switches(copies, model)
    if notes:
        table = "\n".join([table, *notes])
    runner = EditRunner(
        pipe,
        model=model,
        generation=generation,
        device_map=placement,
        placement_table=table,
        stage_timer=StageTimer.install(pipe),
    )
    logger.info(
        "loaded %s (%s) in %.1f s; placement:\n%s",
        runner.info.pipeline_class, _variant_name(pipe), time.perf_counter() - t0, table,
    )  # fmt: skip
    if model.warmup if model.warmup is not None else model.compile:
        warm_up(runner, generation)
    return runner


def find_cxx_compiler(
    *,
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> str | None:
    """The C++ compiler inductor's C++ wrapper would build with, or None.

    Inductor (torch._inductor.config.cpp.cxx on Linux) takes $CXX, else g++; it looks for no
    other name, so neither do we.
    """
    env = os.environ if environ is None else environ
    return which(env.get("CXX") or "g++")


def apply_speed_switches(
    transformers: list[Any],
    model: ModelConfig,
    *,
    find_cxx: Callable[[], str | None] = find_cxx_compiler,
) -> list[str]:
    """Quantization, attention backend, then regional compile (which must see the quantized
    layers), on every transformer copy; returns log notes. `find_cxx` finds the C++ compiler
    (tests inject one)."""
    from serve_app.pipeline.quantization import quantize_transformer
    from serve_app.pipeline.rope import install_real_rope

    notes = []
    reports = [quantize_transformer(t, model.quantization) for t in transformers]
    if reports and reports[0] is not None:
        copies = f", each of {len(reports)} copies" if len(reports) > 1 else ""
        notes.append(reports[0].note() + copies)
    if model.attention_backend:
        for transformer in transformers:
            transformer.set_attention_backend(model.attention_backend)
        notes.append(f"attention backend: {model.attention_backend}")
    if model.compile:
        if any(hasattr(m, "_hf_hook") and _spans_devices(m) for m in transformers):
            notes.append("compile skipped: the transformer is split across GPUs")
            if model.quantization != "none":
                notes.append(f"warning: {model.quantization} without compile is slower than bf16")
        else:
            if install_real_rope():
                notes.append("rotary embedding: real arithmetic (fused by compile)")
            if model.compile_cpp_wrapper and find_cxx() is None:
                # A speed switch only (docs/gpu.md): serve without it rather than fail mid-compile.
                notes.append(
                    "warning: compile_cpp_wrapper is OFF: no C++ compiler (inductor looks for $CXX,"
                    " else g++). Install g++ (deploy/Dockerfile does) or set CXX to enable it;"
                    " outputs are the same, edits a little slower"
                )
            elif model.compile_cpp_wrapper:
                import torch._inductor.config

                torch._inductor.config.cpp_wrapper = True  # process-wide: one pipeline per replica
                notes.append("compile: inductor C++ wrapper (kernel launches from C++)")
            for transformer in transformers:
                transformer.compile_repeated_blocks(fullgraph=True, dynamic=model.compile_dynamic)
            notes.append(
                f"compile: transformer blocks (fullgraph, dynamic={model.compile_dynamic}),"
                " compiled by the warm-up edit"
            )
    for note in notes:
        logger.log(logging.WARNING if note.startswith("warning") else logging.INFO, "%s", note)
    return notes


def _spans_devices(module: Any) -> bool:
    return len({p.device for p in module.parameters()}) > 1


def warm_up(runner: EditRunner, generation: GenerationConfig) -> float:
    """One small true-CFG edit (2 steps) at the default size with one reference of that size, so
    compilation and CUDA/cuDNN autotuning happen before the replica reports ready."""
    side = max(runner.info.size_multiple, int(math.sqrt(generation.auto_size_pixels)))
    side -= side % runner.info.size_multiple
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    job = EditJob(
        request_id="warm-up",
        model=runner.info.served_names[0],
        images=[image],
        prompt="warm-up edit",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        width=side,
        height=side,
        seeds=[0],
    )
    t0 = time.perf_counter()
    try:
        runner.run(job)
    except Exception:
        logger.exception("warm-up edit failed; the replica cannot start")
        raise
    elapsed = time.perf_counter() - t0
    logger.info("warm-up edit (%dx%d, 2 steps, true CFG) took %.1f s", side, side, elapsed)
    return elapsed
