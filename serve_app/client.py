"""`qwen-image-edit`: the command-line client, on the official `openai` SDK.

    qwen-image-edit edit --image a.png --prompt "make the sky purple" --out out.png
    qwen-image-edit edit --image a.png --prompt "..." --out out.png --force   # overwrite out.png
    qwen-image-edit edit --image a.png --prompt "..." -n 2 --seed 7 --stream
    qwen-image-edit models
    qwen-image-edit health

(`python -m serve_app.client ...` is the same.) Requests, retries (408/409/429/5xx, honouring
`Retry-After`), timeouts and errors are the SDK's; this module only maps options to its calls, the
extensions to `extra_body`, and writes the files. It imports no other part of this project and
neither torch nor Ray, so the client install (`pip install qwen-image-edit-serve`) is light.
An existing output file is never overwritten silently: the edit is refused before any request
unless `--force`. A server serving random weights (the embedded demo model of `make run`) says so
in its `/v1/models` cards (`metadata.random_weights`), and the command repeats it on stderr.
Exit codes: 0 success, 1 an error answer, no connection or an existing output, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import openai
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000"
ENV_URL = "QWEN_IMAGE_EDIT_URL"
ENV_API_KEY = "OPENAI_API_KEY"
# The server's own request_timeout_s is 600 s (queueing included); wait a bit longer.
DEFAULT_TIMEOUT_S = 900.0
FORMATS = ("png", "jpeg", "webp")
MAX_PARTIAL_IMAGES = 3
_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
_SIZE = re.compile(r"^(auto|[1-9][0-9]*x[1-9][0-9]*)$")
# Sent when no key is given: the SDK needs one, and a server without keys ignores it.
_NO_KEY = "no-key"


class ClientError(Exception):
    """A failure reported on stderr with exit code 1."""


# --- arguments -------------------------------------------------------------------------------


def _size(value: str) -> str:
    if not _SIZE.match(value):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or auto, got {value!r}")
    return value


def _int_at_least(low: int) -> Any:
    def parse(value: str) -> int:
        number = int(value)
        if number < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {number}")
        return number

    return parse


def _partials(value: str) -> int:
    number = int(value)
    if not 0 <= number <= MAX_PARTIAL_IMAGES:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_PARTIAL_IMAGES}, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-image-edit",
        description="Call a qwen-image-edit-serve server (OpenAI Images API) with the openai SDK.",
    )
    parser.add_argument(
        "--url", help=f"server root, without /v1 (default: ${ENV_URL}, else {DEFAULT_URL})"
    )
    parser.add_argument("--api-key", help=f"bearer key (default: ${ENV_API_KEY}, if set)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for an answer"
    )
    parser.add_argument(
        "--max-retries",
        type=_int_at_least(0),
        default=2,
        help="retries of 408/409/429/5xx answers, after their Retry-After (default 2)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    edit = commands.add_parser("edit", help="POST /v1/images/edits and save the images")
    edit.add_argument(
        "-i", "--image", action="append", required=True, type=Path, help="input image (repeat)"
    )
    edit.add_argument("-p", "--prompt", required=True)
    edit.add_argument("--mask", type=Path, help="PNG whose transparent pixels are repainted")
    edit.add_argument(
        "-o", "--out", "--output", dest="out", type=Path,
        help="output file; n>1 adds -1, -2, ... (default out.FORMAT)",
    )  # fmt: skip
    edit.add_argument(
        "-f", "--force", action="store_true", help="overwrite output files that already exist"
    )
    edit.add_argument("-n", "--n", type=_int_at_least(1), default=1, help="number of images")
    edit.add_argument("--seed", type=_int_at_least(0), help="image i uses seed + i")
    edit.add_argument("--size", type=_size, help="WIDTHxHEIGHT or auto (server default: auto)")
    edit.add_argument("--steps", type=_int_at_least(1), help="num_inference_steps")
    edit.add_argument(
        "--format", choices=FORMATS, help="output format (default: from --out, or png)"
    )
    edit.add_argument("--compression", type=int, help="output_compression, 0-100")
    edit.add_argument("--model", help="model name (server default: the first it serves)")
    edit.add_argument("--negative-prompt", help="true CFG negative prompt")
    edit.add_argument("--true-cfg-scale", type=float, help="true CFG scale")
    edit.add_argument(
        "--stream",
        action="store_true",
        help="stream: a progress bar fed by partial images (n>1: one stream per image)",
    )
    edit.add_argument(
        "--partial-images",
        type=_partials,
        default=MAX_PARTIAL_IMAGES,
        help=f"previews per image with --stream (0-{MAX_PARTIAL_IMAGES}, default 3)",
    )
    edit.add_argument(
        "--save-partials", action="store_true", help="with --stream, also write the previews"
    )

    commands.add_parser("models", help="GET /v1/models and print the model ids")
    commands.add_parser("health", help="GET /health and /ready; exit 0 only when ready")
    return parser


def parse_args(
    argv: Sequence[str] | None, *, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Parse argv, then fill the defaults that depend on the environment or other options."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    args.url = (args.url or env.get(ENV_URL) or DEFAULT_URL).rstrip("/")
    if args.api_key is None:
        args.api_key = env.get(ENV_API_KEY) or None
    if args.command == "edit":
        suffix_format = _SUFFIX_FORMATS.get(args.out.suffix.lower()) if args.out else None
        args.format = args.format or suffix_format or "png"
        if args.out is None:
            args.out = Path("out" + _FORMAT_SUFFIX[args.format])
    return args


def make_client(args: argparse.Namespace, *, http_client: Any = None) -> openai.OpenAI:
    """The SDK client; `http_client` lets tests answer in-process."""
    return openai.OpenAI(
        base_url=f"{args.url}/v1",
        api_key=args.api_key or _NO_KEY,
        timeout=args.timeout,
        max_retries=args.max_retries,
        http_client=http_client,
    )


# --- errors ----------------------------------------------------------------------------------


def describe_error(exc: openai.APIStatusError, *, key_given: bool = True) -> str:
    """One line from an OpenAI error answer: message, status, type, param, code, request id."""
    body = exc.body if isinstance(exc.body, dict) else {}
    message = body.get("message") or exc.message
    details = [str(exc.status_code), str(body.get("type") or "error")]
    details += [f"{k}: {body[k]}" for k in ("param", "code") if body.get(k)]
    line = f"{message} ({', '.join(details)})"
    retry_after = exc.response.headers.get("retry-after")
    if retry_after:
        line += f"; retry after {retry_after} s"
    request_ids = list(dict.fromkeys(exc.response.headers.get_list("x-request-id")))
    if request_ids:
        line += f"; request id {', '.join(request_ids)}"
    if exc.status_code == 401 and not key_given:
        line += f"; pass --api-key or set ${ENV_API_KEY}"
    return line


# --- edit ------------------------------------------------------------------------------------


def output_paths(out: Path, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ...: the first keeps the name asked for."""
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def _upload(path: Path) -> tuple[str, bytes, str]:
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path.name, content, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@dataclass
class EditRequest:
    """The SDK call's arguments; `seed` apart, since a stream per image shifts it."""

    kwargs: dict[str, Any]
    extensions: dict[str, Any]
    seed: int | None

    def call(self, client: openai.OpenAI, *, n: int, seed: int | None, **more: Any) -> Any:
        extra = dict(self.extensions)
        if seed is not None:
            extra["seed"] = seed
        return client.images.edit(**self.kwargs, n=n, extra_body=extra or None, **more)


def edit_request(args: argparse.Namespace) -> EditRequest:
    images = [_upload(path) for path in args.image]
    # One image goes as `image`, several as `image[]` (the SDK's own choice of field name).
    kwargs: dict[str, Any] = {
        "image": images[0] if len(images) == 1 else images,
        "prompt": args.prompt,
        "output_format": args.format,
    }
    optional = {
        "mask": _upload(args.mask) if args.mask else None,
        "model": args.model,
        "size": args.size,
        "output_compression": args.compression,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    extensions = {
        "num_inference_steps": args.steps,
        "negative_prompt": args.negative_prompt,
        "true_cfg_scale": args.true_cfg_scale,
    }
    return EditRequest(
        kwargs=kwargs,
        extensions={k: v for k, v in extensions.items() if v is not None},
        seed=args.seed,
    )


@dataclass
class Result:
    image: bytes
    seed: int | None
    size: str


def _seed_of(item: Any, sent: int | None) -> int | None:
    # The server returns the seed it picked as an extension field (`data[i].seed`).
    reported = (getattr(item, "model_extra", None) or {}).get("seed")
    return int(reported) if isinstance(reported, int) else sent


def _decode(b64: str | None) -> bytes:
    if not b64:
        raise ClientError("the answer holds no b64_json image")
    return base64.b64decode(b64)


def edit_once(client: openai.OpenAI, request: EditRequest, *, n: int) -> list[Result]:
    response = request.call(client, n=n, seed=request.seed)
    results = []
    for i, item in enumerate(response.data or []):
        sent = None if request.seed is None else request.seed + i
        results.append(Result(_decode(item.b64_json), _seed_of(item, sent), response.size or "?"))
    if not results:
        raise ClientError("the answer holds no images")
    return results


def edit_streamed(
    client: openai.OpenAI,
    request: EditRequest,
    *,
    n: int,
    partial_images: int,
    progress: tqdm[Any],
    on_partial: Any = None,
) -> Iterator[Result]:
    """One stream per image (a stream carries one), image i with seed + i as n would."""
    for i in range(n):
        sent = None if request.seed is None else request.seed + i
        progress.set_description(f"image {i + 1}/{n}")
        stream = request.call(client, n=1, seed=sent, stream=True, partial_images=partial_images)
        completed = None
        with stream:
            for event in stream:
                progress.update(1)
                if event.type == "image_edit.partial_image":
                    if on_partial is not None:
                        on_partial(i, event.partial_image_index, _decode(event.b64_json))
                elif event.type == "image_edit.completed":
                    completed = event
        if completed is None:
            raise ClientError("the stream ended without the completed image")
        # Fewer previews than asked (a very short edit) leave the bar short: fill it per image.
        progress.update((i + 1) * (partial_images + 1) - progress.n)
        yield Result(_decode(completed.b64_json), _seed_of(completed, sent), completed.size)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from None


def partial_path(path: Path, index: int) -> Path:
    """Where `--save-partials` writes preview `index` of the image going to `path`."""
    return path.with_name(f"{path.stem}.partial{index}{path.suffix}")


def planned_paths(args: argparse.Namespace) -> list[Path]:
    """Every file the edit may write: the images and, with --save-partials, their previews."""
    paths = output_paths(args.out, args.n)
    if args.stream and args.save_partials:
        previews = range(args.partial_images)
        paths += [partial_path(path, i) for path in paths for i in previews]
    return paths


def refuse_to_overwrite(args: argparse.Namespace) -> None:
    """Checked before the request, so a refusal costs the server nothing."""
    existing = [str(path) for path in planned_paths(args) if path.exists()]
    if existing and not args.force:
        raise ClientError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}:"
            " pass --force (-f) to overwrite, or --out to write elsewhere"
        )


def random_weights_note(client: openai.OpenAI, model: str | None) -> str | None:
    """The warning for a model the server says has random weights (its output is noise), from
    its `/v1/models` card; None when it has real weights or the card cannot be read."""
    try:
        cards = list(client.with_options(max_retries=0).models.list())
    except openai.APIError:
        return None  # an informative extra: never the reason an edit fails
    card = next((c for c in cards if c.id == model), cards[0] if cards else None)
    metadata = (getattr(card, "model_extra", None) or {}).get("metadata") or {}
    if not metadata.get("random_weights"):
        return None
    return (
        f"note: the server's model ({card.id if card else '?'}, source"
        f" {metadata.get('source')}) has random weights: its images are noise. It is a demo of"
        " the API; serve the real model to get real edits (README, 'Real weights on GPUs')."
    )


def run_edit(args: argparse.Namespace, client: openai.OpenAI, *, out: TextIO, err: TextIO) -> int:
    refuse_to_overwrite(args)
    request = edit_request(args)
    suffix_format = _SUFFIX_FORMATS.get(args.out.suffix.lower())
    if suffix_format not in (None, args.format):
        print(f"note: writing {args.format} images to {args.out}", file=err)
    paths = output_paths(args.out, args.n)
    t0 = time.monotonic()
    if args.stream:

        def save_partial(image: int, index: int, data: bytes) -> None:
            if args.save_partials:
                path = paths[image]
                _write(partial_path(path, index), data)

        total = args.n * (args.partial_images + 1)
        with tqdm(total=total, file=err, unit="event", dynamic_ncols=True) as progress:
            results = list(
                edit_streamed(
                    client,
                    request,
                    n=args.n,
                    partial_images=args.partial_images,
                    progress=progress,
                    on_partial=save_partial,
                )
            )
    else:
        print(f"editing {args.n} image(s) at {args.url} ...", file=err, flush=True)
        results = edit_once(client, request, n=args.n)
    for path, result in zip(output_paths(args.out, len(results)), results, strict=True):
        _write(path, result.image)
        print(path, file=out)
        print(
            f"{path}: {result.size}, seed {result.seed if result.seed is not None else '?'}",
            file=err,
        )
    elapsed = time.monotonic() - t0
    print(f"{len(results)} image(s) in {elapsed:.1f} s", file=err)
    note = random_weights_note(client, args.model)
    if note:
        print(note, file=err)
    return 0


# --- models, health --------------------------------------------------------------------------


def run_models(args: argparse.Namespace, client: openai.OpenAI, *, out: TextIO, err: TextIO) -> int:
    for model in client.models.list():
        print(model.id, file=out)
        metadata = (model.model_extra or {}).get("metadata") or {}
        if metadata.get("random_weights"):
            print(f"{model.id}: random weights (source {metadata.get('source')})", file=err)
    return 0


def run_health(args: argparse.Namespace, client: openai.OpenAI, *, out: TextIO, err: TextIO) -> int:
    # Probes outside /v1 through the SDK's own request path; a probe is not retried.
    probe = client.with_options(max_retries=0)
    try:
        probe.get(f"{args.url}/health", cast_to=object)
        live = True
        print("health: ok", file=out)
    except openai.APIStatusError as exc:
        live = False
        print(f"health: {describe_error(exc)}", file=out)
    try:
        info = probe.get(f"{args.url}/ready", cast_to=object)
    except openai.APIStatusError as exc:
        print(f"ready: no - {describe_error(exc)}", file=out)
        return 1
    info = info if isinstance(info, dict) else {}
    print(
        f"ready: {info.get('model')} ({info.get('pipeline')}, source {info.get('source')}, "
        f"device_map {info.get('device_map')})",
        file=out,
    )
    if info.get("random_weights"):
        print("note: random weights: its images are noise (a demo of the API)", file=out)
    return 0 if live else 1


COMMANDS = {"edit": run_edit, "models": run_models, "health": run_health}


def main(
    argv: Sequence[str] | None = None,
    *,
    http_client: Any = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one command (the console script's entry point)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = parse_args(argv, environ=environ)
    with ExitStack() as stack:
        try:
            client = stack.enter_context(make_client(args, http_client=http_client))
            return COMMANDS[args.command](args, client, out=out, err=err)
        except ClientError as exc:
            print(f"error: {exc}", file=err)
        except openai.APIStatusError as exc:
            print(f"error: {describe_error(exc, key_given=bool(args.api_key))}", file=err)
        except openai.APITimeoutError:
            print(f"error: no answer from {args.url} within {args.timeout:.0f} s", file=err)
        except openai.APIConnectionError as exc:
            print(f"error: cannot reach {args.url}: {exc.__cause__ or exc}", file=err)
        except openai.APIError as exc:  # an `error` event in a stream
            print(f"error: {exc.message}", file=err)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
