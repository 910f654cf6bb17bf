"""The CPU-only HTTP ingress: OpenAI multipart in, OpenAI JSON out.

`EditService` holds the request logic and talks to the model through a handle-like object
(injected, so unit tests can use a fake); `create_app` is the Starlette app around it;
`Ingress` is the Ray Serve deployment class that wires the two. Nothing here imports torch,
so the ingress can never initialise CUDA on a GPU node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import openapi, playground
from serve_app.auth import ApiKeyChecker, RequireApiKey, load_api_keys
from serve_app.config import AppConfig
from serve_app.errors import (
    APIError,
    InternalError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    TimeoutError_,
    error_body,
    error_for_status,
)
from serve_app.imaging import decode_image, encode_image
from serve_app.jobs import EditJob, EditOutput, ModelInfo
from serve_app.masking import decode_mask
from serve_app.metrics import IngressMetrics, NullMetrics
from serve_app.protocol import (
    IMAGE_FIELDS,
    MASK_FIELD,
    EditParams,
    ImageData,
    ImagesResponse,
    ModelCard,
    ModelList,
    check_limits,
    images_response_json,
)
from serve_app.sizing import parse_size, resolve_size
from serve_app.storage import ID_PATTERN, ImageStore, image_url
from serve_app.streaming import check_stream_params, open_event_stream, usage_of
from serve_app.timing import SERVER_TIMING_HEADER, StageClock, format_server_timing

logger = logging.getLogger("ray.serve")

_MAX_FORM_FIELDS = 64
# Extra time the ingress waits past the model's own deadline before answering 504 itself.
_DEADLINE_GRACE_S = 5.0


class ModelHandle(Protocol):
    """What the ingress needs of the model deployment's DeploymentHandle."""

    @property
    def edit(self) -> Any: ...

    @property
    def info(self) -> Any: ...

    # `options(stream=True).edit_stream.remote(job)`: the streaming edit.
    def options(self, **kwargs: Any) -> Any: ...


def _translate_handle_errors(exc: BaseException, *, retry_after_s: float) -> APIError:
    """Map what a handle call can raise to an APIError (Ray imported lazily for unit tests)."""
    if isinstance(exc, APIError):
        return exc
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover - ray is a hard dependency
        return InternalError("The server failed to process the request.")
    if isinstance(exc, BackPressureError):
        return ServiceUnavailableError(
            "The server is at capacity; retry after the delay in Retry-After.",
            code="server_overloaded",
            retry_after_s=retry_after_s,
        )
    if isinstance(
        exc, ActorDiedError | ActorUnavailableError | RayActorError | DeploymentUnavailableError
    ):
        return ServiceUnavailableError(
            "The model replica became unavailable; retry the request.",
            code="replica_unavailable",
            retry_after_s=retry_after_s,
        )
    return InternalError("The server failed to process the request.")


class EditService:
    """Validates requests, calls the model, encodes results."""

    def __init__(
        self,
        *,
        model: ModelHandle,
        config: AppConfig,
        clock: Callable[[], float] = time.time,
        store: ImageStore | None = None,
        metrics: IngressMetrics | None = None,
        api_keys: list[str] | None = None,
        model_healthy: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._model = model
        self._config = config
        self._clock = clock
        self.metrics: IngressMetrics = metrics if metrics is not None else NullMetrics()
        self.api_keys = ApiKeyChecker(api_keys or [])
        self._model_healthy = model_healthy
        self._info: ModelInfo | None = None
        self._created = int(clock())
        self._store = store  # made on first use: url results and GET /v1/images/{id}

    def image_store(self) -> ImageStore:
        if self._store is None:
            self._store = ImageStore.from_config(self._config.storage, clock=self._clock)
        return self._store

    @property
    def config(self) -> AppConfig:
        return self._config

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = _translate_handle_errors(exc, retry_after_s=self._config.retry_after_s)
            if isinstance(err, InternalError):
                logger.exception("model call failed")
            raise err from None

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self._call(self._model.info.remote())
        return self._info

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
                info = await asyncio.wait_for(
                    self._call(self._model.info.remote()), self._config.ready_timeout_s
                )
            except (TimeoutError, APIError):
                raise not_ready from None
            self._info = info
        return {
            "status": "ready",
            "model": info.served_names[0],
            "pipeline": info.pipeline_class,
            "source": info.source,
            "device_map": info.device_map,
            # Component or block range -> device -> GiB, as the replica logged it at start.
            "placement": info.placement_table.splitlines(),
            "variant": info.variant,
            "loras": [lora.name for lora in self._config.model.loras],
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
        return {
            "base_model": self._config.model.served_name,
            "variant": info.variant if info else None,
            "pipeline": info.pipeline_class if info else None,
            "max_input_images": info.max_input_images if info else None,
            "lora": lora.name if lora else None,
            "lora_scale": lora.scale if lora else None,
            "default_steps": steps,
            "default_true_cfg_scale": cfg,
        }

    def _check_model(self, requested: str | None) -> str:
        names = self._config.model.model_ids
        if requested is None or requested == "":
            return names[0]
        if requested not in names:
            raise InvalidRequestError(
                f"The model '{requested}' does not exist. Available: {', '.join(names)}.",
                param="model",
                code="model_not_found",
            )
        return requested

    async def edit(
        self,
        *,
        fields: Mapping[str, str],
        images: list[bytes],
        mask: bytes | None = None,
        request_id: str,
        base_url: str | None = None,
        timing: StageClock | None = None,
    ) -> bytes | AsyncIterator[bytes]:
        """The JSON response body, or for stream=true the SSE body (after its first event).

        `timing` collects the stage durations for the Server-Timing header: the ingress's own
        (decode, model, encode, body) and those the replica reports in `EditOutput.timings_s`.
        """
        timing = timing if timing is not None else StageClock()
        params = EditParams.from_form(fields)
        check_limits(params, self._config)
        check_stream_params(params)
        model_name = self._check_model(params.model)
        requested_size = parse_size(params.size)
        if not images:
            raise InvalidRequestError(
                "Missing required parameter: 'image'.",
                param="image",
                code="missing_required_parameter",
            )
        if mask is not None and len(images) > 1:
            raise InvalidRequestError(
                f"mask edits take one image (the mask applies to it); got {len(images)} images.",
                param="mask",
                code="unsupported_value",
            )
        info = await self.model_info()
        if len(images) > info.max_input_images:
            raise InvalidRequestError(
                f"{info.pipeline_class} takes at most {info.max_input_images} input image(s);"
                f" got {len(images)}.",
                param="image",
                code="too_many_images",
            )
        with timing.measure("decode"):
            arrays = await self._decode_all(images)
        first_h, first_w = arrays[0].shape[:2]
        width, height = resolve_size(
            requested_size,
            first_image_wh=(first_w, first_h),
            multiple=info.size_multiple,
            auto_pixels=self._config.generation.auto_size_pixels,
            limits=self._config.limits,
        )
        mask_array = None
        if mask is not None:
            with timing.measure("decode"):
                mask_array = await asyncio.to_thread(
                    decode_mask,
                    mask,
                    image_size=(first_w, first_h),
                    max_pixels=self._config.limits.max_input_pixels,
                )
        job = self._make_job(params, model_name, arrays, width, height, request_id, mask_array)
        logger.info(
            "edit %s: model=%s images=%d size=%dx%d n=%d steps=%d cfg=%.2f seed=%s",
            request_id, model_name, len(arrays), width, height, job.n,
            job.num_inference_steps, job.true_cfg_scale, params.seed,
        )  # fmt: skip
        if params.stream:
            stream = self._model.options(stream=True).edit_stream.remote(job)
            return await open_event_stream(
                stream, params=params, job=job, call=self._call, clock=self._clock
            )
        with timing.measure("model"):
            output = await self._run_edit(job)
        for stage, seconds in output.timings_s.items():  # queue, pipeline (+ parts), replica
            timing.add(stage, seconds)
        self.metrics.images_returned(len(output.images))
        url_base = None
        if params.response_format == "url":
            url_base = self._config.storage.public_base_url or base_url or ""
        return await asyncio.to_thread(
            self._build_response, params, output, url_base=url_base, timing=timing
        )

    async def _run_edit(self, job: EditJob) -> EditOutput:
        response = self._model.edit.remote(job)
        timeout = self._config.request_timeout_s + _DEADLINE_GRACE_S
        try:
            output: EditOutput = await asyncio.wait_for(self._call(response), timeout)
        except TimeoutError:
            # The model normally answers 504 itself at the deadline; this covers a request
            # that never reached a replica. Cancelling frees its queue slot.
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()
            raise TimeoutError_(
                f"The edit did not finish within {self._config.request_timeout_s:.0f} s."
            ) from None
        return output

    async def _decode_all(self, images: list[bytes]) -> list[Any]:
        max_pixels = self._config.limits.max_input_pixels
        param = "image" if len(images) == 1 else "image[]"
        # Pillow drops the GIL while it decodes: several images decode on several cores.
        decoded = await asyncio.gather(
            *(
                asyncio.to_thread(decode_image, data, param=param, max_pixels=max_pixels)
                for data in images
            )
        )
        return list(decoded)

    def _make_job(
        self,
        params: EditParams,
        model_name: str,
        arrays: list[Any],
        width: int,
        height: int,
        request_id: str,
        mask: Any = None,
    ) -> EditJob:
        gen = self._config.generation
        default_steps, default_cfg = self._config.defaults_for(model_name)
        if params.seed is not None:
            seeds = [(params.seed + i) % 2**63 for i in range(params.n)]
        else:
            seeds = [secrets.randbits(63) for _ in range(params.n)]
        negative = (
            params.negative_prompt if params.negative_prompt is not None else gen.negative_prompt
        )
        return EditJob(
            request_id=request_id,
            model=model_name,
            images=arrays,
            prompt=params.prompt,
            negative_prompt=negative,
            true_cfg_scale=(
                params.true_cfg_scale if params.true_cfg_scale is not None else default_cfg
            ),
            num_inference_steps=params.num_inference_steps or default_steps,
            width=width,
            height=height,
            seeds=seeds,
            partial_images=params.partial_images if params.stream else 0,
            mask=mask,
            deadline=self._clock() + self._config.request_timeout_s,
            submitted_at=self._clock(),
        )

    def _build_response(
        self,
        params: EditParams,
        output: EditOutput,
        *,
        url_base: str | None = None,
        timing: StageClock | None = None,
    ) -> bytes:
        """The JSON body. Blocking (encodes, and stores for url results): call from a thread."""
        timing = timing if timing is not None else StageClock()
        with timing.measure("encode"):
            encoded = [
                encode_image(
                    image,
                    output_format=params.output_format,
                    compression=params.output_compression,
                )
                for image in output.images
            ]
        with timing.measure("body"):
            return images_response_json(
                self._response_of(params, output, encoded, url_base=url_base)
            )

    def _response_of(
        self, params: EditParams, output: EditOutput, encoded: list[bytes], *, url_base: str | None
    ) -> ImagesResponse:
        import base64

        if url_base is not None:
            store = self.image_store()
            data = [
                ImageData(url=image_url(url_base, store.put(e, output_format=params.output_format)))
                for e in encoded
            ]
        else:
            data = [ImageData(b64_json=base64.b64encode(e).decode("ascii")) for e in encoded]
        return ImagesResponse(
            created=int(self._clock()),
            data=data,
            output_format=params.output_format,
            size=f"{output.width}x{output.height}",
            quality=params.quality,
            background="opaque",
            usage=usage_of(output),
        )


# ---------------------------------------------------------------------------------------
# HTTP layer


def error_response(error: APIError, *, request_id: str | None = None) -> JSONResponse:
    headers = error.headers()
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error_body(error), status_code=error.status_code, headers=headers)


def _request_id(request: Request) -> tuple[str, bool]:
    """The request id, and whether we must echo it (Serve's proxy echoes the ids it sets)."""
    incoming = request.headers.get("x-request-id", "")
    if incoming:
        return incoming[:128], False
    return f"req_{uuid.uuid4().hex}", True


Endpoint = Callable[[Request], Awaitable[Response]]


def _openai_errors(endpoint: Endpoint, *, route: str, metrics: IngressMetrics) -> Endpoint:
    """Every exception leaves an endpoint as OpenAI error JSON, never a traceback."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        request_id, echo = _request_id(request)
        request.state.request_id = request_id
        echo_id = request_id if echo else None
        t0 = time.perf_counter()
        try:
            response = await endpoint(request)
            if echo_id:
                response.headers["x-request-id"] = echo_id
        except APIError as exc:
            if exc.status_code >= 500:
                logger.warning("request %s failed: %s", request_id, exc.message)
            response = error_response(exc, request_id=echo_id)
        except HTTPException as exc:
            err = error_for_status(exc.status_code, str(exc.detail))
            response = error_response(err, request_id=echo_id)
        except Exception:
            logger.exception("request %s failed with an unexpected error", request_id)
            response = error_response(
                InternalError("The server had an error while processing your request."),
                request_id=echo_id,
            )
        metrics.request_done(
            route=route, status=response.status_code, seconds=time.perf_counter() - t0
        )
        return response

    return wrapper


async def _read_form(request: Request) -> tuple[dict[str, str], list[bytes], bytes | None]:
    content_type = request.headers.get("content-type", "")
    # A form without files arrives urlencoded; it then fails as "missing image", naming it.
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidRequestError(
            "Send the edit as multipart/form-data (fields 'image' and 'prompt').",
            code="invalid_content_type",
        )
    try:
        form = await request.form(max_fields=_MAX_FORM_FIELDS, max_files=_MAX_FORM_FIELDS)
    except HTTPException as exc:
        raise InvalidRequestError(
            f"Malformed multipart body: {exc.detail}", code="invalid_multipart"
        ) from None
    try:
        fields: dict[str, str] = {}
        images: list[bytes] = []
        mask: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in IMAGE_FIELDS:
                    images.append(await value.read())
                elif key == MASK_FIELD and mask is None:
                    mask = await value.read()
                continue
            if key in IMAGE_FIELDS:
                raise InvalidRequestError(
                    f"'{key}' must be a file upload, not a text field.", param="image"
                )
            fields.setdefault(key, value)
        return fields, images, mask
    finally:
        await form.close()


def create_app(service: EditService) -> Starlette:
    """The Starlette app serving the OpenAI routes over `service`."""

    def routed(route: str) -> Callable[[Endpoint], Endpoint]:
        return functools.partial(_openai_errors, route=route, metrics=service.metrics)

    @routed("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        timing = StageClock()
        with timing.measure("parse"):
            fields, images, mask = await _read_form(request)
        result = await service.edit(
            fields=fields,
            images=images,
            mask=mask,
            request_id=request.state.request_id,
            base_url=str(request.base_url),
            timing=timing,
        )
        if isinstance(result, bytes):
            # Rendered in the worker thread: a multi-MB body never blocks the event loop.
            timing.add("total", timing.elapsed())
            return Response(
                result,
                media_type="application/json",
                headers={SERVER_TIMING_HEADER: format_server_timing(timing.stages)},
            )
        return StreamingResponse(
            result,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @routed("/v1/images/{image_id}")
    async def get_image(request: Request) -> Response:
        # With API keys on, RequireApiKey guards this route like the others (it is not in
        # auth.open_paths); the ids are unguessable either way.
        image_id = request.path_params["image_id"]
        image = await asyncio.to_thread(service.image_store().get, image_id)
        max_age = max(0, int(image.expires_in_s))
        return Response(
            image.data,
            media_type=image.content_type,
            headers={"Cache-Control": f"private, max-age={max_age}"},
        )

    @routed("/v1/models")
    async def list_models(request: Request) -> Response:
        return JSONResponse((await service.list_models()).model_dump())

    @routed("/v1/models/{model_id}")
    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        for card in (await service.list_models()).data:
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise error_for_status(404, f"The model '{model_id}' does not exist.")

    @routed("/health")
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @routed("/ready")
    async def ready(request: Request) -> Response:
        return JSONResponse(await service.ready())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = (
            f"Unknown route: {request.method} {request.url.path}"
            if exc.status_code == 404
            else str(exc.detail)
        )
        return error_response(error_for_status(exc.status_code, message))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    app = Starlette(
        routes=[
            Route("/v1/images/edits", images_edits, methods=["POST"]),
            Route("/v1/images/{image_id:image_id}", get_image, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            *playground.routes(service.config, auth_enabled=service.api_keys.enabled),
            *openapi.routes(service.config, auth_enabled=service.api_keys.enabled),
        ],
        exception_handlers={HTTPException: http_error, APIError: api_error},
    )
    limit = service.config.limits.max_upload_bytes
    asgi: ASGIApp = BodySizeLimit(app, max_bytes=limit)
    if service.api_keys.enabled:
        asgi = RequireApiKey(
            asgi,
            checker=service.api_keys,
            # The page and the API description are public; the API they describe is not.
            open_paths=[
                *service.config.auth.open_paths,
                *playground.PUBLIC_PATHS,
                *openapi.PUBLIC_PATHS,
            ],
        )
    return asgi  # type: ignore[return-value]


class _ImageIdConvertor(Convertor[str]):
    """Only stored-image ids match /v1/images/{id}; other names stay unknown routes."""

    regex = ID_PATTERN

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("image_id", _ImageIdConvertor())


class BodySizeLimit:
    """Answer 413 as soon as a request body passes `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def __getattr__(self, name: str) -> Any:
        # Ray Serve registers exception handlers on the wrapped Starlette app.
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(
            f"The request body exceeds the {self.max_bytes}-byte limit.",
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


async def serve_deployment_healthy(deployment: str) -> bool:
    """Whether Serve reports a running, healthy replica of `deployment` in this app."""
    from ray import serve

    def check() -> bool:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
        status = app.deployments.get(deployment) if app is not None else None
        if status is None:
            return False
        running = sum(n for state, n in status.replica_states.items() if "RUNNING" in str(state))
        return bool(running > 0 and str(status.status).endswith("HEALTHY"))

    return await asyncio.to_thread(check)


class Ingress:
    """Ray Serve deployment: builds the Starlette app at replica start (late-bound ingress)."""

    def __init__(
        self,
        model: ModelHandle,
        config: AppConfig | Mapping[str, Any],
        *,
        model_deployment: str,
    ) -> None:
        from serve_app.metrics import RayIngressMetrics

        cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        keys = load_api_keys(cfg.auth)
        logger.info("API keys: %s", f"{len(keys)} configured" if keys else "off (no key set)")
        self._service = EditService(
            model=model,
            config=cfg,
            metrics=RayIngressMetrics(),
            api_keys=keys,
            model_healthy=functools.partial(serve_deployment_healthy, model_deployment),
        )

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_app(self._service)
