"""Attention without the text padding's keys (`parallel.attention`) in one process: the same output
as diffusers' masked attention, and the pre-hook that chooses it (Ulysses over CPU ranks:
tests/pipeline/parallel/test_transformer.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from serve_app.pipeline.parallel import attention
from serve_app.pipeline.parallel.attention import (
    MARKER_OFFSET,
    TailPaddedAttnProcessor,
    install_tail_padding,
    padding_marker,
)
from serve_app.pipeline.parallel.transformer import PromptRecorder, skip_text_padding
from tests.pipeline.parallel.test_transformer import CONFIG, _inputs, _transformer


@pytest.fixture
def tail_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    op = attention.tail_padded_attention_op

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(attention, "tail_padded_attention_op", counted)
    return calls


def run(transformer: Any, embeds: torch.Tensor, mask: Any, **extra: Any) -> torch.Tensor:
    inputs = _inputs()
    common = {k: inputs[k] for k in ("hidden_states", "timestep", "img_shapes")}
    with torch.inference_mode():
        out: torch.Tensor = transformer(
            **common, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
            return_dict=False, **extra,
        )[0]  # fmt: skip
    return out


def padded(recorder: PromptRecorder, text: torch.Tensor) -> tuple[torch.Tensor, Any]:
    class Pipe:
        def encode_prompt(self, embeds: Any) -> tuple[Any, None]:
            return embeds, None

    pipe = Pipe()
    recorder.install(pipe)
    return pipe.encode_prompt(text)  # type: ignore[no-any-return]


def test_padding_marker_sizes() -> None:
    assert padding_marker(1, "cpu").shape == (1 + MARKER_OFFSET,)
    assert padding_marker(3, "cpu").shape == (5,)  # never 0 or 1: compile keeps it symbolic


@pytest.mark.parametrize("pad", [1, 3])
def test_keys_left_out_equal_the_masked_attention(pad: int, tail_calls: list[int]) -> None:
    text = _inputs()["prompt"]  # 7 tokens
    embeds = torch.cat([text, torch.zeros(1, pad, text.shape[2])], dim=1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), torch.zeros(1, pad, dtype=torch.long)], 1)
    unpadded = run(_transformer(), text, None)
    masked = run(_transformer(), embeds, mask)
    tail = _transformer()
    assert install_tail_padding(tail) == CONFIG["num_layers"]
    assert install_tail_padding(tail) == 0  # once
    left_out = run(tail, embeds, None, attention_kwargs={"key_padding": padding_marker(pad, "cpu")})
    assert tail_calls == [1] * CONFIG["num_layers"]
    torch.testing.assert_close(masked, unpadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_out, unpadded, rtol=1e-5, atol=1e-5)
    # Without key_padding the processor is diffusers' own: the mask path, the same values.
    torch.testing.assert_close(run(tail, embeds, mask), masked, rtol=0, atol=0)


def test_a_mask_and_key_padding_together_are_refused() -> None:
    tail = _transformer()
    install_tail_padding(tail)
    text = _inputs()["prompt"]
    mask = torch.ones(1, 7, dtype=torch.long)
    with pytest.raises(ValueError, match="key_padding replaces the text mask"):
        run(tail, text, mask, attention_kwargs={"key_padding": padding_marker(1, "cpu")})


def test_the_pre_hook_turns_only_the_recorders_end_padding_into_key_padding(
    tail_calls: list[int],
) -> None:
    tail = _transformer()
    install_tail_padding(tail)
    recorder = PromptRecorder(multiple=2)
    recorder.reset()
    skip_text_padding(tail, recorder)
    embeds, mask = padded(recorder, _inputs()["prompt"])  # 7 -> 8 tokens
    assert embeds.shape[1] == 8 and recorder.tail_padding(mask) == 1
    reference = run(_transformer(), embeds, mask)
    torch.testing.assert_close(run(tail, embeds, mask), reference, rtol=1e-5, atol=1e-5)
    assert len(tail_calls) == CONFIG["num_layers"]
    # A mask the recorder did not make (or made for an earlier edit) is left to diffusers.
    other = mask.clone()
    assert recorder.tail_padding(other) == 0
    torch.testing.assert_close(run(tail, embeds, other), reference, rtol=0, atol=0)
    assert len(tail_calls) == CONFIG["num_layers"]
    recorder.reset()
    assert recorder.tail_padding(mask) == 0


def test_the_pre_hook_keeps_the_mask_for_another_attention_backend(
    tail_calls: list[int],
) -> None:
    tail = _transformer()
    install_tail_padding(tail)
    tail.set_attention_backend("_native_math")
    recorder = PromptRecorder(multiple=2)
    recorder.reset()
    skip_text_padding(tail, recorder)
    embeds, mask = padded(recorder, _inputs()["prompt"])
    run(tail, embeds, mask)
    assert tail_calls == []
    assert isinstance(tail.transformer_blocks[0].attn.processor, TailPaddedAttnProcessor)
