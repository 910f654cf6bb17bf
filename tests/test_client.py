"""serve_app.client against an in-process fake server (httpx.MockTransport)."""

from __future__ import annotations

import base64
import email
import email.policy
import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from serve_app.client import Progress, main, output_paths, parse_args

Handler = Callable[[httpx.Request], httpx.Response]


def _form(request: httpx.Request) -> tuple[dict[str, str], list[tuple[str, str, bytes]]]:
    """Split a multipart request into text fields and (field, filename, content) files."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + request.read(), policy=email.policy.HTTP)
    fields: dict[str, str] = {}
    files: list[tuple[str, str, bytes]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(payload, bytes)
        filename = part.get_filename()
        if filename:
            files.append((name, filename, payload))
        else:
            fields[name] = payload.decode()
    return fields, files


def _images_response(images: list[bytes], *, size: str = "256x256") -> httpx.Response:
    data = [{"b64_json": base64.b64encode(image).decode()} for image in images]
    return httpx.Response(
        200,
        json={
            "created": 1,
            "data": data,
            "output_format": "png",
            "size": size,
            "quality": "auto",
            "background": "auto",
        },
    )


def _run(
    argv: list[str], handler: Handler, *, environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(
        argv,
        transport=httpx.MockTransport(handler),
        environ=environ or {},
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(b"\x89PNG fake input")
    return path


def test_edit_n2_writes_numbered_files_and_sends_the_form(image: Path, tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _images_response([b"first", b"second"])

    out_path = tmp_path / "out.png"
    argv = ["edit", "--image", str(image), "--prompt", "make it blue", "-o", str(out_path)]
    argv += ["--n", "2", "--seed", "7", "--steps", "8", "--size", "256x256"]
    code, out, err = _run(argv, handler, environ={"OPENAI_API_KEY": "sk-env"})

    assert code == 0, err
    assert out_path.read_bytes() == b"first"
    assert (tmp_path / "out-1.png").read_bytes() == b"second"
    assert out.splitlines() == [str(out_path), str(tmp_path / "out-1.png")]
    assert "2 image(s), 256x256 png" in err

    (request,) = seen
    assert request.method == "POST"
    assert request.url == "http://127.0.0.1:8000/v1/images/edits"
    assert request.headers["authorization"] == "Bearer sk-env"
    fields, files = _form(request)
    assert fields == {
        "prompt": "make it blue",
        "n": "2",
        "response_format": "b64_json",
        "output_format": "png",
        "size": "256x256",
        "seed": "7",
        "num_inference_steps": "8",
    }
    assert files == [("image", "in.png", b"\x89PNG fake input")]


def test_edit_sends_several_images_as_image_array(image: Path, tmp_path: Path) -> None:
    second = tmp_path / "ref.jpg"
    second.write_bytes(b"jpeg bytes")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _images_response([b"x"])

    argv = ["--url", "http://edit.example:9000/", "edit", "--image", str(image)]
    argv += ["--image", str(second), "--prompt", "p", "-o", str(tmp_path / "o.webp")]
    argv += ["--model", "qwen-image-edit"]
    code, _, err = _run(argv, handler)

    assert code == 0, err
    (request,) = seen
    assert request.url == "http://edit.example:9000/v1/images/edits"
    assert "authorization" not in request.headers
    fields, files = _form(request)
    assert fields["output_format"] == "webp"
    assert fields["model"] == "qwen-image-edit"
    assert [(name, filename) for name, filename, _ in files] == [
        ("image[]", "in.png"),
        ("image[]", "ref.jpg"),
    ]
    assert (tmp_path / "o.webp").read_bytes() == b"x"


def test_openai_error_is_printed_with_exit_code_1(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "error": {
                "message": "Invalid value '13x13' for 'size'.",
                "type": "invalid_request_error",
                "param": "size",
                "code": "invalid_size",
            }
        }
        # The id twice, as a middleware may repeat it: shown once.
        headers = [("x-request-id", "req-42"), ("x-request-id", "req-42")]
        return httpx.Response(400, json=body, headers=headers)

    out_path = tmp_path / "out.png"
    argv = ["edit", "--image", str(image), "--prompt", "p", "-o", str(out_path)]
    code, out, err = _run(argv, handler)

    assert code == 1
    assert out == ""
    assert "error: Invalid value '13x13' for 'size'." in err
    assert "400, invalid_request_error, param: size, code: invalid_size" in err
    assert err.rstrip().endswith("; request id req-42")
    assert not out_path.exists()


def test_busy_server_error_mentions_retry_after(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "The model is busy.", "type": "server_error"}}
        return httpx.Response(503, json=body, headers={"retry-after": "5"})

    argv = ["edit", "--image", str(image), "--prompt", "p", "-o", str(tmp_path / "o.png")]
    code, _, err = _run(argv, handler)
    assert code == 1
    assert "The model is busy. (503, server_error); retry after 5 s" in err


def test_non_json_error_body_is_shown(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(408, text="Request timed out")

    argv = ["edit", "--image", str(image), "--prompt", "p", "-o", str(tmp_path / "o.png")]
    code, _, err = _run(argv, handler)
    assert code == 1
    assert "error: HTTP 408: Request timed out" in err


def test_connection_failure_exits_1(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    argv = ["edit", "--image", str(image), "--prompt", "p", "-o", str(tmp_path / "o.png")]
    code, _, err = _run(argv, handler)
    assert code == 1
    assert "error: cannot reach http://127.0.0.1:8000: connection refused" in err


def test_missing_input_image_exits_1_without_a_request(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    code, _, err = _run(["edit", "--image", str(tmp_path / "nope.png"), "--prompt", "p"], handler)
    assert code == 1
    assert "cannot read" in err and "nope.png" in err


def test_answer_without_images_exits_1(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"url": "http://x"}]})

    argv = ["edit", "--image", str(image), "--prompt", "p", "-o", str(tmp_path / "o.png")]
    code, _, err = _run(argv, handler)
    assert code == 1
    assert "no b64_json" in err


def test_models_prints_ids() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        cards = [{"id": "qwen-image-edit", "object": "model"}, {"id": "alias", "object": "model"}]
        return httpx.Response(200, json={"object": "list", "data": cards})

    code, out, _ = _run(["models"], handler)
    assert code == 0
    assert out.splitlines() == ["qwen-image-edit", "alias"]


@pytest.mark.parametrize(
    ("ready", "expected_code", "expected_line"),
    [
        (
            httpx.Response(
                200,
                json={
                    "status": "ready",
                    "model": "qwen-image-edit",
                    "pipeline": "QwenImageEditPlusPipeline",
                    "source": "tiny",
                    "device_map": "cpu",
                },
            ),
            0,
            "ready: qwen-image-edit (QwenImageEditPlusPipeline, source tiny, device_map cpu)",
        ),
        (
            httpx.Response(
                503,
                json={"error": {"message": "The model is not loaded yet.", "type": "server_error"}},
            ),
            1,
            "ready: no - The model is not loaded yet. (503, server_error)",
        ),
    ],
)
def test_health(ready: httpx.Response, expected_code: int, expected_line: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return ready

    code, out, _ = _run(["health"], handler)
    assert code == expected_code
    assert out.splitlines() == ["health: ok", expected_line]


# --- argument parsing ------------------------------------------------------------------------


def test_parse_defaults() -> None:
    args = parse_args(["edit", "--image", "a.png", "--prompt", "p"], environ={})
    assert args.url == "http://127.0.0.1:8000"
    assert args.api_key is None
    assert args.image == [Path("a.png")]
    assert (args.n, args.format, args.output) == (1, "png", Path("out.png"))
    assert (args.size, args.seed, args.steps, args.model) == (None, None, None, None)


def test_parse_api_key_flag_beats_env() -> None:
    env = {"OPENAI_API_KEY": "from-env"}
    assert parse_args(["models"], environ=env).api_key == "from-env"
    assert parse_args(["--api-key", "flag", "models"], environ=env).api_key == "flag"


@pytest.mark.parametrize(
    ("extra", "fmt", "output"),
    [
        (["-o", "x.jpg"], "jpeg", "x.jpg"),
        (["-o", "x.WEBP"], "webp", "x.WEBP"),
        (["--format", "jpeg"], "jpeg", "out.jpg"),
        (["--format", "webp", "-o", "x.png"], "webp", "x.png"),
        (["-o", "x"], "png", "x"),
    ],
)
def test_parse_format_and_output(extra: list[str], fmt: str, output: str) -> None:
    args = parse_args(["edit", "--image", "a.png", "--prompt", "p", *extra], environ={})
    assert (args.format, args.output) == (fmt, Path(output))


@pytest.mark.parametrize(
    "extra",
    [
        ["--size", "1024"],
        ["--size", "0x5"],
        ["--n", "0"],
        ["--steps", "-1"],
        ["--seed", "-3"],
        ["--format", "gif"],
    ],
)
def test_parse_rejects_bad_values(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["edit", "--image", "a.png", "--prompt", "p", *extra], environ={})
    assert exc.value.code == 2


def test_parse_requires_image_and_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["edit", "--prompt", "p"], ["edit", "--image", "a.png"], []):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv, environ={})
        assert exc.value.code == 2


def test_output_paths() -> None:
    assert output_paths(Path("d/out.png"), 1) == [Path("d/out.png")]
    assert output_paths(Path("d/out.png"), 3) == [
        Path("d/out.png"),
        Path("d/out-1.png"),
        Path("d/out-2.png"),
    ]


# --- progress --------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_one_line_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with Progress("editing", stream=stream, interval_s=0.001):
        time.sleep(0.01)
    assert stream.getvalue() == "editing ...\n"


def test_progress_spins_on_a_terminal_and_clears_its_line() -> None:
    stream = _Terminal()
    with Progress("editing", stream=stream, interval_s=0.001) as progress:
        time.sleep(0.05)
    text = stream.getvalue()
    assert "\r| editing" in text and " s" in text
    assert text.endswith("\r\033[K")
    frozen = progress.elapsed_s
    time.sleep(0.01)
    assert progress.elapsed_s == frozen


def test_client_imports_neither_torch_nor_ray() -> None:
    # The CLI must run on machines without the serving stack's heavy dependencies.
    code = "import sys, serve_app.client; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_edit_reports_the_seed_the_server_picked(image: Path, tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        response = _images_response([b"only"])
        body = response.json()
        body["data"][0]["seed"] = 1234
        return httpx.Response(200, json=body)

    argv = ["edit", "--image", str(image), "--prompt", "p", "-o", str(tmp_path / "o.png")]
    code, _, err = _run(argv, handler)
    assert code == 0 and "1 image(s), 256x256 png, seed 1234, in " in err
