"""Loads a Qwen-Image-Edit diffusers pipeline and runs edits on it.

This package is the only place that knows diffusers: the model deployment sees `EditRunner`
(plain `EditJob` in, `EditOutput` out) and nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.config import GenerationConfig, ModelConfig
from serve_app.errors import InvalidRequestError
from serve_app.jobs import EditJob, EditOutput, ModelInfo
from serve_app.pipeline.inpaint import inpaint_pipeline, inpaint_size, mask_image
from serve_app.pipeline.lora import AdapterSwitch, load_adapters
from serve_app.pipeline.previews import decode_preview, preview_steps
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
    ) -> None:
        self._pipe = pipe
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
                # Drop the failed edit's activations so the next request starts clean.
                del exc
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
            timings_s={"pipeline": elapsed},
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


def load_runner(model: ModelConfig, generation: GenerationConfig) -> EditRunner:
    """Load the configured pipeline onto the GPUs this process can see."""
    import torch

    gpu_count = torch.cuda.device_count()
    device_map = resolve_device_map(model.device_map, gpu_count=gpu_count)
    dtype = _dtype(model.dtype, on_gpu=device_map != "cpu")
    t0 = time.perf_counter()
    if model.source == "synthetic":
        raise NotImplementedError("the synthetic full-size model source is not wired yet")
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
    class_name = pipeline_class_name(path)
    logger.info(
        "loading %s from %s: device_map=%s dtype=%s visible GPUs=%d",
        class_name, path, device_map, dtype, gpu_count,
    )  # fmt: skip
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    pipe = pipeline_cls.from_pretrained(str(path), dtype=dtype, device_map=device_map)
    pipe.set_progress_bar_config(disable=True)
    load_adapters(pipe, model.loras)
    placement = _placement_of(pipe, fallback=device_map)
    table = "\n".join(f"  {name:<14} -> {dev}" for name, dev in placement.items())
    logger.info(
        "loaded %s (%s) in %.1f s; placement:\n%s",
        class_name, _variant_name(pipe), time.perf_counter() - t0, table,
    )  # fmt: skip
    return EditRunner(
        pipe, model=model, generation=generation, device_map=placement, placement_table=table
    )
