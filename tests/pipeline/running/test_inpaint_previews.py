"""Mask edits through QwenImageEditInpaintPipeline, and streaming previews, on the real runner."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.common.sizing import inpaint_size
from serve_app.engine import EditStopped
from serve_app.pipeline.running.inpaint import inpaint_pipeline
from serve_app.pipeline.running.previews import preview_steps
from serve_app.pipeline.running.runner import EditRunner
from tests.fixtures import make_job, red_left
from tests.pipeline.conftest import TinyModels, make_runner


@pytest.fixture(scope="module")
def runner(tiny_models: TinyModels) -> EditRunner:
    return make_runner(tiny_models("2509"))


def left_mask(width: int = 48, height: int = 40) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255  # repaint the left half
    return mask


def test_inpaint_pipeline_shares_modules_without_casting(tiny_models: TinyModels) -> None:
    # bf16 weights: diffusers' from_pipe would cast the shared modules to float32 in place.
    pipe = make_runner(tiny_models("2509"), dtype="bfloat16").pipe
    inpaint = inpaint_pipeline(pipe)
    assert type(inpaint).__name__ == "QwenImageEditInpaintPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert getattr(inpaint, name) is getattr(pipe, name)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_white_mask_pixels_are_repainted_the_rest_kept(runner: EditRunner) -> None:
    # Latent-level check of diffusers' convention that masking.py converts to. Same seed (so
    # the same sampled image latents and noise), two prompts: the latents differ where the
    # mask is white and are identical where it is black (the pipeline puts the original
    # image's latents back there at the last step). A flipped mask would swap the halves.
    inpaint = inpaint_pipeline(runner.pipe)
    image = Image.fromarray(red_left(64, 64))
    mask = Image.fromarray(left_mask(64, 64), mode="L")

    def latents(prompt: str) -> Any:
        with torch.inference_mode():
            packed = inpaint(
                image=image, mask_image=mask, prompt=prompt, num_inference_steps=2, strength=1.0,
                output_type="latent", generator=torch.Generator().manual_seed(1),
            ).images  # fmt: skip
        w, h = inpaint_size((64, 64))
        return inpaint._unpack_latents(packed, h, w, inpaint.vae_scale_factor)[0, :, 0]

    a, b = latents("make it blue"), latents("add a green dog in the background")
    half = a.shape[-1] // 2
    assert not torch.equal(a[..., :half], b[..., :half])  # repainted: follows the prompt
    assert torch.equal(a[..., half:], b[..., half:])  # kept


def test_runner_mask_edit_uses_the_inpaint_pipeline_at_the_requested_size(
    runner: EditRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    inpaint = inpaint_pipeline(runner.pipe)
    real_call = type(inpaint).__call__

    def spy(self: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real_call(self, **kwargs)

    monkeypatch.setattr(type(inpaint), "__call__", spy)
    runner._inpaint = inpaint
    out = runner.run(make_job(mask=left_mask(), width=48, height=32))
    assert out.images[0].shape == (32, 48, 3)  # resized from the pipeline's ~1 MP
    assert seen["strength"] == 1.0
    assert seen["image"].size == (48, 40)
    mask = np.asarray(seen["mask_image"])
    assert (
        seen["mask_image"].mode == "L" and (mask[:, :24] == 255).all() and (mask[:, 24:] == 0).all()
    )
    assert "height" not in seen  # the inpaint pipeline ignores it; the runner resizes instead


def test_runner_rejects_a_mask_that_does_not_fit(runner: EditRunner) -> None:
    from serve_app.common.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        runner.run(make_job(mask=left_mask(20, 20)))
    with pytest.raises(InvalidRequestError):
        runner.run(make_job(mask=left_mask(), images=[red_left(), red_left()]))


@pytest.mark.parametrize(
    "steps,count,expected",
    [
        (10, 3, [1, 4, 7]),
        (4, 2, [0, 2]),
        (8, 1, [3]),
        (2, 3, [0]),  # short runs send fewer previews; never one on the last step
        (1, 3, []),
        (50, 0, []),
    ],
)
def test_preview_steps_are_evenly_spaced_and_never_the_last(
    steps: int, count: int, expected: list[int]
) -> None:
    assert preview_steps(steps, count) == expected


@pytest.mark.parametrize("masked", [False, True])
def test_previews_arrive_at_the_scheduled_steps(runner: EditRunner, masked: bool) -> None:
    previews: list[tuple[int, np.ndarray]] = []
    job = make_job(
        num_inference_steps=4, partial_images=2, width=48, height=32,
        mask=left_mask() if masked else None,
    )  # fmt: skip
    out = runner.run(job, on_partial=lambda p: previews.append((p.index, p.image)))
    assert [i for i, _ in previews] == [0, 1] and len(preview_steps(4, 2)) == 2
    for _, image in previews:
        assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    assert out.images[0].shape == (32, 48, 3)


def test_preview_decodes_the_latents_it_is_given(runner: EditRunner) -> None:
    # decode_preview must decode exactly what the pipeline's own final decode would: feed the
    # final latents to both and compare.
    from serve_app.pipeline.running.previews import decode_preview

    pipe = runner.pipe
    args: dict[str, Any] = dict(image=[Image.fromarray(red_left())], prompt="p", num_inference_steps=2,
                                height=32, width=48)  # fmt: skip
    with torch.inference_mode():
        packed = pipe(
            **args, output_type="latent", generator=torch.Generator().manual_seed(3)
        ).images
        final = pipe(**args, output_type="np", generator=torch.Generator().manual_seed(3)).images[0]
        preview = decode_preview(pipe, packed, width=48, height=32)
    expected = (final * 255).round().clip(0, 255).astype(np.uint8)
    assert preview.shape == (32, 48, 3)
    assert np.abs(preview.astype(int) - expected.astype(int)).max() <= 1


def test_step_hook_aborts_the_real_pipeline(runner: EditRunner) -> None:
    calls = []

    def step_hook(done: int, total: int) -> str | None:
        calls.append((done, total))
        return "cancelled" if len(calls) == 2 else None

    with pytest.raises(EditStopped) as info:
        runner.run(make_job(num_inference_steps=20), step_hook=step_hook)
    assert info.value.reason == "cancelled" and calls == [(1, 20), (2, 20)]
    # The lock was released: the next edit runs.
    assert runner.run(make_job()).images[0].shape == (32, 32, 3)
