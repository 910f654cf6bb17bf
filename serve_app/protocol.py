"""OpenAI Images API request and response models (no torch, no ray).

Field names and meanings follow OpenAI's `POST /v1/images/edits`; the extensions
(`negative_prompt`, `true_cfg_scale`, `num_inference_steps`, `seed`) are documented in the README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from serve_app.config import AppConfig
from serve_app.errors import InvalidRequestError

OutputFormat = Literal["png", "jpeg", "webp"]

# Form fields that carry files, not scalars. `images` / `images[]` are the seed server's
# spelling (docs/migrating.md), accepted as the same field; errors name the one a client sent.
IMAGE_FIELDS = ("image", "image[]", "images", "images[]")
MASK_FIELD = "mask"


class EditParams(BaseModel):
    """The scalar fields of an edit request, parsed from multipart strings."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: Literal["auto", "low", "medium", "high", "standard"] = "auto"
    background: Literal["auto", "opaque", "transparent"] = "auto"
    input_fidelity: Literal["low", "high"] | None = None
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=3)
    user: str | None = None
    # Extensions.
    negative_prompt: str | None = None
    true_cfg_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    num_inference_steps: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: Any) -> Any:
        return "jpeg" if isinstance(value, str) and value.lower() == "jpg" else value

    @classmethod
    def from_form(cls, fields: Mapping[str, str]) -> EditParams:
        """Parse form strings; the first validation error becomes a 400 naming its field."""
        data = {k: v for k, v in fields.items() if v != "" or k == "prompt"}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _to_api_error(exc) from None


def _to_api_error(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    value = first.get("input")
    shown = repr(value)[:64] if value is not None else "the value"
    return InvalidRequestError(
        f"Invalid value {shown} for '{param}': {first['msg']}.",
        param=param,
        code="invalid_value",
    )


def check_limits(params: EditParams, config: AppConfig) -> None:
    """Checks that depend on the server's configured limits."""
    limits, gen = config.limits, config.generation
    if params.n > limits.max_n:
        raise InvalidRequestError(
            f"n must be between 1 and {limits.max_n} on this server, got {params.n}.",
            param="n",
            code="invalid_value",
        )
    if len(params.prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"prompt is {len(params.prompt)} characters; the limit is {limits.max_prompt_chars}.",
            param="prompt",
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


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class InputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int
    # Extensions the seed server's clients read (docs/migrating.md); OpenAI's clients keep
    # unknown keys. Left out when unknown.
    processing_time_seconds: float | None = None
    input_images: int | None = None
    generated_images: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    quality: str
    background: str
    usage: Usage | None = None


_IMAGES_RESPONSE = TypeAdapter(ImagesResponse)


def images_response_json(response: ImagesResponse) -> bytes:
    """The response body: the bytes Starlette's JSONResponse writes (compact, UTF-8, no nulls),
    serialized by pydantic-core in one pass, ~4x faster with a multi-MB `b64_json`."""
    return _IMAGES_RESPONSE.dump_json(response, exclude_none=True)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen-image-edit-serve"
    # Extension: variant, pipeline, LoRA and defaults (clients ignore unknown keys).
    metadata: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
