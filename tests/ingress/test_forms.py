"""The multipart (and urlencoded) body as `forms` reads it: text fields must be valid text."""

from __future__ import annotations

import pytest

from tests.fixtures import multipart
from tests.ingress.test_ingress import assert_error, make_client


@pytest.mark.parametrize(
    "raw",
    [b"caf\xe9", b"\xff\xfe", b"half an emoji \xf0\x9f\x98", b"\xc0\xaf overlong slash"],
    ids=["latin1", "bom-like", "truncated", "overlong"],
)
@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "size"])
def test_invalid_utf8_in_a_text_field_is_400_naming_it(raw: bytes, field: str) -> None:
    client, handle = make_client()
    fields = [("prompt", b"make it blue"), (field, raw)] if field != "prompt" else [(field, raw)]
    body, content_type = multipart(fields)
    resp = client.post("/v1/images/edits", content=body, headers={"content-type": content_type})
    err = assert_error(resp, 400, field)
    assert err["code"] == "invalid_encoding"
    assert handle.jobs == []


def test_valid_utf8_of_every_script_reaches_the_model() -> None:
    client, handle = make_client()
    text = "café 猫 😀 \u00a0nbsp"
    body, content_type = multipart([("prompt", text.encode()), ("size", b"32x32")])
    resp = client.post("/v1/images/edits", content=body, headers={"content-type": content_type})
    assert resp.status_code == 200, resp.text[:300]
    assert handle.jobs[0].prompt == text


def test_a_declared_charset_is_honoured() -> None:
    client, handle = make_client()
    body, content_type = multipart(
        [("prompt", "café".encode("latin-1")), ("size", b"32x32")], charset="latin-1"
    )
    resp = client.post("/v1/images/edits", content=body, headers={"content-type": content_type})
    assert resp.status_code == 200, resp.text[:300]
    assert handle.jobs[0].prompt == "café"


def test_invalid_utf8_in_an_urlencoded_form_is_400_naming_it() -> None:
    client, _ = make_client()
    for body in (b"prompt=caf%E9", b"prompt=caf\xe9"):
        resp = client.post(
            "/v1/images/edits",
            content=body,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert assert_error(resp, 400, "prompt")["code"] == "invalid_encoding"
    # Valid text goes on to the next check: this form has no image.
    resp = client.post(
        "/v1/images/edits",
        content=b"prompt=caf%C3%A9+au+lait",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert assert_error(resp, 400, "image")["code"] == "missing_required_parameter"
