"""The real-arithmetic rotary embedding equals diffusers' complex one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers.models.transformers import transformer_qwenimage as qwen

from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir
from serve_app.pipeline.speed.rope import (
    apply_rotary_emb_real,
    install_real_rope,
    uninstall_real_rope,
)
from tests.pipeline.random_weights.test_synthetic import SHRUNK

ORIGINAL = qwen.apply_rotary_emb_qwen


@pytest.fixture
def patched() -> Iterator[None]:
    assert install_real_rope()
    assert install_real_rope()  # a second call changes nothing
    assert qwen.apply_rotary_emb_qwen is apply_rotary_emb_real
    yield
    uninstall_real_rope()
    assert qwen.apply_rotary_emb_qwen is ORIGINAL


def freqs(seq: int, half: int) -> torch.Tensor:
    angles = torch.randn(seq, half, generator=torch.Generator().manual_seed(1)) * 3
    return torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_as_the_complex_form(patched: None, dtype: torch.dtype) -> None:
    x = torch.randn(2, 37, 4, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    f = freqs(37, 8)
    got = apply_rotary_emb_real(x, f, use_real=False)
    want = ORIGINAL(x, f, use_real=False)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_for_bit_the_stacked_product(patched: None, dtype: torch.dtype) -> None:
    # The form before (the pairs' two results joined by stack), which inductor fused worse:
    # the pointwise rewrite computes the same float32 operations, so the same bits.
    x = torch.randn(2, 37, 4, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    f = freqs(37, 64)
    real = torch.view_as_real(f).unsqueeze(1)
    cos, sin = real[..., 0], real[..., 1]
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    stacked = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)
    assert torch.equal(apply_rotary_emb_real(x, f, use_real=False), stacked)


def test_real_branch_is_passed_through(patched: None) -> None:
    x = torch.randn(1, 2, 5, 8)  # [B, H, S, D] in that branch
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(
        apply_rotary_emb_real(x, (cos, sin), use_real=True), ORIGINAL(x, (cos, sin), use_real=True)
    )


def _forward(module: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    side = 4
    with torch.inference_mode():
        return module(
            hidden_states=torch.randn(1, 2 * side * side, 64, generator=gen),
            encoder_hidden_states=torch.randn(1, 7, 64, generator=gen),
            encoder_hidden_states_mask=None,
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, side, side), (1, side, side)]],
            return_dict=False,
        )[0]


def test_transformer_output_unchanged() -> None:
    module = build_component(
        variant_dir("2511"), "transformer", device_map={"": "cpu"}, dtype=torch.float32,
        overrides=SHRUNK["transformer"],
    )  # fmt: skip
    before = _forward(module)
    try:
        install_real_rope()
        after = _forward(module)
    finally:
        qwen.apply_rotary_emb_qwen = ORIGINAL
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert before.abs().sum() > 0
