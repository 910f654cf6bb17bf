"""The ingress's request logic: an edit form in, the OpenAI answer out; readiness and models.

`EditService.edit` validates the request (`validation`), decodes the images, builds the
`EditJob`, calls the model through `ModelClient` and renders the answer (`responses`). It knows
nothing of HTTP: the routes hand it a parsed form and write what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from serve_app.common.config import AppConfig, has_random_weights
from serve_app.common.errors import APIError, ServiceUnavailableError
from serve_app.common.jobs import EditJob, ModelInfo
from serve_app.common.metrics import IngressMetrics, NullMetrics
from serve_app.common.sizing import resolve_size
from serve_app.common.timing import StageClock
from serve_app.ingress.forms import EditForm
from serve_app.ingress.imaging import decode_image
from serve_app.ingress.masking import decode_mask
from serve_app.ingress.model_client import ModelClient, ModelHandle
from serve_app.ingress.protocol import ModelCard, ModelList
from serve_app.ingress.responses import event_stream_body, json_body
from serve_app.ingress.storage import open_image_store
from serve_app.ingress.stored_images import ImageStorage
from serve_app.ingress.tokens import tokenizer_for
from serve_app.ingress.validation import EditRequest, validate_edit

logger = logging.getLogger("ray.serve")

_SEED_SPACE = 2**63  # what a request's `seed` may be
# Seeds the server picks stay exact in every JSON parser (JavaScript numbers: 53 bits), so any
# client can send back what it got; room is left for seed + i, i < n.
_CHOSEN_SEEDS = 2**53 - 16


class EditService:
    """Validates requests, calls the model, encodes results."""

    def __init__(
        self,
        *,
        model: ModelHandle,
        config: AppConfig,
        clock: Callable[[], float] = time.time,
        store: ImageStorage | None = None,
        metrics: IngressMetrics | None = None,
        model_healthy: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._model = ModelClient(
            model, retry_after_s=config.retry_after_s, request_timeout_s=config.request_timeout_s
        )
        self._config = config
        self._clock = clock
        self.metrics: IngressMetrics = metrics if metrics is not None else NullMetrics()
        self._model_healthy = model_healthy
        self._info: ModelInfo | None = None
        self._created = int(clock())
        self._store = store  # made on first use: url results and GET /v1/images/{id}

    @property
    def config(self) -> AppConfig:
        return self._config

    def image_store(self) -> ImageStorage:
        if self._store is None:
            self._store = open_image_store(
                self._config.storage, clock=self._clock, retry_after_s=self._config.retry_after_s
            )
        return self._store

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            await self._remember(await self._model.info())
        assert self._info is not None
        return self._info

    async def _remember(self, info: ModelInfo) -> None:
        # The model's tokenizer is parsed here, off the event loop, once.
        if await asyncio.to_thread(tokenizer_for, info) is None:
            logger.warning(
                "the model shares no tokenizer (ModelInfo.tokenizer_json): prompt limits are"
                " counted in characters only, not in limits.max_prompt_tokens"
            )
        self._info = info

    async def ready(self) -> dict[str, Any]:
        not_ready = ServiceUnavailableError(
            "The model is not loaded yet.", code="model_not_ready", retry_after_s=5
        )
        # A replica busy with an edit cannot answer a call (max_ongoing_requests), so once
        # the model has answered us, readiness is Serve's view of its replicas' health.
        if self._info is not None and self._model_healthy is not None:
            if not await self._model_healthy():
                raise not_ready
            info = self._info
        else:
            try:
                info = await asyncio.wait_for(self._model.info(), self._config.ready_timeout_s)
            except (TimeoutError, APIError):
                raise not_ready from None
            await self._remember(info)
        return {
            "status": "ready",
            "model": info.served_names[0],
            "pipeline": info.pipeline_class,
            "source": info.source,
            "device_map": info.device_map,
            # Component or block range -> device -> GiB, as the replica logged it at start.
            "placement": [line for line in info.placement_table.splitlines() if line.strip()],
            # What the speed switches did (compile, quantization, kernels), one line each.
            "speed": info.speed_notes,
            "variant": info.variant,
            "loras": [lora.name for lora in self._config.model.loras],
            # Several GPUs per replica: degrees and, per rank, node, GPU and CFG/Ulysses place.
            "parallel": info.parallel,
            # Extension: the embedded demo model (and synthetic weights) answer noise.
            "random_weights": has_random_weights(info.source),
        }

    async def list_models(self) -> ModelList:
        # Variant and pipeline come from the model replica; listed without them until it answers.
        info = self._info
        if info is None:
            with contextlib.suppress(TimeoutError, APIError):
                info = await asyncio.wait_for(self.model_info(), self._config.ready_timeout_s)
        return ModelList(
            data=[
                ModelCard(id=name, created=self._created, metadata=self._model_metadata(name, info))
                for name in self._config.model.model_ids
            ]
        )

    def _model_metadata(self, model_id: str, info: ModelInfo | None) -> dict[str, Any]:
        steps, cfg = self._config.defaults_for(model_id)
        lora = self._config.model.lora(model_id)
        source = info.source if info else self._config.model.source
        return {
            "base_model": self._config.model.served_name,
            "variant": info.variant if info else None,
            "pipeline": info.pipeline_class if info else None,
            "max_input_images": info.max_input_images if info else None,
            "lora": lora.name if lora else None,
            "lora_scale": lora.scale if lora else None,
            # fused: in the weights (only this id is served); hotswap: switched per request.
            "lora_mode": self._config.model.lora_mode if lora else None,
            "recipe": lora.recipe if lora else None,
            # The scheduler config this id steps with; None: the model folder's own.
            "scheduler": lora.scheduler_config if lora else None,
            "scheduler_base": (
                None
                if lora is None or lora.scheduler_config is None
                else "recipe"
                if lora.recipe
                else "model"
            ),
            "default_steps": steps,
            "default_true_cfg_scale": cfg,
            # Where the weights come from (local, tiny, synthetic); random ones make noise.
            "source": source,
            "random_weights": has_random_weights(source),
        }

    async def edit(
        self,
        form: EditForm,
        *,
        request_id: str,
        link_base: Callable[[], str] | None = None,
        timing: StageClock | None = None,
    ) -> bytes | AsyncIterator[bytes]:
        """The JSON response body, or for stream=true the SSE body (after its first event).

        `link_base` gives the prefix of `response_format=url` links (it raises when the request
        may not have any); it is called before the model runs. Without it, links are relative.

        `timing` collects the stage durations for the Server-Timing header: the ingress's own
        (decode, model, encode, body) and those the replica reports in `EditOutput.timings_s`.
        """
        timing = timing if timing is not None else StageClock()
        request = await validate_edit(form, config=self._config, model_info=self.model_info)
        params = request.params
        url_base = None
        if params.response_format == "url":
            url_base = link_base() if link_base is not None else ""
        job = await self._make_job(request, request_id=request_id, timing=timing)
        logger.info(
            "edit %s: model=%s images=%d size=%dx%d n=%d steps=%d cfg=%.2f seed=%s",
            request_id, job.model, len(job.images), job.width, job.height, job.n,
            job.num_inference_steps, job.true_cfg_scale, job.seeds[0],
        )  # fmt: skip
        # The seeds go back to a client that sent none, so it can reproduce the images.
        seeds = job.seeds if params.seed is None else None
        if params.stream:
            return event_stream_body(
                await self._model.edit_stream(job),
                params=params,
                size=f"{job.width}x{job.height}",
                clock=self._clock,
                request_id=request_id,
                seed=seeds[0] if seeds else None,
            )
        with timing.measure("model"):
            output = await self._model.edit(job)
        for stage, seconds in output.timings_s.items():  # queue, pipeline (+ parts), replica
            timing.add(stage, seconds)
        self.metrics.images_returned(len(output.images))
        return await asyncio.to_thread(
            json_body,
            params,
            output,
            created=int(self._clock()),
            seeds=seeds,
            store=self.image_store,
            url_base=url_base,
            timing=timing,
        )

    async def _make_job(
        self, request: EditRequest, *, request_id: str, timing: StageClock
    ) -> EditJob:
        """Decode the images (and mask), settle the output size, fill in the defaults."""
        params, limits = request.params, self._config.limits
        form = request.form
        with timing.measure("decode"):
            arrays = await self._decode_all(form.images, param=form.image_field)
        first_h, first_w = arrays[0].shape[:2]
        width, height = resolve_size(
            params.size,
            first_image_wh=(first_w, first_h),
            auto_pixels=self._config.generation.auto_size_pixels,
            limits=limits,
        )
        mask = None
        if form.mask is not None:
            with timing.measure("decode"):
                mask = await asyncio.to_thread(
                    decode_mask,
                    form.mask,
                    image_size=(first_w, first_h),
                    max_pixels=limits.max_input_pixels,
                )
        default_steps, default_cfg = self._config.defaults_for(request.model)
        # Image i uses seed + i, whether the client sent the seed or not: sending back the first
        # returned seed reproduces the whole batch.
        base_seed = params.seed if params.seed is not None else secrets.randbelow(_CHOSEN_SEEDS)
        negative = params.negative_prompt
        if negative is None:
            negative = self._config.generation.negative_prompt
        return EditJob(
            request_id=request_id,
            model=request.model,
            images=arrays,
            prompt=params.prompt,
            negative_prompt=negative
            if negative is not None
            else self._config.generation.negative_prompt,
            true_cfg_scale=(
                params.true_cfg_scale if params.true_cfg_scale is not None else default_cfg
            ),
            num_inference_steps=params.num_inference_steps or default_steps,
            width=width,
            height=height,
            seeds=[(base_seed + i) % _SEED_SPACE for i in range(params.n)],
            partial_images=params.partial_images if params.stream else 0,
            mask=mask,
            # From the request's arrival: its upload counts against the deadline too.
            deadline=self._clock() + self._config.request_timeout_s - timing.elapsed(),
            submitted_at=self._clock(),
        )

    async def _decode_all(self, images: list[bytes], *, param: str) -> list[np.ndarray]:
        limits = self._config.limits
        decode = functools.partial(
            decode_image,
            param=param,
            max_pixels=limits.max_input_pixels,
            max_aspect_ratio=limits.max_input_aspect_ratio,
        )
        # Pillow drops the GIL while it decodes: several images decode on several cores.
        decoded = await asyncio.gather(*(asyncio.to_thread(decode, data) for data in images))
        return list(decoded)
