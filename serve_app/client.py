"""`python -m serve_app.client`: a small command-line client for this server's OpenAI API.

    python -m serve_app.client edit --image a.png --prompt "make the sky purple" -o out.png
    python -m serve_app.client models
    python -m serve_app.client health

Only the standard library and httpx (no torch, no ray): it runs on any laptop. Exit codes:
0 success, 1 an error answered by the server or a failed connection, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import mimetypes
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_API_KEY = "OPENAI_API_KEY"
# The server's own request_timeout_s is 900 s; wait as long as it may take.
DEFAULT_TIMEOUT_S = 900.0
FORMATS = ("png", "jpeg", "webp")
_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_SIZE = re.compile(r"^(auto|[1-9][0-9]*x[1-9][0-9]*)$")


class ClientError(Exception):
    """A failure to report on stderr with exit code 1."""


# --- arguments -------------------------------------------------------------------------------


def _size(value: str) -> str:
    if not _SIZE.match(value):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or auto, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _seed(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.client",
        description="Call a qwen-image-edit-serve server (OpenAI Images API).",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server root (default {DEFAULT_URL})")
    parser.add_argument("--api-key", help=f"bearer key (default: ${ENV_API_KEY}, if set)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for an answer"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="POST /v1/images/edits and save the images")
    edit.add_argument(
        "--image", action="append", required=True, type=Path, help="input image (repeatable)"
    )
    edit.add_argument("--prompt", required=True)
    edit.add_argument(
        "-o", "--output", type=Path, help="output file; n>1 adds -1, -2, ... (default out.FORMAT)"
    )
    edit.add_argument("--size", type=_size, help="WIDTHxHEIGHT or auto (server default: auto)")
    edit.add_argument("--n", type=_positive_int, default=1, help="number of images")
    edit.add_argument("--seed", type=_seed, help="image i uses seed + i")
    edit.add_argument("--steps", type=_positive_int, help="num_inference_steps")
    edit.add_argument("--format", choices=FORMATS, help="output format (default: from -o, or png)")
    edit.add_argument("--model", help="model name (server default: the first it serves)")
    edit.add_argument("--negative-prompt", help="true CFG negative prompt")
    edit.add_argument("--true-cfg-scale", type=float, help="true CFG scale")

    commands.add_parser("models", help="GET /v1/models and print the model ids")
    commands.add_parser("health", help="GET /health and /ready; exit 0 only when ready")
    return parser


def parse_args(
    argv: Sequence[str] | None, *, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Parse argv, then fill the defaults that depend on the environment or other options."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    if args.api_key is None:
        args.api_key = env.get(ENV_API_KEY) or None
    if args.command == "edit":
        suffix_format = _SUFFIX_FORMATS.get(args.output.suffix.lower()) if args.output else None
        args.format = args.format or suffix_format or "png"
        if args.output is None:
            args.output = Path("out" + _FORMAT_SUFFIX[args.format])
    return args


# --- progress --------------------------------------------------------------------------------


class Progress:
    """An elapsed-time spinner on stderr while a request is in flight.

    The server answers only when every image is done, so time is all there is to show. When
    stderr is not a terminal (logs, CI), it writes one line at the start instead of redrawing.
    """

    FRAMES = "|/-\\"

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self._start = 0.0
        self._end: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def elapsed_s(self) -> float:
        end = self.clock() if self._end is None else self._end
        return end - self._start

    def __enter__(self) -> Progress:
        self._start = self.clock()
        if self.stream.isatty():
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            print(f"{self.label} ...", file=self.stream, flush=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end = self.clock()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            # Erase the spinner line so later messages start clean.
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(self.interval_s):
            char = self.FRAMES[frame % len(self.FRAMES)]
            self.stream.write(f"\r{char} {self.label} {self.elapsed_s:6.1f} s")
            self.stream.flush()
            frame += 1


# --- HTTP ------------------------------------------------------------------------------------


def describe_error(response: httpx.Response) -> str:
    """One line from an OpenAI error body (or whatever the body is)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = response.text.strip()[:300] or response.reason_phrase
        return f"HTTP {response.status_code}: {text}"
    details = [str(response.status_code), str(error.get("type") or "error")]
    if error.get("param"):
        details.append(f"param: {error['param']}")
    if error.get("code"):
        details.append(f"code: {error['code']}")
    message = f"{error.get('message') or 'no message'} ({', '.join(details)})"
    if response.headers.get("retry-after"):
        message += f"; retry after {response.headers['retry-after']} s"
    # dict.fromkeys: a header repeated by a middleware is still one id.
    request_ids = list(dict.fromkeys(response.headers.get_list("x-request-id")))
    if request_ids:
        message += f"; request id {', '.join(request_ids)}"
    return message


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise ClientError(describe_error(response))
    return response


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = _check(response).json()
    except ValueError:
        raise ClientError(f"the server answered non-JSON: {response.text[:200]!r}") from None
    if not isinstance(body, dict):
        raise ClientError(f"unexpected answer: {body!r:.200}")
    return body


def make_client(
    args: argparse.Namespace, *, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(
        base_url=args.url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(args.timeout, connect=10.0),
        transport=transport,
    )


# --- commands --------------------------------------------------------------------------------


def output_paths(output: Path, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ...: the first keeps the name asked for."""
    return [output] + [
        output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count)
    ]


def _edit_form(args: argparse.Namespace) -> dict[str, str]:
    form = {
        "prompt": args.prompt,
        "n": str(args.n),
        "response_format": "b64_json",
        "output_format": args.format,
    }
    optional = {
        "model": args.model,
        "size": args.size,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "negative_prompt": args.negative_prompt,
        "true_cfg_scale": args.true_cfg_scale,
    }
    form.update({key: str(value) for key, value in optional.items() if value is not None})
    return form


def _image_files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    # One image goes as `image`, several as repeated `image[]`, as the openai client sends them.
    field = "image" if len(paths) == 1 else "image[]"
    files = []
    for path in paths:
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        files.append((field, (path.name, content, mime)))
    return files


def _decode_images(body: Mapping[str, Any]) -> list[bytes]:
    items = body.get("data")
    if not isinstance(items, list) or not items:
        raise ClientError("the answer holds no images")
    images = []
    for item in items:
        b64 = item.get("b64_json") if isinstance(item, dict) else None
        if not isinstance(b64, str):
            raise ClientError("an image of the answer has no b64_json")
        try:
            images.append(base64.b64decode(b64, validate=True))
        except binascii.Error:
            raise ClientError("an image of the answer is not valid base64") from None
    return images


def run_edit(args: argparse.Namespace, client: httpx.Client, *, out: TextIO, err: TextIO) -> int:
    files = _image_files(args.image)
    suffix_format = _SUFFIX_FORMATS.get(args.output.suffix.lower())
    if suffix_format not in (None, args.format):
        print(f"note: writing {args.format} images to {args.output}", file=err)
    with Progress(f"editing {args.n} image(s) at {args.url}", stream=err) as progress:
        response = client.post("/v1/images/edits", data=_edit_form(args), files=files)
    body = _json(response)
    images = _decode_images(body)
    paths = output_paths(args.output, len(images))
    for path, image in zip(paths, images, strict=True):
        try:
            path.write_bytes(image)
        except OSError as exc:
            raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from None
        print(path, file=out)
    size, fmt = body.get("size", "?"), body.get("output_format", args.format)
    # The server returns the seed it picked when none was sent: --seed S makes the same images.
    seed = body["data"][0].get("seed")
    picked = f", seed {seed}" if isinstance(seed, int) else ""
    print(f"{len(paths)} image(s), {size} {fmt}{picked}, in {progress.elapsed_s:.1f} s", file=err)
    return 0


def run_models(args: argparse.Namespace, client: httpx.Client, *, out: TextIO, err: TextIO) -> int:
    body = _json(client.get("/v1/models"))
    for model in body.get("data") or []:
        print(model.get("id"), file=out)
    return 0


def run_health(args: argparse.Namespace, client: httpx.Client, *, out: TextIO, err: TextIO) -> int:
    live = client.get("/health")
    print(f"health: {'ok' if live.is_success else describe_error(live)}", file=out)
    ready = client.get("/ready")
    if not ready.is_success:
        print(f"ready: no - {describe_error(ready)}", file=out)
        return 1
    info = _json(ready)
    print(
        f"ready: {info.get('model')} ({info.get('pipeline')}, source {info.get('source')}, "
        f"device_map {info.get('device_map')})",
        file=out,
    )
    return 0 if live.is_success else 1


COMMANDS = {"edit": run_edit, "models": run_models, "health": run_health}


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command; `transport` lets tests answer in-process (httpx.MockTransport)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = parse_args(argv, environ=environ)
    try:
        with make_client(args, transport=transport) as client:
            return COMMANDS[args.command](args, client, out=out, err=err)
    except ClientError as exc:
        print(f"error: {exc}", file=err)
    except httpx.TimeoutException:
        print(f"error: no answer from {args.url} within {args.timeout:.0f} s", file=err)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=err)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
