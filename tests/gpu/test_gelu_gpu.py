"""The feed-forward GELU in cuBLASLt's GEMM epilogue (`pipeline.gelu`) on a CUDA GPU: the same
tanh GELU as diffusers' two kernels, no farther from a float32/float64 reference, and what the
compiled blocks call.

Skipped without CUDA (conftest): `python -m pytest tests/gpu/test_gelu_gpu.py -v -s`.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytestmark = pytest.mark.gpu


def rel(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.gpus(1)
@pytest.mark.parametrize("tokens", [8192, 219])  # the standard edit's image and text streams
def test_fused_gelu_is_the_tanh_gelu_of_the_linear(tokens: int) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers.models.activations import GELU

    from serve_app.pipeline.gelu import fusable, gelu_linear

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

    from serve_app.pipeline.gelu import install_gelu_epilogue
    from serve_app.pipeline.synthetic import build_component, variant_dir

    torch.manual_seed(0)
    transformer = build_component(
        variant_dir("2511"), "transformer", device_map={"": 0}, dtype=torch.bfloat16,
        overrides={"num_layers": 4},  # full width, 4 of the 60 blocks
    )  # fmt: skip
    reference = copy.deepcopy(transformer).float()
    gen = torch.Generator(device="cuda").manual_seed(1)
    side, text = 64, 219
    args = {
        "hidden_states": torch.randn(1, 2 * side * side, 64, device="cuda", generator=gen),
        "encoder_hidden_states": torch.randn(1, text, 3584, device="cuda", generator=gen),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5], device="cuda"),
        "img_shapes": [[(1, side, side), (1, side, side)]],
        "return_dict": False,
    }
    bf16 = {k: v.bfloat16() if torch.is_tensor(v) else v for k, v in args.items()}
    with torch.inference_mode():
        exact = reference(**args)[0]
        del reference
        two_kernels = transformer(**bf16)[0]
        assert install_gelu_epilogue(transformer) == 8
        fused = transformer(**bf16)[0]
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
        compiled = transformer(**bf16)[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            transformer(**bf16)
            torch.cuda.synchronize()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_addmm_activation")
    print(
        f"vs float32: two kernels {rel(two_kernels, exact):.4f}, fused {rel(fused, exact):.4f},"
        f" fused compiled {rel(compiled, exact):.4f}; _addmm_activation calls {calls}"
    )
    assert calls == 8  # image and text feed-forward of each block
    assert rel(fused, exact) <= rel(two_kernels, exact) * 1.05
    assert rel(compiled, exact) <= rel(two_kernels, exact) * 1.2
