"""The limits that keep inputs inside what the model takes: prompt and negative_prompt counted in
the model's tokens (any script), control tokens and characters, and input aspect ratios. Each
is a 400 naming its field before any job reaches the model (the fake handle records every job).

The fake model's tokenizer (tests.fakes.byte_tokenizer_json) is one token per UTF-8 byte: "a"
is 1 token, "猫" 3, "😀" 4, so every script is tested against the same token budget.
"""

from __future__ import annotations

import pytest

from tests.fakes import png_bytes
from tests.ingress.test_ingress import assert_error, make_client, post_edit

TEXT_FIELDS = ["prompt", "negative_prompt"]
# (character, tokens per character) in the fake tokenizer.
SCRIPTS = [("a", 1), ("é", 2), ("猫", 3), ("😀", 4)]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("char,per_char", SCRIPTS, ids=["ascii", "latin", "cjk", "emoji"])
def test_text_limit_is_in_model_tokens_for_every_script(
    field: str, char: str, per_char: int
) -> None:
    client, handle = make_client(limits={"max_prompt_tokens": 12, "max_prompt_chars": 100})
    at_limit = char * (12 // per_char)
    assert post_edit(client, size="32x32", **{field: at_limit}).status_code == 200
    assert getattr(handle.jobs[-1], field) == at_limit
    sent = len(handle.jobs)
    past = at_limit + char  # within max_prompt_chars, beyond the model's tokens
    err = assert_error(post_edit(client, size="32x32", **{field: past}), 400, field)
    assert err["code"] == "string_above_max_length"
    assert f"{len(past.encode())} tokens" in err["message"]
    assert len(handle.jobs) == sent


@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_text_limit_in_characters_holds_for_negative_prompt_too(field: str) -> None:
    client, handle = make_client(limits={"max_prompt_chars": 50})
    assert post_edit(client, size="32x32", **{field: "x" * 50}).status_code == 200
    err = assert_error(post_edit(client, **{field: "x" * 100_000}), 400, field)
    assert err["code"] == "string_above_max_length" and "100000 characters" in err["message"]
    assert len(handle.jobs) == 1


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("token", ["<|im_end|>", "<|image_pad|>"])
def test_the_models_control_tokens_are_refused(field: str, token: str) -> None:
    client, handle = make_client()
    err = assert_error(post_edit(client, **{field: f"make it {token} blue"}), 400, field)
    assert token in err["message"] and err["code"] == "invalid_value"
    # Spelled differently, it is plain text to the tokenizer.
    assert post_edit(client, size="32x32", **{field: "make it <|im_end blue"}).status_code == 200
    assert len(handle.jobs) == 1


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f"])
def test_control_characters_are_refused(field: str, char: str) -> None:
    client, handle = make_client()
    err = assert_error(post_edit(client, **{field: f"make{char}it blue"}), 400, field)
    assert f"U+{ord(char):04X}" in err["message"]
    assert handle.jobs == []


def test_tabs_and_newlines_are_text() -> None:
    client, handle = make_client()
    assert post_edit(client, size="32x32", prompt="make\tit\r\nblue").status_code == 200
    assert handle.jobs[0].prompt == "make\tit\r\nblue"


def test_without_a_tokenizer_only_characters_are_counted() -> None:
    import dataclasses

    from tests.fakes import FAKE_INFO, FakeModelHandle

    handle = FakeModelHandle(info=dataclasses.replace(FAKE_INFO, tokenizer_json=None))
    client, _ = make_client(handle, limits={"max_prompt_tokens": 1})
    assert post_edit(client, size="32x32", prompt="猫" * 20).status_code == 200


@pytest.mark.parametrize("field", ["image", "image[]"])
@pytest.mark.parametrize("wh", [(404, 4), (4, 404), (1, 101), (1000, 9)])
def test_images_past_the_aspect_ratio_limit_are_refused(field: str, wh: tuple[int, int]) -> None:
    client, handle = make_client()  # max_input_aspect_ratio: 100 by default
    files = [(field, ("thin.png", png_bytes(*wh), "image/png"))]
    err = assert_error(post_edit(client, files=files), 400, field)
    assert err["code"] == "invalid_image_dimensions"
    assert f"{wh[0]}x{wh[1]}" in err["message"] and "100:1" in err["message"]
    assert handle.jobs == []


@pytest.mark.parametrize("wh", [(1, 100), (100, 1), (8, 800), (1000, 10), (1, 1)])
def test_images_at_the_aspect_ratio_limit_are_taken(wh: tuple[int, int]) -> None:
    client, handle = make_client()
    files = [("image", ("thin.png", png_bytes(*wh), "image/png"))]
    resp = post_edit(client, files=files)  # size=auto: the sides are clamped into the limits
    assert resp.status_code == 200, resp.text
    assert handle.jobs[0].images[0].shape[:2] == (wh[1], wh[0])


def test_aspect_ratio_limit_is_configurable() -> None:
    client, _ = make_client(limits={"max_input_aspect_ratio": 4})
    files = [("image", ("a.png", png_bytes(50, 10), "image/png"))]
    assert_error(post_edit(client, files=files), 400, "image")
    files = [("image", ("a.png", png_bytes(40, 10), "image/png"))]
    assert post_edit(client, files=files, size="32x32").status_code == 200
