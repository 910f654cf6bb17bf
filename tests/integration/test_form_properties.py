"""Generated edit requests, at and past every limit of the form, against the real app and model.

Each field is drawn from values just inside, at and just past its limit (or left out); the
images from sizes at and past the aspect-ratio limit; the texts from every script up to past the
model's token limit. Whatever the mix, the answer is a 200 with what was asked or a 4xx in
OpenAI's shape (429/503 with Retry-After only under load): never a 5xx, so nothing the
validation lets through fails in the model. tests/ingress/test_ingress_properties.py does the
same for malformed bodies over a fake model, thousands of times; this runs the real pipeline.
"""

from __future__ import annotations

import functools
import io
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.integration.conftest import TEST_ARGS, Server

pytestmark = pytest.mark.integration

LIMITS = TEST_ARGS["limits"]
MAX_N, LO, HI = LIMITS["max_n"], LIMITS["min_output_side"], LIMITS["max_output_side"]
MAX_STEPS = TEST_ARGS["generation"]["max_steps"]
TOKENS = 1024  # limits.max_prompt_tokens (default)
RATIO = 100  # limits.max_input_aspect_ratio (default)


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), (120, 40, 200, 0)[: len(mode)]).save(buf, format="PNG")
    return buf.getvalue()


def around(*limits: int, inside: tuple[int, int]) -> st.SearchStrategy[int]:
    """Values at and just around each limit that lie within `inside` (both ends included)."""
    lo, hi = inside
    return st.sampled_from(sorted({v + d for v in limits for d in (-1, 0, 1) if lo <= v + d <= hi}))


def sizes(sides: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda w, h, sep: f"{w}{sep}{h}", sides, sides, st.sampled_from(["x", "X", " x "])
    )


@functools.cache
def tokens() -> Any:
    from tests.integration.test_http_api import tiny_tokens

    return tiny_tokens()


def text(tokens_: int, offset: int) -> str:
    from tests.fixtures import text_of_tokens

    return text_of_tokens(tokens_, tokens().count, offset=offset)


TEXT_OK = st.one_of(
    st.text(st.sampled_from("猫字😀🎨éa b"), min_size=1, max_size=40),
    st.builds(text, st.sampled_from([TOKENS - 1, TOKENS]), st.integers(0, 7)),
)
TEXT_PAST = st.one_of(
    st.builds(text, st.just(TOKENS + 1), st.integers(0, 7)),
    st.sampled_from(["make it <|im_end|> blue", "<|image_pad|>", "a\x00b", "x" * 4001]),
)
# field -> (values within its limits, values past them); within, a field may also be left out.
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "prompt": (TEXT_OK, st.one_of(TEXT_PAST, st.sampled_from([" ", "\t\n"]))),
    "negative_prompt": (TEXT_OK, TEXT_PAST),
    "n": (
        around(1, MAX_N, inside=(1, MAX_N)).map(str),
        st.sampled_from(["0", str(MAX_N + 1), "two"]),
    ),
    "size": (
        st.one_of(st.just("auto"), sizes(around(LO, HI, 64, inside=(LO, HI)))),
        st.one_of(
            sizes(st.sampled_from([LO - 1, HI + 1])),
            st.sampled_from(["１２８x１２８", "64*64", "0x0"]),
        ),
    ),
    "num_inference_steps": (
        around(1, MAX_STEPS, inside=(1, MAX_STEPS)).map(str),
        st.sampled_from(["0", str(MAX_STEPS + 1)]),
    ),
    "true_cfg_scale": (
        st.sampled_from(["0", "1", "4", "20"]),
        st.sampled_from(["-0.1", "20.1", "nan"]),
    ),
    "seed": (st.sampled_from(["0", str(2**63 - 1)]), st.sampled_from(["-1", str(2**63)])),
    "output_format": (st.sampled_from(["png", "jpeg", "webp", "jpg"]), st.just("gif")),
    "output_compression": (
        st.sampled_from(["0", "1", "99", "100"]),
        st.sampled_from(["-1", "101"]),
    ),
    "response_format": (st.sampled_from(["b64_json", "url"]), st.just("base64")),
    "stream": (st.sampled_from(["true", "false"]), st.just("maybe")),
    "partial_images": (around(0, 3, inside=(0, 3)).map(str), st.sampled_from(["-1", "4"])),
    "background": (st.sampled_from(["auto", "opaque"]), st.just("transparent")),
    "model": (st.sampled_from(["qwen-image-edit", "qwen-image-edit-2509"]), st.just("dall-e-2")),
}
IMAGE_OK = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.sampled_from([(RATIO * 4, 4), (4, RATIO * 4), (RATIO, 1), (1, 1)]),
)
IMAGES_OK = st.lists(IMAGE_OK, min_size=1, max_size=3)  # the Plus pipeline's max_input_images
IMAGES_PAST = st.one_of(
    st.just([]),
    st.lists(IMAGE_OK, min_size=4, max_size=4),
    st.lists(st.sampled_from([(RATIO * 4 + 4, 4), (3, 3 * RATIO + 3)]), min_size=1, max_size=2),
)


@st.composite
def forms(draw: st.DrawFn) -> tuple[dict[str, str], list[tuple[int, int]], str | None, str | None]:
    """(fields, image sizes, mask: None / "fits" / "misfit", the field pushed past its limit)."""
    past = draw(st.one_of(st.none(), st.sampled_from([*FIELDS, "images", "mask"])))
    fields = {}
    for name, (ok, too_far) in FIELDS.items():
        if name == past:
            fields[name] = draw(too_far)
        elif name == "prompt" or draw(st.integers(0, 3)) == 0:
            fields[name] = draw(ok)
    images = draw(IMAGES_PAST if past == "images" else IMAGES_OK)
    mask = "misfit" if past == "mask" else draw(st.sampled_from([None, None, "fits"]))
    return fields, images, mask, past


def assert_wellformed(resp: httpx.Response, fields: dict[str, str]) -> None:
    if resp.status_code == 200:
        if resp.headers["content-type"].startswith("text/event-stream"):
            last = resp.text.rstrip().split("\n\n")[-1]
            assert last.startswith("event: image_edit.completed"), last[:300]
        else:
            assert len(resp.json()["data"]) == int(fields.get("n", "1"))
        return
    assert resp.status_code in (400, 429, 503), resp.text[:500]
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if resp.status_code == 400:
        assert error["type"] == "invalid_request_error"
    else:
        assert int(resp.headers["retry-after"]) >= 1


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(form=forms())
def test_generated_forms_at_and_past_the_limits_get_200_or_4xx(
    server: Server, form: tuple[dict[str, str], list[tuple[int, int]], str | None, str | None]
) -> None:
    fields, images, mask, past = form
    files = [("image[]", (f"{i}.png", png(w, h), "image/png")) for i, (w, h) in enumerate(images)]
    if mask and images:
        w, h = images[0] if mask == "fits" else (images[0][0] + 1, images[0][1])
        files.append(("mask", ("mask.png", png(w, h, mode="RGBA"), "image/png")))
    resp = httpx.post(f"{server.url}/v1/images/edits", data=fields, files=files, timeout=300)
    event(f"status {resp.status_code}" + (f" ({past} past its limit)" if past else ""))
    assert_wellformed(resp, fields)
    if past is not None:
        assert resp.status_code == 400, (past, resp.text[:300])
    if resp.status_code == 200 and fields.get("response_format") == "url":
        url = json.loads(resp.text)["data"][0]["url"]
        assert httpx.get(url, timeout=60).status_code == 200
