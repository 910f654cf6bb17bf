"""The ingress's limits are enough for the pipelines: inputs at every documented limit run.

The ingress refuses what is past `limits.max_prompt_tokens` (counted with the tokenizer the
runner shares in `ModelInfo`) and `limits.max_input_aspect_ratio`; here the real pipelines of
each kind (tiny weights, real classes) take what is exactly at those limits, in every script,
with the most reference images, and with a mask, so nothing the ingress lets through fails in
the model.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.common.config import LimitsConfig
from serve_app.ingress.tokens import PromptTokenizer, tokenizer_for
from serve_app.pipeline.running.runner import EditRunner
from tests.fixtures import TRUE_CFG, make_job, random_image, text_of_tokens
from tests.pipeline.conftest import TinyModels, make_runner

LIMITS = LimitsConfig()
RATIO = int(LIMITS.max_input_aspect_ratio)


@pytest.fixture(scope="module", autouse=True)
def small_working_area() -> None:
    """The pipelines at their real working areas here (the package's fixture shrinks them)."""


@pytest.fixture(scope="module")
def plus(tiny_models: TinyModels) -> EditRunner:
    return make_runner(tiny_models("2509"))


def counter(runner: EditRunner) -> PromptTokenizer:
    tokenizer = tokenizer_for(runner.info)
    assert tokenizer is not None, "the runner shares its tokenizer"
    return tokenizer


def thin(long: int, *, wide: bool, seed: int = 0) -> np.ndarray:
    """An image of aspect ratio exactly RATIO:1."""
    short = long // RATIO
    return random_image(long, short, seed) if wide else random_image(short, long, seed)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_the_shared_tokenizer_counts_as_the_pipeline_does(plus: EditRunner, text: str) -> None:
    expected = len(plus.pipe.tokenizer(text)["input_ids"])
    assert counter(plus).count(text) == expected


def test_control_tokens_are_the_pipelines_added_tokens(plus: EditRunner) -> None:
    tokenizer = counter(plus)
    assert tokenizer.control_tokens("a <|image_pad|> b <|im_end|>") == [
        "<|im_end|>",
        "<|image_pad|>",
    ]
    assert tokenizer.control_tokens("a <|image pad|> b") == []


def test_plus_takes_the_most_references_at_the_aspect_limit_and_the_longest_texts(
    plus: EditRunner,
) -> None:
    tokenizer = counter(plus)
    images = [thin(800, wide=True), thin(800, wide=False, seed=1), thin(RATIO, wide=True, seed=2)]
    assert len(images) == plus.info.max_input_images
    job = make_job(
        images=images,
        prompt=text_of_tokens(LIMITS.max_prompt_tokens, tokenizer.count),
        **{
            **TRUE_CFG,
            "negative_prompt": text_of_tokens(LIMITS.max_prompt_tokens, tokenizer.count, offset=1),
        },
        num_inference_steps=1,
    )
    out = plus.run(job)
    assert out.images[0].shape == (32, 32, 3)
    assert out.text_tokens == LIMITS.max_prompt_tokens


def test_the_first_edit_model_takes_its_reference_at_the_aspect_limit(
    tiny_models: TinyModels,
) -> None:
    runner = make_runner(tiny_models("edit"))
    job = make_job(
        images=[thin(900, wide=False)],
        prompt=text_of_tokens(LIMITS.max_prompt_tokens, counter(runner).count),
        num_inference_steps=1,
    )
    assert runner.run(job).images[0].shape == (32, 32, 3)


def test_a_mask_edit_at_the_aspect_limit(plus: EditRunner) -> None:
    image = thin(800, wide=True)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[:, :400] = 255
    out = plus.run(make_job(images=[image], mask=mask, num_inference_steps=1))
    assert out.images[0].shape == (32, 32, 3)
