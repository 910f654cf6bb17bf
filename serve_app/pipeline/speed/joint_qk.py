"""Qwen-Image's joint attention with the text and image streams joined before the QK norm.

diffusers' `QwenDoubleStreamAttnProcessor2_0` normalizes and rotates the text and the image
queries and keys separately, then joins them (`torch.cat`) for the attention. Compiled, that is
a norm + RoPE kernel per stream and a copy of the whole query and key into the joined buffer:
the query and key of every block written twice.

`joint_qkv` joins the raw projections first: the RMS norm takes, per token, its own stream's
weight, and the rotary embedding the joined frequency table. Every element gets the same float
operations as in diffusers' order (the norm is per token and head, the embedding per element):
on CPU the result is bit for bit diffusers' (tests/pipeline/speed/test_joint_qk.py). With
`enable_kernel` (compile on CUDA) that step is one Triton kernel (`norm_rope_kernel`), which
writes the joined query and key directly; written as PyTorch operations, inductor made it two
kernels that took longer than the three they replace (docs/gpu.md,
bench/results/h200-forward-joint.json and h200-forward-joint-v1.json).

Where the two streams' norms are not weighted RMS norms of the same eps, each stream is
normalized by its own module, as diffusers does, then joined.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers import transformer_qwenimage as qwen

from serve_app.pipeline.speed import norm_rope_kernel, rope

# The registered Triton op (`norm_rope_kernel`), set by `enable_kernel`; None: PyTorch operations.
_kernel: Any = None


def enable_kernel() -> bool:
    """Compute the joined query and key with the Triton kernel on CUDA tensors (process-wide);
    False where Triton is missing (nothing changed)."""
    global _kernel
    _kernel = norm_rope_kernel.joint_norm_rope_op()
    return _kernel is not None


def disable_kernel() -> None:
    """Back to the PyTorch operations (benchmarks compare both in one process)."""
    global _kernel
    _kernel = None


def joint_qkv(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    image_rotary_emb: Any = None,
    *,
    text_first: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The joined query, key and value [B, S, H, D] of `attn`'s image (`hidden_states`) and text
    (`encoder_hidden_states`) streams, text first (diffusers' order) or image first."""
    head_dim = attn.inner_dim // attn.heads

    def stream(x: torch.Tensor, projections: tuple[Any, ...], norms: tuple[Any, Any],
               freqs: Any) -> _Stream:  # fmt: skip
        query, key, value = [p(x).unflatten(-1, (-1, head_dim)) for p in projections]
        return _Stream(query, key, value, norms[0], norms[1], freqs)

    img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
    image = stream(hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                   (attn.norm_q, attn.norm_k), img_freqs)  # fmt: skip
    text = stream(encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                  (attn.norm_added_q, attn.norm_added_k), txt_freqs)  # fmt: skip
    a, b = (text, image) if text_first else (image, text)
    query = _joined(a.query, b.query, a.query_norm, b.query_norm, a.freqs, b.freqs)
    key = _joined(a.key, b.key, a.key_norm, b.key_norm, a.freqs, b.freqs)
    return query, key, torch.cat([a.value, b.value], dim=1)


class _Stream(NamedTuple):
    """One stream's projections [B, S, H, D], its QK norms and rotary frequencies."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query_norm: Any
    key_norm: Any
    freqs: Any


def split_outputs(
    attn: Any, out: torch.Tensor, *, first_len: int, text_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joined attention output [B, S, H, D] through `attn`'s output projections: (image,
    text), where the first `first_len` tokens are text (`text_first`) or image."""
    out = out.flatten(2, 3)
    first, second = out[:, :first_len].contiguous(), out[:, first_len:].contiguous()
    image, text = (second, first) if text_first else (first, second)
    image = attn.to_out[0](image)
    if len(attn.to_out) > 1:
        image = attn.to_out[1](image)  # dropout
    return image, attn.to_add_out(text)


def _joined(
    first: torch.Tensor,
    second: torch.Tensor,
    first_norm: Any,
    second_norm: Any,
    first_freqs: Any,
    second_freqs: Any,
) -> torch.Tensor:
    """The two streams joined, QK-normalized (each token by its own stream's norm) and rotated
    (where there are frequencies)."""
    if not _same_rms_norm(first_norm, second_norm):
        first = first_norm(first) if first_norm is not None else first
        second = second_norm(second) if second_norm is not None else second
        joined = torch.cat([first, second], dim=1)
        return joined if first_freqs is None else _rotated(joined, first_freqs, second_freqs)
    w1, w2 = first_norm.weight, second_norm.weight
    if _kernel is not None and first.is_cuda and first_freqs is not None:
        f1, f2 = _real(first_freqs), _real(second_freqs)
        if norm_rope_kernel.fits(first, second, f1, f2):
            return _kernel(first, second, w1, w2, f1, f2, float(first_norm.eps))  # type: ignore[no-any-return]
    joined = torch.cat([first, second], dim=1)
    # diffusers' RMSNorm.forward, step for step, with a per-token weight [S, 1, D].
    variance = joined.to(torch.float32).pow(2).mean(-1, keepdim=True)
    normed = joined * torch.rsqrt(variance + first_norm.eps)
    if w1.dtype in (torch.float16, torch.bfloat16):
        normed = normed.to(w1.dtype)
    weight = torch.cat([w1.expand(first.shape[1], -1), w2.expand(second.shape[1], -1)])
    out = normed * weight.unsqueeze(1)
    return out if first_freqs is None else _rotated(out, first_freqs, second_freqs)


def _same_rms_norm(a: Any, b: Any) -> bool:
    return (
        type(a) is RMSNorm
        and type(b) is RMSNorm
        and a.weight is not None
        and b.weight is not None
        and a.bias is None
        and b.bias is None
        and a.eps == b.eps
        and a.weight.dtype == b.weight.dtype
    )


def _real(freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' complex frequencies [S, D/2] as [S, D/2, (cos, sin)]."""
    return torch.view_as_real(freqs) if torch.is_complex(freqs) else freqs


def _rotated(x: torch.Tensor, first_freqs: Any, second_freqs: Any) -> Any:
    """The rotary embedding of the joined stream by the joined frequency table."""
    current = qwen.apply_rotary_emb_qwen  # looked up here: pipeline/speed/rope.py may replace it
    if current is rope.apply_rotary_emb_real and torch.is_complex(first_freqs):
        # Joined as real numbers: inductor has no complex code generation.
        return rope.rotate_real(x, torch.cat([_real(first_freqs), _real(second_freqs)]))
    return current(x, torch.cat([first_freqs, second_freqs]), use_real=False)


class JointQKAttnProcessor(qwen.QwenDoubleStreamAttnProcessor2_0):  # type: ignore[misc]
    """diffusers' joint-attention processor with the streams joined before the QK norm."""

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None:
            raise ValueError("the joint attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("pass encoder_hidden_states_mask, not attention_mask (as diffusers)")
        if encoder_hidden_states_mask is not None:  # as diffusers: [text mask, all-true image]
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )  # fmt: skip
        return split_outputs(attn, out.to(query.dtype), first_len=encoder_hidden_states.shape[1])


def install_joint_qk(transformer: Any) -> int:
    """Give every joint attention that runs diffusers' own processor a `JointQKAttnProcessor`,
    keeping its attention backend and parallel config; returns how many."""
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is qwen.QwenDoubleStreamAttnProcessor2_0:
            joined = JointQKAttnProcessor()
            joined.__dict__.update(processor.__dict__)  # _attention_backend, _parallel_config
            module.set_processor(joined)
            count += 1
    return count


def uninstall_joint_qk(transformer: Any) -> int:
    """Undo `install_joint_qk` (benchmarks compare both in one process); returns how many."""
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) is JointQKAttnProcessor:
            plain = qwen.QwenDoubleStreamAttnProcessor2_0()
            plain.__dict__.update(processor.__dict__)
            module.set_processor(plain)
            count += 1
    return count


__all__ = [
    "JointQKAttnProcessor",
    "disable_kernel",
    "enable_kernel",
    "install_joint_qk",
    "joint_qkv",
    "split_outputs",
    "uninstall_joint_qk",
]
