"""Qwen-Image's rotary embedding in real arithmetic, so torch.compile can fuse it.

diffusers applies the rotary embedding as a complex multiply (`view_as_complex(x) * freqs`);
TorchInductor has no code generation for complex operators, so inside the compiled blocks that
step falls back to separate eager kernels between the compiled ones (`bench.forward --profile`
shows them). The same product written with real numbers,
(a + ib)(c + id) = (ac - bd) + i(ad + bc), in float32 as diffusers computes it, fuses into the
neighbouring kernels. Results match diffusers' to float32 rounding
(tests/pipeline/speed/test_rope.py).

It is written without `stack`: out = x * cos' + swap(x) * sin', where cos' and sin' repeat each
frequency for both elements of its pair (sin' negated on the first) and swap(x) exchanges the two
elements of each pair (a flipped view). Every output element is then a pointwise function of the
input, and inductor makes the QK norm and the embedding one single-pass kernel; with `stack` (a
concatenation) it was a two-loop kernel that gathered each pair with masked loads, a slower one
(docs/gpu.md; bench.forward_variants' `stackrope` variant, bench/results/h200-forward-rope.json).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# diffusers' own function, kept by `install_real_rope` for the real-valued branch and for undoing.
_original: Callable[..., Any] | None = None


def apply_rotary_emb_real(
    x: Any, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1
) -> Any:
    """Drop-in for diffusers' `apply_rotary_emb_qwen`; only the complex branch is rewritten."""
    import torch

    if use_real or not torch.is_complex(freqs_cis):
        assert _original is not None, "install_real_rope() first"
        return _original(x, freqs_cis, use_real, use_real_unbind_dim)
    return rotate_real(x, torch.view_as_real(freqs_cis))


def rotate_real(x: Any, freqs: Any) -> Any:
    """The rotary embedding of `x` [B, S, H, D] by `freqs` [S, D/2, (cos, sin)], the real view
    of diffusers' complex frequencies (so callers may join several sequences' tables first)."""
    import torch

    freqs = freqs.unsqueeze(1)  # [S, 1, D/2, (cos, sin)]
    pairs = (*freqs.shape[:-1], 2)
    cos = freqs[..., :1].expand(pairs).flatten(-2)  # [S, 1, D]: c0 c0 c1 c1 ...
    sin = freqs[..., 1:].expand(pairs).flatten(-2)
    sign = torch.tensor([-1.0, 1.0], device=x.device).repeat(x.shape[-1] // 2)  # -s0 +s0 ...
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # b0 a0 b1 a1 ...
    # (a, b) -> (a c - b s, b c + a s): the complex product, element by element.
    return (xf * cos + swapped * (sin * sign)).type_as(x)


def install_real_rope() -> bool:
    """Point diffusers' Qwen-Image attention at `apply_rotary_emb_real` (process-wide, once).
    Returns False where this diffusers has no such function (nothing changed)."""
    global _original
    from diffusers.models.transformers import transformer_qwenimage as qwen

    current = getattr(qwen, "apply_rotary_emb_qwen", None)
    if current is None:
        return False
    if current is not apply_rotary_emb_real:
        _original = current
        qwen.apply_rotary_emb_qwen = apply_rotary_emb_real  # type: ignore[assignment]
    return True


def uninstall_real_rope() -> None:
    """Undo `install_real_rope` (benchmarks compare both forms in one process)."""
    from diffusers.models.transformers import transformer_qwenimage as qwen

    if _original is not None and qwen.apply_rotary_emb_qwen is apply_rotary_emb_real:
        qwen.apply_rotary_emb_qwen = _original


__all__ = ["apply_rotary_emb_real", "install_real_rope", "rotate_real", "uninstall_real_rope"]
