"""The streams joined before the QK norm (`pipeline.speed.joint_qk`) on a CUDA GPU: the Triton kernel
(`pipeline.speed.norm_rope_kernel`) gives the PyTorch operations' values, and the compiled bf16 blocks
that call it stay as close to a float32 forward as with diffusers' processor, without the copy
of the query and key into the joined buffer.

Skipped without CUDA (conftest): `python -m pytest tests/gpu/test_joint_qk_gpu.py -v -s`.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.gpu.blocks import bf16, block_inputs, full_width_blocks, rel

pytestmark = pytest.mark.gpu


@pytest.fixture
def real_rope() -> Iterator[None]:
    from serve_app.pipeline.speed.joint_qk import disable_kernel
    from serve_app.pipeline.speed.rope import install_real_rope, uninstall_real_rope

    install_real_rope()  # as compile runs it
    yield
    disable_kernel()
    uninstall_real_rope()


@pytest.mark.gpus(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("text_first", [True, False])  # diffusers' order; Ulysses' tail padding
def test_kernel_gives_the_pytorch_values(real_rope: None, dtype: str, text_first: bool) -> None:
    import torch
    from diffusers.models.normalization import RMSNorm

    from serve_app.pipeline.speed import joint_qk

    gen = torch.Generator(device="cuda").manual_seed(0)
    at: dict[str, Any] = {"device": "cuda", "generator": gen}
    lengths = (219, 8192) if text_first else (8192, 219)
    # Views of [B, S, 3072] projections, as the processor's unflatten makes them.
    first, second = (
        torch.randn(1, n, 24 * 128, **at).to(getattr(torch, dtype)).unflatten(-1, (-1, 128))
        for n in lengths
    )
    norms = [RMSNorm(128, eps=1e-6).to("cuda", getattr(torch, dtype)) for _ in range(2)]
    freqs = [
        torch.polar(torch.ones(n, 64, device="cuda"), torch.randn(n, 64, **at)) for n in lengths
    ]
    with torch.no_grad():
        for norm in norms:
            assert norm.weight is not None
            norm.weight.copy_(torch.rand(128, **at) + 0.5)
        joint_qk.disable_kernel()
        want = joint_qk._joined(first, second, *norms, *freqs)
        assert joint_qk.enable_kernel()
        got = joint_qk._joined(first, second, *norms, *freqs)
    differ = float((got != want).float().mean())
    print(f"{dtype} text_first={text_first}: {differ:.2e} of the elements differ,"
          f" relative L2 {rel(got, want):.2e}")  # fmt: skip
    assert got.shape == want.shape == (1, sum(lengths), 24, 128) and got.dtype == want.dtype
    # The same operations: in float32 only the last bits differ (rsqrt's, fused multiply-adds),
    # and rarely enough to change a bf16 rounding.
    if dtype == "bfloat16":
        assert differ < 1e-3
    assert rel(got, want) < (1e-4 if dtype == "bfloat16" else 1e-6)


def _kernels(forward: Any) -> Counter[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    return Counter({e.key: e.count for e in prof.key_averages() if e.device_time_total > 0})


def _joins(kernels: Counter[str]) -> int:
    # Inductor names a kernel after the operators it fused: a copy into an attention input's
    # joined buffer is a pointwise kernel named with `cat` and the attention.
    return sum(
        n
        for name, n in kernels.items()
        if name.startswith("triton_poi") and "cat" in name and "scaled_dot_product" in name
    )


@pytest.mark.gpus(1)
def test_compiled_joint_blocks_stay_close_and_copy_less(real_rope: None) -> None:
    import torch

    from serve_app.pipeline.speed.joint_qk import enable_kernel, install_joint_qk

    transformer = full_width_blocks(4)
    reference = copy.deepcopy(transformer).float()
    args = {**block_inputs(), "timestep": torch.tensor([0.5], device="cuda")}
    bf16_args = bf16(args)

    def forward() -> Any:
        return transformer(**bf16_args)[0]

    with torch.inference_mode():
        exact = reference(**args)[0]
        del reference
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
        plain = forward()
        plain_kernels = _kernels(forward)
        assert install_joint_qk(transformer) == 4
        assert enable_kernel()
        joined = forward()  # recompiles: the processor is part of the block's graph
        joined_kernels = _kernels(forward)
    calls = joined_kernels["joint_norm_rope_kernel"]
    print(
        f"vs float32: compiled {rel(plain, exact):.4f}, joined compiled {rel(joined, exact):.4f};"
        f" joined vs compiled {rel(joined, plain):.2e}; attention-input copies"
        f" {_joins(plain_kernels)} -> {_joins(joined_kernels)}; kernel calls {calls}"
    )
    for name in sorted(set(plain_kernels) | set(joined_kernels)):
        if name.startswith(("triton", "joint")):
            print(f"  {plain_kernels[name]:3d} {joined_kernels[name]:3d}  {name}")
    assert calls == 16  # the query and the key of each block, a launch per stream
    assert rel(joined, exact) <= rel(plain, exact) * 1.05
    assert _joins(joined_kernels) < _joins(plain_kernels)
