"""The multipart (and urlencoded) body as `forms` reads it: its Content-Type, text fields that
must be valid text, and every field in its one form (file or text)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.ingress.forms import FILE_FIELDS, SCALAR_FIELDS, field_form
from tests.fakes import png_bytes
from tests.fixtures import BOUNDARY, multipart
from tests.ingress.test_ingress import assert_error, make_client, post_edit


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


def _post_raw(client: Any, body: bytes, content_type: str) -> Any:
    # Latin-1: a header may carry any byte, as a raw HTTP client can send.
    headers = {"content-type": content_type.encode("latin-1")}
    return client.post("/v1/images/edits", content=body, headers=headers)


@pytest.mark.parametrize(
    "content_type",
    [
        f"Multipart/Form-Data; Boundary={BOUNDARY}",
        f"MULTIPART/FORM-DATA; BOUNDARY={BOUNDARY}; CHARSET=UTF-8",
        f'multipart/form-data ; boundary="{BOUNDARY}" ; charset="utf-8"',
        f"multipart/form-data; boundary={BOUNDARY}; charset=US-ASCII; x-odd=1",
    ],
)
def test_media_type_and_parameters_are_case_insensitive(content_type: str) -> None:
    client, handle = make_client()
    body, _ = multipart([("prompt", b"make it blue"), ("size", b"32x32")])
    resp = _post_raw(client, body, content_type)
    assert resp.status_code == 200, resp.text[:300]
    assert handle.jobs[0].prompt == "make it blue"


@pytest.mark.parametrize(
    "charset",
    ["no-such-charset", "rot13", "base64", "hex", "utf-16", "utf-32", "cp037", "", "\x00"],
)
def test_an_unusable_charset_is_415_not_500(charset: str) -> None:
    client, handle = make_client()
    body, _ = multipart([("prompt", b"make it blue")])
    resp = _post_raw(client, body, f"multipart/form-data; boundary={BOUNDARY}; charset={charset}")
    err = assert_error(resp, 415, None)
    assert err["code"] == "unsupported_charset"
    assert handle.jobs == []


def test_an_urlencoded_form_in_another_charset_is_415() -> None:
    client, _ = make_client()
    resp = _post_raw(client, b"prompt=hi", "application/x-www-form-urlencoded; charset=latin-1")
    assert assert_error(resp, 415, None)["code"] == "unsupported_charset"


@pytest.mark.parametrize("boundary", ["", "x" * 71])
def test_a_boundary_outside_rfc_2046_is_400(boundary: str) -> None:
    client, _ = make_client()
    resp = _post_raw(client, b"--x--\r\n", f"multipart/form-data; boundary={boundary}")
    assert assert_error(resp, 400, None)["code"] == "invalid_multipart"


_TOKEN = st.text(st.sampled_from("abcxyzABCXYZ019-_.+/=*%\"'\\; \t,:\x00\x7féü"), max_size=16)


@settings(max_examples=800, deadline=None)
@given(
    media=st.sampled_from(
        ["multipart/form-data", "Multipart/Form-Data", "application/x-www-form-urlencoded",
         "text/plain", "multipart/mixed", "", "multipart/form-data;"]
    ),
    params=st.lists(
        st.tuples(
            st.sampled_from(["boundary", "Boundary", "charset", "CHARSET", "charset*", "x"]),
            st.one_of(_TOKEN, st.sampled_from([BOUNDARY, f'"{BOUNDARY}"', "utf-8", "UTF-16",
                                               "rot13", "idna", "latin-1", "utf_8_sig",
                                               "punycode", "mbcs", "undefined"])),
        ),
        max_size=4,
    ),
)  # fmt: skip
def test_any_content_type_is_answered_without_a_5xx(
    media: str, params: list[tuple[str, str]]
) -> None:
    body, _ = multipart([("prompt", b"make it blue"), ("size", b"32x32")])
    content_type = media + "".join(f"; {key}={value}" for key, value in params)
    resp = _post_raw(_FUZZ_CLIENT, body, content_type)
    assert resp.status_code in (200, 400, 415), (content_type, resp.text[:300])
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert error["code"] and error["message"]


_FUZZ_CLIENT, _ = make_client()


@pytest.mark.parametrize("field", ["image", "image[]", "mask"])
def test_a_file_field_sent_as_text_is_400_naming_it(field: str) -> None:
    client, handle = make_client()
    resp = post_edit(client, **{field: "not a file"})
    err = assert_error(resp, 400, field)
    assert err["code"] == "invalid_field_type"
    assert handle.jobs == []


@pytest.mark.parametrize("field", SCALAR_FIELDS)
def test_a_scalar_field_sent_as_a_file_is_400_naming_it(field: str) -> None:
    client, handle = make_client()
    files = [
        ("image", ("a.png", png_bytes(), "image/png")),
        (field, ("v.txt", b"1", "text/plain")),
    ]
    data = {} if field == "prompt" else {"prompt": "make it blue"}
    resp = client.post("/v1/images/edits", data=data, files=files)
    err = assert_error(resp, 400, field)
    assert err["code"] == "invalid_field_type"
    assert handle.jobs == []


def test_every_field_has_exactly_one_form() -> None:
    assert set(FILE_FIELDS).isdisjoint(SCALAR_FIELDS)
    assert {field_form(f) for f in FILE_FIELDS} == {"file"}
    assert {field_form(f) for f in SCALAR_FIELDS} == {"text"}
    assert field_form("some_extension_we_do_not_know") is None


def test_a_second_mask_is_refused_not_dropped() -> None:
    client, handle = make_client()
    files = [
        ("image", ("a.png", png_bytes(), "image/png")),
        ("mask", ("m.png", png_bytes(), "image/png")),
        ("mask", ("m2.png", png_bytes(), "image/png")),
    ]
    resp = client.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    assert assert_error(resp, 400, "mask")["code"] == "too_many_masks"
    assert handle.jobs == []
