"""Fakes for single-layer unit tests (injected through constructor arguments)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from serve_app.jobs import EditJob, EditOutput, ModelInfo

FAKE_INFO = ModelInfo(
    served_names=["qwen-image-edit"],
    pipeline_class="QwenImageEditPlusPipeline",
    max_input_images=3,
    size_multiple=16,
    default_steps=4,
    source="fake",
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


class FakeModelHandle:
    def __init__(
        self,
        *,
        info: ModelInfo = FAKE_INFO,
        edit: Callable[[EditJob], EditOutput] = fake_edit,
        info_error: BaseException | None = None,
    ) -> None:
        def get_info() -> ModelInfo:
            if info_error is not None:
                raise info_error
            return info

        self.info = _Method(get_info)
        self.edit = _Method(edit)

    @property
    def jobs(self) -> list[EditJob]:
        return [call[0] for call in self.edit.calls]
