"""Real diffusers pipelines (tiny, random weights) for the runner-level tests, built once.

The pipelines resize every reference image to about 1 MP for the VAE (and the inpaint pipeline
works at 1 MP): on CPU that one size costs most of every test edit, whatever the test's own
sizes. The runner-level tests assert how the runner drives the pipeline (equal latents across
paths, switching, shapes, hooks), which holds at any working area, so `small_working_area`
divides it by 64 in this process, in diffusers and in `serve_app.common.sizing` alike (the
runner's predictions of the pipelines' sizes stay exact). A module that tests the pipelines at
their real sizes overrides the fixture (tests/pipeline/running/test_runner_limits.py); the integration
tests run the replicas, unpatched, in their own processes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_app.common.config import GenerationConfig, ModelConfig
from serve_app.pipeline.loading.loader import load_runner
from serve_app.pipeline.random_weights.tiny import build_tiny_lora, ensure_tiny_model
from serve_app.pipeline.running.runner import EditRunner
from tests.fixtures import red_left

TinyModels = Callable[[str], Path]

#: The working area's divisor in `small_working_area` (1 MP -> 128x128).
WORKING_AREA_DIVISOR = 64


@pytest.fixture(scope="module", autouse=True)
def small_working_area() -> Iterator[None]:
    """The pipelines' fixed working areas (reference images, inpaint) divided by
    `WORKING_AREA_DIVISOR`, for the tests of one module (module scope: before its fixtures)."""
    from diffusers.pipelines.qwenimage import (
        pipeline_qwenimage_edit,
        pipeline_qwenimage_edit_inpaint,
        pipeline_qwenimage_edit_plus,
    )

    from serve_app.common import sizing

    with pytest.MonkeyPatch.context() as patch:
        for module in (
            pipeline_qwenimage_edit,
            pipeline_qwenimage_edit_inpaint,
            pipeline_qwenimage_edit_plus,
        ):
            patch.setattr(module, "calculate_dimensions", _smaller(module.calculate_dimensions))
        patch.setattr(
            sizing,
            "PIPELINE_WORKING_PIXELS",
            sizing.PIPELINE_WORKING_PIXELS // WORKING_AREA_DIVISOR,
        )
        yield


def _smaller(calculate_dimensions: Callable[..., Any]) -> Callable[..., Any]:
    def smaller(target_area: float, ratio: float) -> Any:
        return calculate_dimensions(target_area // WORKING_AREA_DIVISOR, ratio)

    return smaller


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    """variant -> a tiny model folder of that variant (all share seed 0, hence weights).

    The per-user cache that `source: tiny` uses: built once per machine (seconds each), then
    reused; a build of another recipe version or variant there is rebuilt, never reused.
    """

    @functools.cache
    def get(variant: str) -> Path:
        return ensure_tiny_model(variant=variant)

    return get


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Hugging Face cache, offline: what HF_HOME=<tmp> HF_HUB_OFFLINE=1 give a new
    process (the Hub reads both once at import, so this process patches its constants)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield cache


@pytest.fixture(scope="session")
def tiny_lora(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tiny_models("2509"), tmp_path_factory.mktemp("lora"))


@contextlib.contextmanager
def decoded_latents(pipe: Any) -> Iterator[list[Any]]:
    """Every latents tensor `pipe`'s VAE decodes while inside, in order: what an edit produced,
    compared before the tiny VAE (whose random weights hide most differences in pixels)."""
    seen: list[Any] = []
    vae = pipe.vae
    original = vae.decode

    def decode(latents: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(latents.detach().clone())
        return original(latents, *args, **kwargs)

    vae.decode = decode
    try:
        yield seen
    finally:
        del vae.decode  # the class's method again


def make_runner(path: Path, **model: Any) -> EditRunner:
    config = ModelConfig.model_validate(
        {"source": "local", "path": str(path), "device_map": "cpu", **model}
    )
    return load_runner(config, GenerationConfig())


def final_latents(
    runner: EditRunner, *, images: list[np.ndarray] | None = None, seed: int = 7
) -> Any:
    """The denoised latents of the runner's own pipeline, called as the runner calls it.

    The tiny VAE decoder is nearly blind to its input (random weights: output changes of
    ~1e-5), so model-level differences are asserted on latents, where they are large.
    """
    import torch
    from PIL import Image

    pil = [Image.fromarray(a) for a in images or [red_left()]]
    image = pil if runner.info.max_input_images > 1 else pil[0]
    with torch.inference_mode():
        return runner.pipe(
            image=image,
            prompt="make it blue",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).images
