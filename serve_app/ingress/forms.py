"""The edit's multipart body -> scalar fields, image files and the mask file (no validation)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from serve_app.common.errors import InvalidRequestError
from serve_app.ingress.protocol import IMAGE_FIELDS, MASK_FIELD

_MAX_FORM_FIELDS = 64


@dataclass(frozen=True)
class EditForm:
    fields: dict[str, str]  # the first value of each scalar field
    images: list[bytes]  # in the order sent
    mask: bytes | None = None
    # The field the images came in (the first one's: image, image[], images, images[]); errors
    # about them name it.
    image_field: str = IMAGE_FIELDS[0]


async def read_edit_form(request: Request) -> EditForm:
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
        image_field = IMAGE_FIELDS[0]
        mask: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in IMAGE_FIELDS:
                    if not images:
                        image_field = key
                    images.append(await value.read())
                elif key == MASK_FIELD and mask is None:
                    mask = await value.read()
                continue
            if key in IMAGE_FIELDS:
                raise InvalidRequestError(
                    f"'{key}' must be a file upload, not a text field.", param=key
                )
            fields.setdefault(key, value)
        return EditForm(fields, images, mask, image_field)
    finally:
        await form.close()
