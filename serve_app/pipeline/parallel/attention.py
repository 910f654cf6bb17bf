"""Ulysses attention over a text stream padded at its end: the padded keys left out, no mask.

diffusers splits the text and image streams evenly over the Ulysses ranks, so `PromptRecorder`
pads the text to a multiple of U. With diffusers' processor the padding is hidden by the
transformer's `encoder_hidden_states_mask`, which makes every attention a masked one: the mask is
all-gathered in every layer and cuDNN's masked kernel is slower than the unmasked one (docs/gpu.md,
bench/results/h200-forward-sdpa-mask.json).

`TailPaddedAttnProcessor` is the joint-attention processor (`pipeline/speed/joint_qk.py`: diffusers'
`QwenDoubleStreamAttnProcessor2_0` with the streams joined before the QK norm, on CUDA by one
Triton kernel) with one change when a call brings `key_padding`: it joins the streams as
[image, text] instead of [text, image]. After
Ulysses' all-to-all each rank holds the whole sequence as the ranks' pieces one after the other,
and the padding, at the end of the last rank's text, is then the end of the whole sequence: the
attention takes the keys and values before it (a view, no copy) and no mask. Attention does not
depend on the order of the keys, and the padded queries' outputs are never read (the
transformer returns the image tokens), so the result is the masked one's, up to the order of
float sums. diffusers' Ulysses template (`_templated_context_parallel_attention`) still does the
all-to-alls; only the attention op between them is this module's.

`key_padding` is a tensor whose length is the number of padded tokens + 2: under torch.compile a
size is symbolic (one compiled graph for every count) except 0 and 1, which it specializes.
Used with the `native` attention backend (torch's SDPA, what the shipped configs run); with
another backend the mask path stays.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers import transformer_qwenimage as qwen

from serve_app.pipeline.speed.joint_qk import JointQKAttnProcessor, joint_qkv, split_outputs

# key_padding's length is the padding + this, so it is never 0 or 1 (see the module docstring).
MARKER_OFFSET = 2
# Backends whose attention is torch's SDPA (None: diffusers' default, native).
NATIVE_BACKENDS = (None, "native")


def padding_marker(pad: int, device: torch.device | str) -> torch.Tensor:
    """The `key_padding` argument for `pad` padded text tokens (no data is read, only its size)."""
    return torch.empty(pad + MARKER_OFFSET, dtype=torch.uint8, device=device)


def _padded_keys(marker: torch.Tensor) -> int:
    return marker.shape[0] - MARKER_OFFSET


def tail_padded_attention_op(
    ctx: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """diffusers' attention `forward_op` interface ([B, S, H, D] in and out); `attn_mask` is the
    `key_padding` marker: that many keys at the end of the sequence are left out."""
    if return_lse or attn_mask is None or is_causal:
        raise ValueError("tail-padded attention takes a key_padding marker, no lse, not causal")
    keep = key.shape[1] - _padded_keys(attn_mask)
    out = F.scaled_dot_product_attention(
        query.permute(0, 2, 1, 3),
        key[:, :keep].permute(0, 2, 1, 3),
        value[:, :keep].permute(0, 2, 1, 3),
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    return out.permute(0, 2, 1, 3)


def _no_backward(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("tail-padded attention is for inference")


class TailPaddedAttnProcessor(JointQKAttnProcessor):
    """The joint-attention processor plus the `key_padding` path (module docstring)."""

    def __call__(  # type: ignore[override]
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        key_padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_padding is None:
            base: Any = super().__call__  # diffusers annotates FloatTensor throughout
            return base(  # type: ignore[no-any-return]
                attn, hidden_states, encoder_hidden_states,
                encoder_hidden_states_mask, attention_mask, image_rotary_emb,
            )  # fmt: skip
        if encoder_hidden_states is None:
            raise ValueError("the joint attention needs encoder_hidden_states (the text stream)")
        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise ValueError("key_padding replaces the text mask; pass one or the other")
        seq_img = hidden_states.shape[1]
        # [image, text]: the padding ends the sequence, also after Ulysses' all-to-all.
        query, key, value = joint_qkv(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb, text_first=False
        )
        if self._parallel_config is None:
            out = tail_padded_attention_op(None, query, key, value, key_padding, _save_ctx=False)
        else:
            from diffusers.models.attention_dispatch import _templated_context_parallel_attention

            out = _templated_context_parallel_attention(
                query, key, value, key_padding, 0.0, False, None, False, False,
                forward_op=tail_padded_attention_op, backward_op=_no_backward,
                _parallel_config=self._parallel_config,
            )  # fmt: skip
        return split_outputs(attn, out.to(query.dtype), first_len=seq_img, text_first=False)


def install_tail_padding(transformer: Any) -> int:
    """Give every joint attention of `transformer` a `TailPaddedAttnProcessor` (before
    `enable_parallelism`, which configures the processors it finds); returns how many."""
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if type(processor) in (qwen.QwenDoubleStreamAttnProcessor2_0, JointQKAttnProcessor):
            padded = TailPaddedAttnProcessor()
            padded.__dict__.update(processor.__dict__)  # the attention backend, if one was set
            module.set_processor(padded)
            count += 1
    return count


def uses_native_attention(transformer: Any) -> bool:
    """Whether the joint attentions run torch's SDPA (the backend set by the speed switches)."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, TailPaddedAttnProcessor):
            backend = processor._attention_backend
            return getattr(backend, "value", backend) in NATIVE_BACKENDS
    return False


__all__ = [
    "MARKER_OFFSET",
    "TailPaddedAttnProcessor",
    "install_tail_padding",
    "padding_marker",
    "tail_padded_attention_op",
    "uses_native_attention",
]
