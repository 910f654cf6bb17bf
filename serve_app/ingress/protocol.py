"""OpenAI Images API request and response models (no torch, no ray).

Field names and meanings follow OpenAI's `POST /v1/images/edits`; the extensions
(`negative_prompt`, `true_cfg_scale`, `num_inference_steps`, `seed`, and `data[].seed` in the
response) are documented in the README and docs/api.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from serve_app.common.errors import InvalidRequestError
from serve_app.common.jobs import EditOutput
from serve_app.common.sizing import Size
from serve_app.ingress.sizing import parse_size

OutputFormat = Literal["png", "jpeg", "webp"]

# Form fields that carry files, not scalars. `images` / `images[]` are the seed server's
# spelling (docs/migrating.md), accepted as the same field; errors name the one a client sent.
IMAGE_FIELDS = ("image", "image[]", "images", "images[]")
MASK_FIELD = "mask"
# C0 control characters other than tab, LF and CR, and DEL.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class EditParams(BaseModel):
    """The scalar fields of an edit request, parsed from multipart strings."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str
    model: str | None = None
    # Its upper bound is the server's limits.max_n (validation), not OpenAI's 10: an error
    # states the limit that applies here.
    n: int = Field(default=1, ge=1)
    size: Size | None = None  # None: "auto"
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
            raise ValueError("prompt must not be empty.")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _plain_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        # NUL and the other C0 controls (tab, newline and carriage return aside) mean nothing
        # to the model and truncate the text in some logs and tools: refused, never cleaned
        # silently, so what the model reads is what the client sent.
        bad = _CONTROL_CHARS.search(value) if value is not None else None
        if bad is not None:
            raise ValueError(
                f"{info.field_name} contains the control character U+{ord(bad.group()):04X};"
                " send plain text."
            )
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return parse_size(value)
        except InvalidRequestError as err:  # a ValueError keeps pydantic's field order
            raise ValueError(err.message) from None

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
    if first["type"] == "value_error":  # our own validators' messages are whole sentences
        message = str(first.get("ctx", {}).get("error", first["msg"]))
    else:
        value = first.get("input")
        shown = repr(value)[:64] if value is not None else "the value"
        message = f"Invalid value {shown} for '{param}': {first['msg']}."
    return InvalidRequestError(message, param=param, code="invalid_value")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    # Extension: the seed this image was made with, when the request sent none (send it back
    # as `seed` to get the same bytes); clients that do not know it ignore it.
    seed: int | None = None


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

    @classmethod
    def of(cls, output: EditOutput) -> Usage:
        input_tokens = output.text_tokens + output.input_image_tokens
        return cls(
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(
                image_tokens=output.input_image_tokens, text_tokens=output.text_tokens
            ),
            output_tokens=output.output_image_tokens,
            total_tokens=input_tokens + output.output_image_tokens,
            processing_time_seconds=output.timings_s.get("pipeline"),
            input_images=output.input_images,
            generated_images=len(output.images),
        )


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
    serialized by pydantic-core in one pass instead of a dict handed to a second encoder (the
    difference shows with a multi-MB `b64_json`)."""
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
