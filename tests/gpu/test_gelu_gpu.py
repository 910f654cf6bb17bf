"""The feed-forward GELU in cuBLASLt's GEMM epilogue (`pipeline.speed.gelu`) on a CUDA GPU: the same
tanh GELU as diffusers' two kernels, no farther from a float32/float64 reference, and what the
compiled blocks call.

Skipped without CUDA (conftest): `python -m pytest tests/gpu/test_gelu_gpu.py -v -s`.
"""

from __future__ import annotations

import copy

import pytest

from tests.gpu.blocks import bf16, block_inputs, full_width_blocks, rel

pytestmark = pytest.mark.gpu


@pytest.mark.gpus(1)
@pytest.mark.parametrize("tokens", [8192, 219])  # the standard edit's image and text streams
def test_fused_gelu_is_the_tanh_gelu_of_the_linear(tokens: int) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers.models.activations import GELU

    from serve_app.pipeline.speed.gelu import fusable, gelu_linear

    torch.manual_seed(0)
    module = GELU(3072, 12288, approximate="tanh").to("cuda", torch.bfloat16)
    x = torch.randn(1, tokens, 3072, device="cuda", dtype=torch.bfloat16)
    assert fusable(module, x)
    with torch.inference_mode():
        fused = gelu_linear(module, x)
        two_kernels = module.gelu(module.proj(x))  # diffusers' GELU.forward
        w, b = module.proj.weight.double(), module.proj.bias.double()
        truth = F.gelu(F.linear(x.double(), w, b), approximate="tanh")
    print(
        f"{tokens} tokens: fused {rel(fused, truth):.2e}, two kernels {rel(two_kernels, truth):.2e}"
    )
    assert fused.shape == two_kernels.shape and fused.dtype == torch.bfloat16
    # One bf16 rounding instead of two: never farther from the exact value.
    assert rel(fused, truth) <= rel(two_kernels, truth) * 1.01
    assert rel(fused, two_kernels) < 0.01


@pytest.mark.gpus(1)
def test_compiled_blocks_call_the_fused_gemm_and_stay_close() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from serve_app.pipeline.speed.gelu import install_gelu_epilogue

    transformer = full_width_blocks(4)
    reference = copy.deepcopy(transformer).float()
    args = {**block_inputs(), "timestep": torch.tensor([0.5], device="cuda")}
    bf16_args = bf16(args)
    with torch.inference_mode():
        exact = reference(**args)[0]
        del reference
        two_kernels = transformer(**bf16_args)[0]
        assert install_gelu_epilogue(transformer) == 8
        fused = transformer(**bf16_args)[0]
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
        compiled = transformer(**bf16_args)[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            transformer(**bf16_args)
            torch.cuda.synchronize()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_addmm_activation")
    print(
        f"vs float32: two kernels {rel(two_kernels, exact):.4f}, fused {rel(fused, exact):.4f},"
        f" fused compiled {rel(compiled, exact):.4f}; _addmm_activation calls {calls}"
    )
    assert calls == 8  # image and text feed-forward of each block
    assert rel(fused, exact) <= rel(two_kernels, exact) * 1.05
    assert rel(compiled, exact) <= rel(two_kernels, exact) * 1.2


@pytest.mark.gpus(1)
def test_compiled_sigmoid_form_is_the_tanh_gelu() -> None:
    # What fp8's feed-forwards run: the GELU after the GEMM as x * sigmoid(2u), compiled.
    import torch
    import torch.nn.functional as F
    from diffusers.models.activations import GELU

    from serve_app.pipeline.speed.gelu import SigmoidGELU

    torch.manual_seed(0)
    gate = torch.randn(8192, 12288, device="cuda", dtype=torch.bfloat16) * 3
    tanh_form = GELU(8, 8, approximate="tanh").to("cuda")
    sigmoid_form = copy.deepcopy(tanh_form)
    sigmoid_form.__class__ = SigmoidGELU
    with torch.inference_mode():
        want = torch.compile(tanh_form.gelu, fullgraph=True)(gate)
        got = torch.compile(sigmoid_form.gelu, fullgraph=True)(gate)
        truth = F.gelu(gate.double(), approximate="tanh")
    print(f"sigmoid form {rel(got, truth):.2e}, tanh form {rel(want, truth):.2e} vs float64")
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel(got, truth) <= rel(want, truth) * 1.01
    # Element by element: never farther from float64 than the tanh form, or than one bf16
    # rounding. Far below zero 1 + tanh(u) cancels to 0 even in float64, where the sigmoid form
    # keeps a tiny value (e.g. -8e-21): hence the 1e-12 floor.
    err_got, err_want = (got.double() - truth).abs(), (want.double() - truth).abs()
    assert bool((err_got <= torch.maximum(err_want, truth.abs() * 2**-8 + 1e-12)).all())
    differ = (got != want).float().mean().item()
    print(f"bf16 outputs that differ (by one rounding): {differ:.4f}, rel {rel(got, want):.2e}")
    assert rel(got, want) < 2e-3
