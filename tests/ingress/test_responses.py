from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from serve_app.common.jobs import EditOutput, PartialImage
from serve_app.common.timing import StageClock
from serve_app.ingress.protocol import EditParams
from serve_app.ingress.responses import Base64Splice, event_frame, json_body


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(n)]


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64, validate=True))))


def test_splice_fills_each_placeholder_with_its_payload_in_order() -> None:
    splice = Base64Splice()
    payloads = [b"first", bytes(range(256)), b""]
    marks = [splice.add(p) for p in payloads]
    document = json.dumps({"a": marks[0], "b": [marks[1], {"c": marks[2]}], "d": "-0"}).encode()
    filled = json.loads(splice.fill(document))
    expected = [base64.b64encode(p).decode() for p in payloads]
    assert filled == {"a": expected[0], "b": [expected[1], {"c": expected[2]}], "d": "-0"}


def test_placeholders_differ_between_documents() -> None:
    assert Base64Splice().add(b"x") != Base64Splice().add(b"x")


def test_a_missing_placeholder_is_an_error_not_a_silent_body() -> None:
    splice = Base64Splice()
    splice.add(b"x")
    with pytest.raises(ValueError):
        splice.fill(b'{"b64_json": "something else"}')


@pytest.mark.parametrize("n", [1, 3])
def test_json_body_holds_every_image_and_seed(n: int) -> None:
    images = _images(n)
    output = EditOutput(images=images, width=24, height=16)
    body = json_body(
        EditParams(prompt="p", n=n),
        output,
        created=7,
        seeds=list(range(10, 10 + n)),
        timing=StageClock(),
    )
    parsed = json.loads(body)
    assert [d["seed"] for d in parsed["data"]] == list(range(10, 10 + n))
    for data, image in zip(parsed["data"], images, strict=True):
        np.testing.assert_array_equal(_pixels(data["b64_json"]), image)
    assert parsed["created"] == 7 and parsed["size"] == "24x16"
    # Compact, as Starlette's JSONResponse writes it.
    assert b": " not in body and b", " not in body


def test_stream_frames_carry_the_image() -> None:
    image = _images(1)[0]
    params = EditParams(prompt="p", stream=True, partial_images=1)
    partial = event_frame(
        PartialImage(index=0, image=image), params=params, size="24x16", created_at=1
    )
    done = event_frame(
        EditOutput(images=[image], width=24, height=16),
        params=params, size="24x16", created_at=1, seed=5,
    )  # fmt: skip
    for frame, kind in ((partial, "image_edit.partial_image"), (done, "image_edit.completed")):
        head, data = frame.decode().split("\n", 1)
        assert head == f"event: {kind}" and frame.endswith(b"\n\n")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == kind
        np.testing.assert_array_equal(_pixels(payload["b64_json"]), image)
    assert json.loads(done.decode().split("data: ", 1)[1])["seed"] == 5
