"""Helpers shared by the test packages: one EditJob factory, test images, a free port, the ingress
app in process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig
from serve_app.common.jobs import EditJob
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.fakes import FakeModelHandle

# True CFG as the model cards run it: two transformer passes per step.
TRUE_CFG: dict[str, Any] = {"negative_prompt": " ", "true_cfg_scale": 4.0}


def red_left(width: int = 48, height: int = 40) -> np.ndarray:
    """A two-colour RGB image: the left half red, the right half black."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (220, 30, 30)
    return image


def random_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_job(**fields: Any) -> EditJob:
    """An EditJob with small defaults (one `red_left()` reference, 32x32, 2 steps, seed 7, no true
    CFG); any field can be given."""
    defaults: dict[str, Any] = {
        "request_id": "t",
        "model": "qwen-image-edit",
        "images": [red_left()],
        "prompt": "make it blue",
        "negative_prompt": None,
        "true_cfg_scale": 1.0,
        "num_inference_steps": 2,
        "width": 32,
        "height": 32,
        "seeds": [7],
    }
    return EditJob(**{**defaults, **fields})


def cancel_after(coro: Coroutine[Any, Any, Any], seconds: float) -> None:
    """Run `coro` as a task and cancel it after `seconds`, as Serve does when the caller goes
    away; it must end cancelled."""

    async def main() -> None:
        task = asyncio.create_task(coro)
        await asyncio.sleep(seconds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (other test runs share the machine: never a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REDIS_SERVER = "redis-server"


@contextlib.contextmanager
def redis_server(
    folder: Path, *, password: str | None = None, timeout_s: float = 20.0
) -> Iterator[str]:
    """A redis-server of the test's own on a free loopback port, its files in `folder`: yields
    its URL (without the password). Skips only where the binary is missing (.ci/run installs
    Debian's redis-server)."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        pytest.skip(
            "redis-server is not installed (.ci/run installs it: apt-get install redis-server)"
        )
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
               "--save", "", "--appendonly", "no", "--protected-mode", "yes"]  # fmt: skip
    if password:
        command += ["--requirepass", password]
    with (folder / "redis.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), 1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ingress_client(config: dict[str, Any], *, api_keys: list[str] | None = None) -> TestClient:
    """The ingress app for `config` (AppConfig's fields) over a `FakeModelHandle`, in process;
    server errors come back as 500 answers, as a client would see them."""
    service = EditService(model=FakeModelHandle(), config=AppConfig.model_validate(config))
    return TestClient(create_app(service, api_keys=api_keys), raise_server_exceptions=False)


def text_of_tokens(tokens: int, count: Callable[[str], int], *, offset: int = 0) -> str:
    """A text of exactly `tokens` tokens (as `count` counts them), mixing CJK, emoji, accented
    and ASCII letters: the text limits must hold for every script."""
    pieces = itertools.cycle([*["猫", "😀", "é", "a", " ", "字", "🎨", "x"][offset:], "猫"])
    text = ""
    while count(text) < tokens:
        for piece in (next(pieces), "a", " "):
            if count(text + piece) <= tokens:
                text += piece
                break
        else:
            raise AssertionError(f"cannot reach exactly {tokens} tokens from {len(text)} chars")
    return text


BOUNDARY = "xyzBOUNDARYxyz"


def multipart(
    fields: list[tuple[str, bytes]], *, image: bytes | None = None, charset: str | None = None
) -> tuple[bytes, str]:
    """(body, content type) of a hand-made multipart edit: text fields as raw bytes (clients'
    encoders refuse invalid text) and one PNG as `image` (a 40x30 one by default)."""
    from tests.fakes import png_bytes

    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    ]
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + (image if image is not None else png_bytes())
        + b"\r\n"
    )
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    if charset:
        content_type += f"; charset={charset}"
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), content_type
