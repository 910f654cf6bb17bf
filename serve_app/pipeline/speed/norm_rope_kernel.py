"""One Triton kernel for the joint attention's query (or key): join the two streams, RMS-norm
each token by its own stream's weight, rotate by the joined frequency table.

What torch.compile makes of the same PyTorch operations (`joint_qk`): a norm + RoPE kernel per
stream and a copy into the joined buffer; with the streams joined first, two kernels, both slower
than the memory traffic requires (the query and key of 60 blocks need to be read once and
written once; docs/gpu.md, bench/results/h200-forward-joint.json). This kernel reads each
row of 128 values once, keeps it in registers for the norm and the rotation, and writes the
joined row: registered as a `torch.library.triton_op`, inductor calls it inside the compiled
blocks.

Every value gets diffusers' operations in diffusers' order and precision: float32 mean of
squares, `x * rsqrt(mean + eps)` rounded to the weight's dtype, times the weight rounded again,
then the complex product (a c - b s, b c + a s) in float32 rounded to the input's dtype.
tests/pipeline/speed/test_norm_rope_kernel.py runs it in Triton's interpreter on CPU against the
PyTorch form; tests/gpu/test_joint_qk_gpu.py on the GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

OP_NAME = "qwen_image_edit_serve::joint_norm_rope"
# Rows (one token's one head) per program and warps per program: the fastest of a sweep of 4-64
# rows x 1-8 warps on an H200 (bench/results/h200-norm-rope-kernel-probe.json).
BLOCK_ROWS = 16
NUM_WARPS = 2


@functools.cache
def joint_norm_rope_op() -> Any:
    """The registered op's overload (`torch.ops...joint_norm_rope.default`, what compiled code
    calls), or None where Triton cannot be imported (no kernel: the PyTorch form runs instead)."""
    kernel = make_kernel()
    if kernel is None:
        return None

    @torch.library.triton_op(OP_NAME, mutates_args=())  # type: ignore[misc]
    def joint_norm_rope(
        first: torch.Tensor,
        second: torch.Tensor,
        first_weight: torch.Tensor,
        second_weight: torch.Tensor,
        first_freqs: torch.Tensor,
        second_freqs: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        weights, freqs = (first_weight, second_weight), (first_freqs, second_freqs)
        return launch(torch.library.wrap_triton(kernel), first, second, weights, freqs, eps=eps)

    namespace, name = OP_NAME.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def launch(
    kernel: Any,
    first: torch.Tensor,
    second: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    freqs: tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float,
) -> torch.Tensor:
    """Run `kernel` (from `make_kernel`) on the streams [B, S, H, D], their norms' weights [D]
    and real frequency tables [S, D/2, 2] (first's, second's); returns the joined
    [B, S1 + S2, H, D]. One launch per stream: a program then reads rows of one stream only, at
    addresses the compiler can vectorize (choosing the stream per row could not be vectorized and
    was slower: bench/results/h200-forward-joint-v1.json)."""
    batch, first_len, heads, dim = first.shape
    seq = first_len + second.shape[1]
    out = first.new_empty((batch, seq, heads, dim))
    round_half = weights[0].dtype in (torch.float16, torch.bfloat16)
    offset = 0
    for x, weight, table in zip((first, second), weights, freqs, strict=True):
        rows = batch * x.shape[1] * heads
        kernel[((rows + BLOCK_ROWS - 1) // BLOCK_ROWS,)](
            x, out, weight, table,
            rows, x.shape[1], heads, seq, offset,
            x.stride(0), x.stride(1), x.stride(2), table.stride(0),
            eps,
            HALF=dim // 2, BLOCK=BLOCK_ROWS, ROUND=round_half, num_warps=NUM_WARPS,
        )  # fmt: skip
        offset += x.shape[1]
    return out


def make_kernel() -> Any:
    """The Triton kernel (interpreted on CPU where TRITON_INTERPRET=1 is set before this call),
    or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit  # type: ignore[untyped-decorator]
    def joint_norm_rope_kernel(
        x_ptr, out_ptr, w_ptr, f_ptr,
        rows, length, heads, seq, offset,
        sxb, sxs, sxh, fs,
        eps,
        HALF: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr,
    ):  # fmt: skip
        # BLOCK rows (one token's one head each) of one stream [B, length, H, 2 * HALF].
        row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = (row < rows)[:, None]
        h = row % heads
        s = (row // heads) % length
        b = row // (heads * length)
        dim = tl.arange(0, 2 * HALF)[None, :]
        src = x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + dim
        x = tl.load(src, mask=valid, other=0.0).to(tl.float32)
        # diffusers' RMSNorm: float32 mean of squares; rounded where the weight is half precision.
        y = x * tl.math.rsqrt(tl.sum(x * x, axis=1) / (2 * HALF) + eps)[:, None]
        weight = tl.load(w_ptr + dim).to(tl.float32)
        if ROUND:
            half = w_ptr.dtype.element_ty
            z = (y.to(half).to(tl.float32) * weight).to(half).to(tl.float32)
        else:
            z = y * weight
        # The complex product of each pair (a, b) with (cos, sin): (a c - b s, b c + a s).
        a, bv = tl.split(tl.reshape(z, (BLOCK, HALF, 2)))
        table = f_ptr + (s * fs)[:, None] + tl.arange(0, HALF)[None, :] * 2
        cos = tl.load(table, mask=valid, other=0.0)
        sin = tl.load(table + 1, mask=valid, other=0.0)
        rotated = tl.reshape(tl.join(a * cos - bv * sin, bv * cos + a * sin), (BLOCK, 2 * HALF))
        dest = out_ptr + ((b * seq + offset + s) * heads + h)[:, None] * (2 * HALF) + dim
        tl.store(dest, rotated.to(out_ptr.dtype.element_ty), mask=valid)

    return joint_norm_rope_kernel


def fits(first: torch.Tensor, second: torch.Tensor, first_freqs: Any, second_freqs: Any) -> bool:
    """Whether the kernel takes these streams [B, S, H, D] and real frequency tables
    [S, D/2, 2]: the same batch, heads and dtype, D a power of two, rows contiguous."""
    dim = first.shape[-1]
    return (
        first.dim() == second.dim() == 4
        and first.shape[0] == second.shape[0]
        and first.shape[2:] == second.shape[2:]
        and first.dtype == second.dtype
        and dim >= 4
        and dim & (dim - 1) == 0
        and first.shape[1] > 0
        and second.shape[1] > 0
        and first.stride(-1) == second.stride(-1) == 1
        and all(
            f.dim() == 3 and f.shape[-2:] == (dim // 2, 2) and f.dtype == torch.float32
            and f.stride(-1) == 1 and f.stride(-2) == 2
            for f in (first_freqs, second_freqs)
        )
    )  # fmt: skip


__all__ = [
    "BLOCK_ROWS",
    "NUM_WARPS",
    "OP_NAME",
    "fits",
    "joint_norm_rope_op",
    "launch",
    "make_kernel",
]
