"""One edit request, validated in one place: every check that needs no pixels, before any
decoding or model work, and the text limits counted by the model's tokenizer once its info is
known. What needs pixels (each input's pixel count and aspect ratio, read from its header by
`imaging`; the auto size; the mask's size) is checked while the job is built (`service`), with
the same 400s naming their field."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serve_app.common.config import AppConfig, LimitsConfig
from serve_app.common.errors import InvalidRequestError
from serve_app.common.jobs import ModelInfo
from serve_app.ingress.forms import EditForm
from serve_app.ingress.protocol import EditParams
from serve_app.ingress.tokens import PromptTokenizer, tokenizer_for


@dataclass(frozen=True)
class EditRequest:
    params: EditParams  # typed fields; `params.size` is a Size, or None for auto
    model: str  # the model id to use (a served name or a LoRA)
    form: EditForm  # the files: images (and the field they came in), mask
    info: ModelInfo  # the loaded model the request was checked against


async def validate_edit(
    form: EditForm, *, config: AppConfig, model_info: Callable[[], Awaitable[ModelInfo]]
) -> EditRequest:
    """Raises a 400 naming the first bad field. `model_info` is awaited only once the fields
    passed: a request that is bad anyway never waits for a loading model."""
    params = EditParams.from_form(form.fields)
    _check_limits(params, config)
    _check_stream(params)
    model = _check_model(params.model, config)
    _check_files(form)
    info = await model_info()
    _check_tokens(params, config.limits, tokenizer_for(info))
    if len(form.images) > info.max_input_images:
        raise InvalidRequestError(
            f"{info.pipeline_class} takes at most {info.max_input_images} input image(s);"
            f" got {len(form.images)}.",
            param=form.image_field,
            code="too_many_images",
        )
    return EditRequest(params=params, model=model, form=form, info=info)


def _check_limits(params: EditParams, config: AppConfig) -> None:
    """Checks that depend on the server's configured limits."""
    limits, gen = config.limits, config.generation
    if params.n > limits.max_n:
        raise InvalidRequestError(
            f"n must be between 1 and {limits.max_n} on this server, got {params.n}.",
            param="n",
            code="invalid_value",
        )
    for param, text in _texts(params):
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"{param} is {len(text)} characters; the limit is {limits.max_prompt_chars}.",
                param=param,
                code="string_above_max_length",
            )
    steps = params.num_inference_steps
    if steps is not None and steps > gen.max_steps:
        raise InvalidRequestError(
            f"num_inference_steps must be between 1 and {gen.max_steps}, got {steps}.",
            param="num_inference_steps",
            code="invalid_value",
        )
    if params.background == "transparent":
        raise InvalidRequestError(
            "background 'transparent' is not supported: this model paints opaque images.",
            param="background",
            code="unsupported_value",
        )


def _texts(params: EditParams) -> list[tuple[str, str]]:
    """The fields the text encoder reads, by name."""
    texts = [("prompt", params.prompt)]
    if params.negative_prompt is not None:
        texts.append(("negative_prompt", params.negative_prompt))
    return texts


def _check_tokens(
    params: EditParams, limits: LimitsConfig, tokenizer: PromptTokenizer | None
) -> None:
    """The text path's limits, counted by the model's own tokenizer (any script)."""
    if tokenizer is None:
        return
    for param, text in _texts(params):
        control = tokenizer.control_tokens(text)
        if control:
            raise InvalidRequestError(
                f"{param} contains the model's control token(s) {', '.join(control)}; send"
                " plain text.",
                param=param,
                code="invalid_value",
            )
        tokens = tokenizer.count(text)
        if tokens > limits.max_prompt_tokens:
            raise InvalidRequestError(
                f"{param} is {tokens} tokens of the model's tokenizer; the limit is"
                f" {limits.max_prompt_tokens}.",
                param=param,
                code="string_above_max_length",
            )


def _check_stream(params: EditParams) -> None:
    """With stream=true: one image (one completed event per request, as OpenAI), as b64_json."""
    if not params.stream:
        return
    if params.n != 1:
        raise InvalidRequestError(
            "stream=true supports n=1 only; send n requests to stream n images.",
            param="n",
            code="unsupported_value",
        )
    if params.response_format == "url":
        raise InvalidRequestError(
            "stream=true sends images as b64_json events; response_format 'url' cannot stream.",
            param="response_format",
            code="unsupported_value",
        )


def _check_model(requested: str | None, config: AppConfig) -> str:
    names = config.model.model_ids
    if requested is None or requested == "":
        return names[0]
    if requested not in names:
        raise InvalidRequestError(
            f"The model '{requested}' does not exist. Available: {', '.join(names)}.",
            param="model",
            code="model_not_found",
        )
    return requested


def _check_files(form: EditForm) -> None:
    if not form.images:
        raise InvalidRequestError(
            "Missing required parameter: 'image'.",
            param="image",
            code="missing_required_parameter",
        )
    if form.mask is not None and len(form.images) > 1:
        raise InvalidRequestError(
            f"mask edits take one image (the mask applies to it); got {len(form.images)} images.",
            param="mask",
            code="unsupported_value",
        )
