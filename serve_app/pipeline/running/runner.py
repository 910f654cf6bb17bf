"""Runs edits on a loaded Qwen-Image-Edit diffusers pipeline: the in-process `Engine`.

This package is the only place that knows diffusers: the model deployment sees `EditRunner`
through the engine contract (`serve_app.engine`: plain `EditJob` in, `EditOutput` out) and
nothing else. `loader.load_runner` builds one from the config.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
import traceback
from typing import Any, Protocol

import numpy as np

from serve_app.common.config import GenerationConfig, ModelConfig
from serve_app.common.errors import InvalidRequestError
from serve_app.common.jobs import EditJob, EditOutput, ModelInfo, PartialImage
from serve_app.common.sizing import SIZE_MULTIPLE, inpaint_size, output_tokens, reference_tokens
from serve_app.engine import (
    EditStopped,
    EngineBroken,
    EngineOutOfMemory,
    MemoryRow,
    PartialSink,
    StepHook,
)
from serve_app.pipeline.parallel.rank import RankHooks
from serve_app.pipeline.running.inpaint import inpaint_pipeline, mask_image
from serve_app.pipeline.running.previews import decode_preview, preview_steps
from serve_app.pipeline.running.profiling import StageTimer
from serve_app.pipeline.running.scheduling import SchedulerSwitch
from serve_app.pipeline.running.variants import variant_of

logger = logging.getLogger("ray.serve")


class ModelSwitch(Protocol):
    """What switches the loaded weights between model ids (loading/lora.py's HotSwap); the
    runner calls it under its lock before each edit."""

    def activate(self, model_id: str | None) -> None: ...


# model_index.json `_class_name` -> how many reference images the pipeline takes.
SUPPORTED_PIPELINES: dict[str, int | None] = {
    "QwenImageEditPipeline": 1,
    "QwenImageEditPlusPipeline": None,  # several; capped by config.max_input_images
}


def _fit(image: np.ndarray, *, width: int, height: int) -> np.ndarray:
    """`image` resized to exactly width x height: for the modes that cannot denoise at the
    requested size (see `_pipeline_for`)."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))


def _reference_tokens(images: list[np.ndarray]) -> int:
    return sum(reference_tokens((a.shape[1], a.shape[0])) for a in images)


def _variant_name(pipe: Any) -> str:
    try:
        return variant_of(pipe).name
    except ValueError:
        return ""  # a pipeline class this server does not know by name


def _tokenizer_json(pipe: Any) -> str | None:
    """The pipeline's text tokenizer as `tokenizers` JSON, for the ingress to count prompts."""
    backend = getattr(getattr(pipe, "tokenizer", None), "backend_tokenizer", None)
    return str(backend.to_str()) if backend is not None else None


class EditRunner:
    """A loaded pipeline; runs one edit at a time (diffusers pipelines are not thread-safe).
    Implements `serve_app.engine.Engine`."""

    def __init__(
        self,
        pipe: Any,
        *,
        model: ModelConfig,
        generation: GenerationConfig,
        device_map: dict[str, str],
        placement_table: str = "",
        speed_notes: list[str] | None = None,
        stage_timer: StageTimer | None = None,
        rank_hooks: RankHooks | None = None,
        hotswap: ModelSwitch | None = None,
    ) -> None:
        self._pipe = pipe
        self._rank = rank_hooks
        self._stage_timer = stage_timer
        self._model = model
        self._generation = generation
        self._lock = threading.Lock()
        self._class_name = type(pipe).__name__
        per_class = SUPPORTED_PIPELINES.get(self._class_name)
        self._max_images = per_class if per_class is not None else model.max_input_images
        multiple = int(pipe.vae_scale_factor) * 2
        if multiple != SIZE_MULTIPLE:
            # The ingress rounds every size to SIZE_MULTIPLE before it sees this replica.
            raise ValueError(
                f"{self._class_name} needs sizes in multiples of {multiple}; this server sizes"
                f" outputs in multiples of {SIZE_MULTIPLE} (the Qwen-Image geometry)"
            )
        self.info = ModelInfo(
            served_names=model.model_ids,
            pipeline_class=self._class_name,
            max_input_images=self._max_images,
            source=model.source,
            device_map=device_map,
            placement_table=placement_table,
            speed_notes=list(speed_notes or []),
            variant=_variant_name(pipe),
            tokenizer_json=_tokenizer_json(pipe),
        )
        # Per model id: the LoRA switched into the weights (None: fused or no LoRAs), the scheduler.
        self._hotswap = hotswap
        self._schedulers = SchedulerSwitch(pipe, model.loras)
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
                raise EngineOutOfMemory(
                    f"out of accelerator memory at {job.width}x{job.height}, n={job.n}"
                ) from None
            except RuntimeError as exc:
                if "CUDA error" in str(exc) or "device-side assert" in str(exc):
                    raise EngineBroken(str(exc)) from exc
                raise

    def check_health(self) -> None:
        """One process: nothing beyond the replica's own checks."""

    def memory_report(self) -> list[MemoryRow]:
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
        self._select_model(job.model)
        pipe, inputs, (work_w, work_h) = self._pipeline_for(job, pil_images)
        schedule: list[int] | None = None  # known once the pipeline has set its timesteps

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            nonlocal schedule
            reason = step_hook(step + 1, job.num_inference_steps) if step_hook else None
            failure: Exception | None = None
            if on_partial is not None and reason is None:
                if schedule is None:
                    schedule = preview_steps(pipe.num_timesteps, job.partial_images)
                if step in schedule:
                    try:
                        preview = decode_preview(
                            pipe, kwargs["latents"], width=work_w, height=work_h
                        )
                        image = _fit(preview, width=job.width, height=job.height)
                        on_partial(PartialImage(index=schedule.index(step), image=image))
                    except Exception as exc:  # the other ranks must still hear that we stop
                        failure, reason = exc, "failed"
            if self._rank is not None:
                reason = self._rank.share_stop(reason)
            if failure is not None:
                raise failure
            if reason == "oom":
                # A rank (maybe another one) ran out of memory in this step: every rank ends the
                # edit here with the same error, and frees its memory as for its own.
                raise torch.OutOfMemoryError("a rank of this replica ran out of accelerator memory")
            if reason is not None:
                raise EditStopped(reason)
            return kwargs

        if self._stage_timer is not None:
            self._stage_timer.reset()
        if self._rank is not None:
            # The pipelines' own rule for true CFG (diffusers' QwenImageEdit*Pipeline.__call__).
            true_cfg = job.true_cfg_scale > 1 and job.negative_prompt is not None
            self._rank.begin_edit(pipe, true_cfg=true_cfg)
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
            input_image_tokens=_reference_tokens(job.images),
            output_image_tokens=job.n * output_tokens((job.width, job.height)),
            timings_s=timings,
            input_images=len(job.images),
        )

    def _select_model(self, model_id: str) -> None:
        """The request's model id: its LoRA in the weights, its scheduler on the pipelines."""
        if self._hotswap is not None:
            self._hotswap.activate(model_id)
        pipes = [p for p in (self._pipe, self._inpaint) if p is not None]
        self._schedulers.activate(model_id, pipes)

    def _pipeline_for(
        self, job: EditJob, pil_images: list[Any]
    ) -> tuple[Any, dict[str, Any], tuple[int, int]]:
        """(pipeline, its image arguments, the (width, height) it denoises at).

        That is the job's size (the ingress rounded it with `serve_app.common.sizing`), except in
        the two modes that cannot denoise at it and whose result `_fit` resizes back: a mask edit
        (the inpaint pipeline ignores height and width and works at ~1 MP of the image's aspect
        ratio) and a Ulysses replica when the image tokens at the job's size do not split evenly
        over its ranks.
        """
        if job.width % SIZE_MULTIPLE or job.height % SIZE_MULTIPLE:
            raise InvalidRequestError(
                f"size {job.width}x{job.height}: each side must be a multiple of {SIZE_MULTIPLE}.",
                param="size",
            )
        if job.mask is None:
            image = pil_images if self._max_images > 1 else pil_images[0]
            width, height = job.width, job.height
            if self._rank is not None:
                # Ulysses splits the image tokens evenly: denoise at a size whose count divides.
                width, height = self._rank.work_size(
                    width, height, reference_tokens=_reference_tokens(job.images)
                )
            return self._pipe, {"image": image, "height": height, "width": width}, (width, height)
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
        return self._inpaint, inputs, inpaint_size(pil_images[0].size)

    def _count_text_tokens(self, prompt: str) -> int:
        tokenizer = getattr(self._pipe, "tokenizer", None)
        if tokenizer is None:
            return 0
        return len(tokenizer(prompt)["input_ids"])
