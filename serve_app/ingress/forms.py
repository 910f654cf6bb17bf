"""The edit's multipart body -> scalar fields, image files and the mask file (no validation).

Text fields must be valid UTF-8 (or the part's declared charset): Starlette's parsers would
silently turn invalid bytes into Latin-1 or U+FFFD, and the model would edit with a prompt the
client never wrote. Such a field is a 400 naming it (code `invalid_encoding`).
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass
from urllib.parse import unquote_plus, unquote_to_bytes

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
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
        form = await _parse(request, multipart=content_type.startswith("multipart/form-data"))
    except MultiPartException as exc:
        raise InvalidRequestError(
            f"Malformed multipart body: {exc.message}", code="invalid_multipart"
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


async def _parse(request: Request, *, multipart: bool) -> FormData:
    async with aclosing(request.stream()) as stream:
        if multipart:
            return await _StrictMultiPartParser(
                request.headers, stream, max_files=_MAX_FORM_FIELDS, max_fields=_MAX_FORM_FIELDS
            ).parse()
        return await _StrictFormParser(request.headers, stream, max_fields=_MAX_FORM_FIELDS).parse()


def _not_text(field: str, charset: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The value of '{field[:64]}' is not valid {charset} text.",
        param=field[:64],
        code="invalid_encoding",
    )


class _StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError:
                raise _not_text(part.field_name, self._charset) from None
        super().on_part_end()


class _StrictFormParser(FormParser):
    def on_field_end(self) -> None:
        # Percent-escapes and raw bytes alike are UTF-8, as browsers send them.
        try:
            unquote_to_bytes(bytes(self._field_value).replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            name = unquote_plus(self._field_name.decode("latin-1"))
            raise _not_text(name, "utf-8") from None
        super().on_field_end()
