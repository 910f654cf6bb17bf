"""serve_app.client units: arguments, file naming, error lines, and what only a fake server can
show (the SDK's retries after Retry-After). The CLI against the real app:
tests/integration/clients/test_cli.py."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from serve_app.client import main, output_paths, parse_args

Handler = Callable[[httpx2.Request], httpx2.Response]

_IMAGES_BODY = {
    "created": 1,
    "data": [{"b64_json": base64.b64encode(b"\x89PNG fake").decode(), "seed": 41}],
    "output_format": "png",
    "size": "64x64",
    "quality": "auto",
    "background": "opaque",
}


def _models_body(*, source: str = "local") -> dict[str, Any]:
    random = source in ("tiny", "synthetic")
    metadata = {"source": source, "random_weights": random}
    card = {"id": "qwen-image-edit", "object": "model", "created": 1, "owned_by": "x"}
    return {"object": "list", "data": [{**card, "metadata": metadata}]}


def _edit_server(*, source: str = "local", edits: list[httpx2.Request] | None = None) -> Handler:
    """Answers edits with one image and /v1/models with a card of `source`."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json=_models_body(source=source))
        if edits is not None:
            edits.append(request)
        return httpx2.Response(200, json=_IMAGES_BODY)

    return handler


def _error(status: int, message: str, *, param: str | None = None, **headers: str) -> Any:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": "invalid_value"}}  # fmt: skip
    return httpx2.Response(status, json=body, headers=headers)


def _run(argv: list[str], handler: Handler, **env: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    client = httpx2.Client(transport=httpx2.MockTransport(handler))
    code = main(argv, http_client=client, environ=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _in_a_fresh_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where the default output (out.png) is free: the README's examples write one into the
    checkout, and the client refuses to overwrite it."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(b"\x89PNG fake input")
    return path


def test_retries_wait_for_retry_after_then_succeed(image: Path, tmp_path: Path) -> None:
    seen: list[float] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json=_models_body())
        seen.append(time.monotonic())
        if len(seen) == 1:
            return _error(503, "The server is at capacity.", **{"Retry-After": "1"})
        return httpx2.Response(200, json=_IMAGES_BODY)

    out = tmp_path / "out.png"
    code, stdout, err = _run(
        ["edit", "--image", str(image), "--prompt", "p", "--out", str(out)], handler
    )
    assert code == 0, err
    assert len(seen) == 2
    assert seen[1] - seen[0] >= 0.95  # the SDK slept the server's Retry-After, not its backoff
    assert out.read_bytes() == b"\x89PNG fake"
    assert stdout.split() == [str(out)]
    assert "seed 41" in err  # the seed the server reports


def test_no_retries_when_asked_and_the_error_line_says_retry_after(image: Path) -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return _error(
            503, "The server is at capacity.", **{"Retry-After": "5", "x-request-id": "r1"}
        )

    code, _, err = _run(
        ["--max-retries", "0", "edit", "--image", str(image), "--prompt", "p"], handler
    )
    assert code == 1 and len(calls) == 1
    assert err.splitlines()[-1] == (
        "error: The server is at capacity. (503, invalid_request_error, code: invalid_value);"
        " retry after 5 s; request id r1"
    )


def test_a_401_without_a_key_says_how_to_give_one(image: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return _error(401, "Incorrect API key provided.")

    code, _, err = _run(["edit", "--image", str(image), "--prompt", "p"], handler)
    assert code == 1
    assert "Incorrect API key provided. (401" in err and "--api-key or set $OPENAI_API_KEY" in err


def test_the_key_and_url_come_from_flags_or_the_environment(image: Path, tmp_path: Path) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(
            200,
            json={
                "object": "list",
                "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "x"}],
            },
        )

    code, out, _ = _run(
        ["models"], handler, OPENAI_API_KEY="sk-env", QWEN_IMAGE_EDIT_URL="http://h:9/"
    )
    assert code == 0 and out == "m\n"
    assert str(seen[0].url) == "http://h:9/v1/models"
    assert seen[0].headers["authorization"] == "Bearer sk-env"
    _run(
        ["--api-key", "sk-flag", "--url", "http://other:1", "models"],
        handler,
        OPENAI_API_KEY="sk-env",
    )
    assert str(seen[1].url) == "http://other:1/v1/models"
    assert seen[1].headers["authorization"] == "Bearer sk-flag"


def test_a_stream_error_event_is_reported(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        error = {"type": "error", "error": {"message": "GPU fell over", "type": "server_error",
                                            "param": None, "code": "internal_error"}}  # fmt: skip
        body = f"event: error\ndata: {json.dumps(error)}\n\n"
        return httpx2.Response(200, text=body, headers={"content-type": "text/event-stream"})

    argv = [
        "edit",
        "--image",
        str(image),
        "--prompt",
        "p",
        "--stream",
        "--out",
        str(tmp_path / "o.png"),
    ]
    code, _, err = _run(argv, handler)
    assert code == 1
    assert "GPU fell over" in err
    assert not (tmp_path / "o.png").exists()


def test_connection_failure_exits_1(image: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    code, _, err = _run(
        ["--max-retries", "0", "edit", "--image", str(image), "--prompt", "p"], handler
    )
    assert code == 1 and err.splitlines()[-1].startswith(
        "error: cannot reach http://127.0.0.1:8000"
    )


def test_a_missing_input_file_exits_1_without_a_request(tmp_path: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise AssertionError("no request expected")

    code, _, err = _run(["edit", "--image", str(tmp_path / "none.png"), "--prompt", "p"], handler)
    assert code == 1 and "cannot read" in err


def test_an_existing_output_is_refused_before_any_request(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    edits: list[httpx2.Request] = []
    argv = ["edit", "-i", str(image), "-p", "p", "-o", str(out)]
    code, stdout, err = _run(argv, _edit_server(edits=edits))
    assert code == 1 and edits == [] and stdout == ""
    assert err.strip() == (
        f"error: {out} already exists: pass --force (-f) to overwrite, or --out to write elsewhere"
    )
    assert out.read_bytes() == b"precious"
    # -n 2 would also write out-1.png: both names are checked, and both are named.
    (tmp_path / "out-1.png").write_bytes(b"also")
    code, _, err = _run([*argv, "-n", "2"], _edit_server(edits=edits))
    assert code == 1 and edits == [] and f"{out}, {tmp_path / 'out-1.png'} already exist:" in err


def test_force_overwrites(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    for flag in ("--force", "-f"):
        code, stdout, err = _run(["edit", "-i", str(image), "-p", "p", "-o", str(out), flag],
                                 _edit_server())  # fmt: skip
        assert code == 0, err
        assert out.read_bytes() == b"\x89PNG fake" and stdout.split() == [str(out)]
        out.write_bytes(b"old")


def test_saved_previews_are_checked_too(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    (tmp_path / "out.partial1.png").write_bytes(b"old preview")
    argv = ["edit", "-i", str(image), "-p", "p", "-o", str(out), "--stream", "--save-partials"]
    code, _, err = _run(argv, _edit_server())
    assert code == 1 and "out.partial1.png already exists" in err


@pytest.mark.parametrize(("source", "noted"), [("tiny", True), ("local", False)])
def test_a_random_weight_model_is_named_after_the_edit(
    image: Path, tmp_path: Path, source: str, noted: bool
) -> None:
    argv = ["edit", "-i", str(image), "-p", "p", "-o", str(tmp_path / "o.png")]
    code, stdout, err = _run(argv, _edit_server(source=source))
    assert code == 0, err
    assert stdout.split() == [str(tmp_path / "o.png")]  # stdout stays the written paths
    assert ("random weights: its images are noise" in err) is noted
    code, stdout, err = _run(["models"], _edit_server(source=source))
    assert stdout.split() == ["qwen-image-edit"]
    assert ("qwen-image-edit: random weights (source tiny)" in err) is noted


def test_the_note_is_skipped_when_the_models_cannot_be_read(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/models"):
            return _error(500, "boom")
        return httpx2.Response(200, json=_IMAGES_BODY)

    code, _, err = _run(
        ["edit", "-i", str(image), "-p", "p", "-o", str(tmp_path / "o.png")], handler
    )
    assert code == 0 and "random weights" not in err


def test_parse_defaults_and_format_from_the_output_name() -> None:
    args = parse_args(["edit", "-i", "a.png", "-p", "x"], environ={})
    assert (args.url, args.api_key, args.out, args.format, args.n) == (
        "http://127.0.0.1:8000",
        None,
        Path("out.png"),
        "png",
        1,
    )
    assert args.max_retries == 2 and args.partial_images == 3
    args = parse_args(["edit", "-i", "a.png", "-p", "x", "-o", "r.JPG"], environ={})
    assert args.format == "jpeg"
    args = parse_args(["edit", "-i", "a.png", "-p", "x", "--format", "webp"], environ={})
    assert args.out == Path("out.webp")


@pytest.mark.parametrize(
    "extra",
    [
        ["--size", "12"],
        ["-n", "0"],
        ["--seed", "-1"],
        ["--partial-images", "4"],
        ["--format", "gif"],
    ],
)
def test_parse_rejects_bad_values(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["edit", "-i", "a.png", "-p", "x", *extra], environ={})
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_output_paths() -> None:
    assert output_paths(Path("d/out.png"), 3) == [
        Path("d/out.png"),
        Path("d/out-1.png"),
        Path("d/out-2.png"),
    ]


def test_the_client_imports_no_torch_no_ray_and_nothing_else_of_this_project() -> None:
    code = (
        "import json, sys, serve_app.client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'ray', 'diffusers', 'transformers', 'numpy', 'serve_app'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["serve_app", "serve_app.client"]
