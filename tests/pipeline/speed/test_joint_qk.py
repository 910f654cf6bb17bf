"""The streams joined before the QK norm (`pipeline.joint_qk`): bit for bit diffusers' processor
on CPU, in both stream orders, with and without the real-valued RoPE and the text mask."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers import transformer_qwenimage as qwen

from serve_app.pipeline.parallel.attention import TailPaddedAttnProcessor, install_tail_padding
from serve_app.pipeline.speed import joint_qk
from serve_app.pipeline.speed.joint_qk import (
    JointQKAttnProcessor,
    install_joint_qk,
    joint_qkv,
    uninstall_joint_qk,
)
from serve_app.pipeline.speed.rope import install_real_rope, uninstall_real_rope
from tests.pipeline.parallel.test_transformer import CONFIG, _inputs, _transformer


@pytest.fixture(params=["complex", "real"])
def rope_form(request: pytest.FixtureRequest) -> Iterator[str]:
    """diffusers' complex RoPE, or the real-valued one compile runs (`pipeline.rope`)."""
    if request.param == "real":
        install_real_rope()
    yield request.param
    uninstall_real_rope()
    joint_qk.disable_kernel()


def run(transformer: Any, dtype: torch.dtype, *, mask: bool = False) -> torch.Tensor:
    inputs = _inputs()
    text = inputs["prompt"].to(dtype)
    with torch.inference_mode():
        out: torch.Tensor = transformer(
            hidden_states=inputs["hidden_states"].to(dtype),
            timestep=inputs["timestep"].to(dtype),
            img_shapes=inputs["img_shapes"],
            encoder_hidden_states=text,
            encoder_hidden_states_mask=(
                torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=torch.long) if mask else None
            ),
            return_dict=False,
        )[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [False, True])
def test_same_bits_as_diffusers(rope_form: str, dtype: torch.dtype, mask: bool) -> None:
    transformer = _transformer().to(dtype)
    want = run(transformer, dtype, mask=mask)
    assert install_joint_qk(transformer) == CONFIG["num_layers"]
    got = run(transformer, dtype, mask=mask)
    # Enabled, the Triton kernel still leaves CPU tensors to the PyTorch operations.
    joint_qk.enable_kernel()
    enabled = run(transformer, dtype, mask=mask)
    assert uninstall_joint_qk(transformer) == CONFIG["num_layers"]
    again = run(transformer, dtype, mask=mask)
    assert torch.equal(got, want) and torch.equal(enabled, want) and torch.equal(again, want)
    assert want.abs().sum() > 0


def test_install_keeps_the_backend_and_parallel_config() -> None:
    transformer = _transformer()
    first = transformer.transformer_blocks[0].attn
    first.processor._attention_backend = "native"
    first.processor._parallel_config = config = object()
    assert install_joint_qk(transformer) == CONFIG["num_layers"]
    assert install_joint_qk(transformer) == 0  # once
    joined = first.processor
    assert type(joined) is JointQKAttnProcessor
    assert joined._attention_backend == "native" and joined._parallel_config is config
    assert uninstall_joint_qk(transformer) == CONFIG["num_layers"]
    plain = first.processor
    assert type(plain) is qwen.QwenDoubleStreamAttnProcessor2_0
    assert plain._attention_backend == "native" and plain._parallel_config is config


def test_ulysses_processor_is_joined_already_and_left_alone() -> None:
    # parallel/attention.py's processor runs `joint_qkv` itself; it replaces a joined one too.
    transformer = _transformer()
    install_joint_qk(transformer)
    assert install_tail_padding(transformer) == CONFIG["num_layers"]
    assert isinstance(transformer.transformer_blocks[0].attn.processor, TailPaddedAttnProcessor)
    assert install_joint_qk(transformer) == 0
    assert uninstall_joint_qk(transformer) == 0


def _attention_inputs(dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor, Any]:
    transformer = _transformer().to(dtype)
    attn = transformer.transformer_blocks[0].attn
    with torch.no_grad():  # distinct weights per norm: a swapped weight would show
        for i, norm in enumerate((attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)):
            norm.weight.copy_(torch.linspace(0.5, 1.5 + i, norm.weight.numel()))
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 32, attn.query_dim, generator=g).to(dtype)
    text = torch.randn(1, 7, attn.added_kv_proj_dim, generator=g).to(dtype)
    dim = attn.inner_dim // attn.heads
    angles = [torch.randn(n, dim // 2, generator=g) for n in (32, 7)]
    freqs = tuple(torch.polar(torch.ones_like(a), a) for a in angles)
    return attn, image, text, freqs


def _diffusers_order(attn: Any, image: Any, text: Any, freqs: Any, *, text_first: bool) -> Any:
    """Each stream normalized and rotated by itself, as diffusers' processor does, then joined."""
    dim = attn.inner_dim // attn.heads
    rope = qwen.apply_rotary_emb_qwen
    parts = []
    for x, projections, norms, f in (
        (image, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k), freqs[0]),
        (text, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
         (attn.norm_added_q, attn.norm_added_k), freqs[1]),
    ):  # fmt: skip
        q, k, v = (p(x).unflatten(-1, (-1, dim)) for p in projections)
        q, k = (rope(n(t), f, use_real=False) for n, t in zip(norms, (q, k), strict=True))
        parts.append((q, k, v))
    if text_first:
        parts.reverse()
    return tuple(torch.cat([a, b], dim=1) for a, b in zip(*parts, strict=True))


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_either_order_equals_each_stream_alone(
    rope_form: str, text_first: bool, dtype: torch.dtype
) -> None:
    attn, image, text, freqs = _attention_inputs(dtype)
    with torch.no_grad():
        got = joint_qkv(attn, image, text, freqs, text_first=text_first)
        want = _diffusers_order(attn, image, text, freqs, text_first=text_first)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w)


def test_other_norms_are_applied_per_stream(rope_form: str) -> None:
    # Different eps: not one joined RMS norm; each stream keeps its own module.
    attn, image, text, freqs = _attention_inputs(torch.float32)
    attn.norm_added_q = RMSNorm(attn.inner_dim // attn.heads, eps=1e-3)
    attn.norm_k = None
    with torch.no_grad():
        got = joint_qkv(attn, image, text, freqs)
        dim = attn.inner_dim // attn.heads
        tq = attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, (-1, dim)))
        iq = attn.norm_q(attn.to_q(image).unflatten(-1, (-1, dim)))
        rope: Any = qwen.apply_rotary_emb_qwen
        want_q = torch.cat(
            [rope(tq, freqs[1], use_real=False), rope(iq, freqs[0], use_real=False)], 1
        )
        ik = attn.to_k(image).unflatten(-1, (-1, dim))  # no norm
        tk = attn.norm_added_k(attn.add_k_proj(text).unflatten(-1, (-1, dim)))
        want_k = torch.cat(
            [rope(tk, freqs[1], use_real=False), rope(ik, freqs[0], use_real=False)], 1
        )
    assert torch.equal(got[0], want_q) and torch.equal(got[1], want_k)


def test_without_rotary_embedding_only_norms() -> None:
    attn, image, text, _ = _attention_inputs(torch.float32)
    with torch.no_grad():
        q, _, _ = joint_qkv(attn, image, text, None)
        dim = attn.inner_dim // attn.heads
        want = torch.cat(
            [attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, (-1, dim))),
             attn.norm_q(attn.to_q(image).unflatten(-1, (-1, dim)))], dim=1,
        )  # fmt: skip
    assert torch.equal(q, want)
