"""The edit's multipart body -> scalar fields, image files and the mask file (no validation).

- The Content-Type is read here, not by the parser: its media type and parameter names are
  case-insensitive (RFC 9110 8.3.1); a `charset` must name an ASCII-compatible text encoding
  (415 `unsupported_charset` otherwise), since the boundary and field names are ASCII.
- Text fields must be valid UTF-8 (or the declared charset): Starlette's parsers would
  silently turn invalid bytes into Latin-1 or U+FFFD, and the model would edit with a prompt the
  client never wrote. Such a field is a 400 naming it (code `invalid_encoding`).
- Every known field has one form (`field_form`): a file field sent as text, or a scalar field
  sent as a file, is a 400 naming it (code `invalid_field_type`), never silently ignored.
"""

from __future__ import annotations

import codecs
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus, unquote_to_bytes

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from serve_app.common.errors import InvalidRequestError, UnsupportedMediaTypeError
from serve_app.ingress.protocol import IMAGE_FIELDS, MASK_FIELD, EditParams

_MAX_FORM_FIELDS = 64
_MULTIPART = "multipart/form-data"
_URLENCODED = "application/x-www-form-urlencoded"
# RFC 2046 5.1.1: a boundary is 1 to 70 characters.
_MAX_BOUNDARY = 70
# What a charset must decode as ASCII does: the boundary and part headers are ASCII.
_ASCII_PROBE = bytes(range(0x20, 0x7F)) + b"\r\n"
FILE_FIELDS = (*IMAGE_FIELDS, MASK_FIELD)
SCALAR_FIELDS = tuple(EditParams.model_fields)


def field_form(name: str) -> Literal["file", "text"] | None:
    """How field `name` must be sent: "file", "text", or None for a field this API ignores."""
    if name in FILE_FIELDS:
        return "file"
    if name in SCALAR_FIELDS:
        return "text"
    return None


def _wrong_form(name: str, *, sent_as_file: bool) -> InvalidRequestError:
    wanted, sent = ("a text field", "a file") if sent_as_file else ("a file upload", "a text field")
    return InvalidRequestError(
        f"'{name}' must be {wanted}, not {sent}.", param=name, code="invalid_field_type"
    )


@dataclass(frozen=True)
class FormContentType:
    """The parts of the request's Content-Type the parsers use, normalised."""

    multipart: bool
    boundary: str = ""
    charset: str = "utf-8"

    def headers(self) -> Headers:
        """The headers handed to Starlette's parser: only what it reads, in the form it reads."""
        if not self.multipart:
            return Headers({"content-type": _URLENCODED})
        quoted = self.boundary.replace("\\", "\\\\").replace('"', '\\"')
        return Headers(
            {"content-type": f'{_MULTIPART}; boundary="{quoted}"; charset={self.charset}'}
        )


def parse_content_type(header: str) -> FormContentType:
    """The form's Content-Type, or a 400 (not a form, no usable boundary) / 415 (charset)."""
    media, raw = parse_options_header(header)
    params = {key.lower(): value for key, value in raw.items()}
    media_type = media.decode("latin-1").strip()
    # A form without files arrives urlencoded; it then fails as "missing image", naming it.
    if media_type not in (_MULTIPART, _URLENCODED):
        raise InvalidRequestError(
            "Send the edit as multipart/form-data (fields 'image' and 'prompt').",
            code="invalid_content_type",
        )
    multipart = media_type == _MULTIPART
    charset = _charset(params.get(b"charset"), multipart=multipart)
    if not multipart:
        return FormContentType(multipart=False, charset=charset)
    boundary = params.get(b"boundary", b"").decode("latin-1")
    if not 1 <= len(boundary) <= _MAX_BOUNDARY:
        raise InvalidRequestError(
            "The multipart Content-Type needs a boundary of 1 to 70 characters.",
            code="invalid_multipart",
        )
    return FormContentType(multipart=True, boundary=boundary, charset=charset)


def _charset(raw: bytes | None, *, multipart: bool) -> str:
    """The codec to decode text fields with. Urlencoded forms are UTF-8 (as browsers send them);
    a multipart form may declare any ASCII-compatible text encoding."""
    if raw is None:
        return "utf-8"
    name = raw.decode("latin-1").strip()
    try:
        codec = codecs.lookup(name)
        # Not rot13/base64 (bytes-to-bytes codecs), and ASCII where ASCII is: the boundary and
        # the part headers are ASCII whatever the charset.
        usable = getattr(codec, "_is_text_encoding", True) and (
            _ASCII_PROBE.decode(codec.name) == _ASCII_PROBE.decode("ascii")
        )
    except (LookupError, UnicodeError, ValueError):
        usable = False
    if usable and (multipart or codec.name in ("utf-8", "ascii")):
        return codec.name
    raise UnsupportedMediaTypeError(
        f"Unsupported charset {name[:40]!r} in the Content-Type: send UTF-8 text fields"
        " (no charset parameter, or charset=utf-8).",
        code="unsupported_charset",
    )


@dataclass(frozen=True)
class EditForm:
    fields: dict[str, str]  # the first value of each scalar field
    images: list[bytes]  # in the order sent
    mask: bytes | None = None
    # The field the images came in (the first one's: image, image[], images, images[]); errors
    # about them name it.
    image_field: str = IMAGE_FIELDS[0]


async def read_edit_form(request: Request) -> EditForm:
    content_type = parse_content_type(request.headers.get("content-type", ""))
    try:
        form = await _parse(request, content_type)
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
            is_file = isinstance(value, UploadFile)
            form_of = field_form(key)
            if form_of is not None and (form_of == "file") != is_file:
                raise _wrong_form(key, sent_as_file=is_file)
            if isinstance(value, UploadFile):
                if key in IMAGE_FIELDS:
                    if not images:
                        image_field = key
                    images.append(await value.read())
                elif key == MASK_FIELD:
                    if mask is not None:
                        raise InvalidRequestError(
                            "Send one 'mask' file; it applies to the first image.",
                            param=MASK_FIELD,
                            code="too_many_masks",
                        )
                    mask = await value.read()
                continue
            fields.setdefault(key, value)
        return EditForm(fields, images, mask, image_field)
    finally:
        await form.close()


async def _parse(request: Request, content_type: FormContentType) -> FormData:
    headers = content_type.headers()
    async with aclosing(request.stream()) as stream:
        if content_type.multipart:
            return await _StrictMultiPartParser(
                headers, stream, max_files=_MAX_FORM_FIELDS, max_fields=_MAX_FORM_FIELDS
            ).parse()
        return await _StrictFormParser(headers, stream, max_fields=_MAX_FORM_FIELDS).parse()


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
            except UnicodeError:
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
