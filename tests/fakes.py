"""Fakes for single-layer unit tests (injected through constructor arguments)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from PIL import Image

from serve_app.common.jobs import EditJob, EditOutput, ModelInfo, PartialImage
from serve_app.pipeline.random_weights.tokenizer import byte_level_bpe


def byte_tokenizer_json() -> str:
    """The fake models' byte-level tokenizer (`tokenizers` JSON) with no merges: one token per
    UTF-8 byte, so "a" is 1 token, "猫" 3 and "😀" 4; the Qwen control tokens one token each."""
    return str(byte_level_bpe().to_str())


FAKE_INFO = ModelInfo(
    served_names=["qwen-image-edit"],
    pipeline_class="QwenImageEditPlusPipeline",
    max_input_images=3,
    source="fake",
    tokenizer_json=byte_tokenizer_json(),
)


def png_bytes(width: int = 40, height: int = 30, mode: str = "RGB", color: Any = None) -> bytes:
    if color is None:
        color = {"RGB": (200, 30, 30), "RGBA": (0, 0, 255, 0), "L": 128, "LA": (80, 255)}.get(
            mode, 0
        )
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def run() -> Any:
            return self._fn(*args)

        return run()


def fake_edit(job: EditJob) -> EditOutput:
    """Deterministic per seed, so seed behaviour is testable without a pipeline."""
    images = []
    for seed in job.seeds:
        rng = np.random.default_rng(seed)
        images.append(rng.integers(0, 256, (job.height, job.width, 3), dtype=np.uint8))
    return EditOutput(images=images, width=job.width, height=job.height, text_tokens=3)


async def fake_edit_stream(job: EditJob) -> AsyncIterator[PartialImage | EditOutput]:
    """As the model's edit_stream: one gray preview per partial image, then fake_edit's output."""
    for index in range(job.partial_images):
        gray = np.full((job.height, job.width, 3), 60 * (index + 1), np.uint8)
        yield PartialImage(index=index, image=gray)
    yield fake_edit(job)


class _StreamMethod:
    """`handle.options(stream=True).edit_stream`: remote() returns the async iterator."""

    def __init__(self, fn: Callable[[EditJob], AsyncIterator[Any]]) -> None:
        self._fn = fn
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> AsyncIterator[Any]:
        self.calls.append(args)
        return self._fn(*args)


class FakeModelHandle:
    def __init__(
        self,
        *,
        info: ModelInfo = FAKE_INFO,
        edit: Callable[[EditJob], EditOutput] = fake_edit,
        info_error: BaseException | None = None,
        edit_stream: Callable[[EditJob], AsyncIterator[Any]] = fake_edit_stream,
    ) -> None:
        def get_info() -> ModelInfo:
            if info_error is not None:
                raise info_error
            return info

        self.info = _Method(get_info)
        self.edit = _Method(edit)
        self.edit_stream = _StreamMethod(edit_stream)
        self.options_seen: list[dict[str, Any]] = []

    def options(self, **kwargs: Any) -> FakeModelHandle:
        self.options_seen.append(kwargs)
        return self

    @property
    def jobs(self) -> list[EditJob]:
        """Every job sent, streaming or not."""
        return [call[0] for call in self.edit.calls + self.edit_stream.calls]
