"""The feed-forward GELU in the GEMM epilogue: which modules take it, and the same function.

The fused kernel itself is CUDA's (tests/gpu/test_gpu.py compares it with the two-kernel form and
a float32 reference); on CPU torch's `_addmm_activation` applies the erf GELU, so these tests check
the plumbing against that and that CPU tensors keep diffusers' path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU

from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir
from serve_app.pipeline.speed.gelu import (
    EpilogueGELU,
    SigmoidGELU,
    fusable,
    gelu_linear,
    install_gelu_epilogue,
    install_sigmoid_gelu,
    tanh_gelu_by_sigmoid,
    uninstall_gelu_epilogue,
)
from tests.pipeline.random_weights.test_synthetic import SHRUNK

CPU = frozenset({"cpu"})


def gelu(dtype: torch.dtype = torch.bfloat16, approximate: str = "tanh") -> GELU:
    torch.manual_seed(0)
    return GELU(16, 64, approximate=approximate).to(dtype)


def inputs(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.fixture(scope="module")
def transformer() -> Any:
    return build_component(
        variant_dir("2511"), "transformer", device_map={"": "cpu"}, dtype=torch.bfloat16,
        overrides=SHRUNK["transformer"],
    )  # fmt: skip


def test_install_swaps_the_tanh_gelus_and_keeps_the_weights(transformer: Any) -> None:
    keys = list(transformer.state_dict())
    layers = SHRUNK["transformer"]["num_layers"]
    try:
        assert install_gelu_epilogue(transformer) == 2 * layers  # image and text stream MLPs
        assert install_gelu_epilogue(transformer) == 0  # once only
        block = transformer.transformer_blocks[0]
        assert type(block.img_mlp.net[0]) is EpilogueGELU
        assert type(block.txt_mlp.net[0]) is EpilogueGELU
        assert list(transformer.state_dict()) == keys
    finally:
        assert uninstall_gelu_epilogue(transformer) == 2 * layers
    assert type(transformer.transformer_blocks[0].img_mlp.net[0]) is GELU


def test_cpu_tensors_keep_diffusers_path(transformer: Any) -> None:
    side = 4
    args = {
        "hidden_states": torch.randn(1, 2 * side * side, 64).bfloat16(),
        "encoder_hidden_states": torch.randn(1, 9, 64).bfloat16(),
        "encoder_hidden_states_mask": None,
        "timestep": torch.tensor([0.5]).bfloat16(),
        "img_shapes": [[(1, side, side), (1, side, side)]],
        "return_dict": False,
    }
    with torch.inference_mode():
        before = transformer(**args)[0]
        install_gelu_epilogue(transformer)
        try:
            assert not fusable(transformer.transformer_blocks[0].img_mlp.net[0], before)
            after = transformer(**args)[0]
        finally:
            uninstall_gelu_epilogue(transformer)
    assert torch.equal(before, after)


@pytest.mark.parametrize("shape", [(2, 7, 16), (5, 16), (1, 1, 3, 16)])
def test_gelu_linear_is_the_linear_then_the_gelu(shape: tuple[int, ...]) -> None:
    module = gelu()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert fusable(module, x, device_types=CPU)
    got = gelu_linear(module, x)
    # CPU's _addmm_activation is the erf GELU; CUDA's the tanh one the module asks for.
    want = F.gelu(F.linear(x.float(), module.proj.weight.float(), module.proj.bias.float()))
    assert got.shape == (*shape[:-1], 64) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.02)


def test_epilogue_gelu_forward_takes_the_fused_call_where_fusable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = gelu()
    module.__class__ = EpilogueGELU
    calls: list[int] = []

    def spy(mod: Any, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return gelu_linear(mod, x)

    monkeypatch.setattr("serve_app.pipeline.speed.gelu.gelu_linear", spy)
    x = inputs()
    module(x)
    assert calls == []  # CPU: diffusers' forward
    monkeypatch.setattr(EpilogueGELU, "device_types", CPU)
    module(x)
    assert calls == [1]


class Subclass(torch.Tensor):
    """Stands in for a quantized weight (torchao's float8 tensors are Tensor subclasses)."""


def quantized_gelu() -> GELU:
    module = gelu()
    module.proj.weight = torch.nn.Parameter(
        module.proj.weight.detach().as_subclass(Subclass), requires_grad=False
    )
    return module


def test_not_fusable_where_it_would_not_be_the_same_function() -> None:
    x = inputs()
    assert fusable(gelu(), x, device_types=CPU)
    assert not fusable(gelu(), x)  # CPU tensors by default
    assert not fusable(gelu(approximate="none"), x, device_types=CPU)  # erf GELU
    assert not fusable(gelu(torch.float32), inputs(torch.float32), device_types=CPU)
    assert not fusable(gelu(), inputs(torch.float16), device_types=CPU)  # mixed dtypes

    no_bias = gelu()
    no_bias.proj = torch.nn.Linear(16, 64, bias=False).bfloat16()
    assert not fusable(no_bias, x, device_types=CPU)

    assert not fusable(quantized_gelu(), x, device_types=CPU)


def test_install_skips_what_would_not_fuse() -> None:
    kinds = [gelu(), gelu(torch.float32), gelu(approximate="none"), quantized_gelu()]
    holder = torch.nn.ModuleList(kinds)
    assert install_gelu_epilogue(holder) == 1
    assert [type(m).__name__ for m in holder] == ["EpilogueGELU", "GELU", "GELU", "GELU"]


def test_a_lora_wrapped_projection_keeps_diffusers_path() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ff = gelu()

    holder = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"]), Holder())
    assert type(holder.ff.proj) is not torch.nn.Linear
    assert not fusable(holder.ff, inputs(), device_types=CPU)


def test_the_sigmoid_form_is_the_tanh_gelu() -> None:
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): against float64, as close as torch's own float32 form.
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])])
    want = F.gelu(x.double(), approximate="tanh")
    got = tanh_gelu_by_sigmoid(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-7, rtol=2e-6)
    torch_own = (F.gelu(x, approximate="tanh").double() - want).abs().max()
    assert (got.double() - want).abs().max() <= max(torch_own, 1e-6)
    # bf16 in, bf16 out: rounded like diffusers' form (at most one bf16 step apart).
    xb = (torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 4).bfloat16()
    got_b, want_b = tanh_gelu_by_sigmoid(xb), F.gelu(xb.float(), approximate="tanh").bfloat16()
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.float(), want_b.float(), atol=1e-6, rtol=2**-7)


def test_sigmoid_gelu_takes_the_sigmoid_form_on_its_devices_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = gelu()
    module.__class__ = SigmoidGELU
    x = inputs()
    calls: list[int] = []

    def counted(gate: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return tanh_gelu_by_sigmoid(gate)

    monkeypatch.setattr("serve_app.pipeline.speed.gelu.tanh_gelu_by_sigmoid", counted)
    with torch.inference_mode():
        on_cpu = module(x)  # CPU tensors: diffusers' F.gelu
        assert calls == []
        monkeypatch.setattr(module, "device_types", CPU)
        taken = module(x)
    assert calls == [1]
    torch.testing.assert_close(taken.float(), on_cpu.float(), atol=0.02, rtol=0.02)
    erf = gelu(approximate="none")
    erf.__class__ = SigmoidGELU
    monkeypatch.setattr(erf, "device_types", CPU)
    with torch.inference_mode():
        erf(x)
    assert calls == [1]  # the erf GELU is another function: diffusers' path


def test_install_sigmoid_gelu_takes_the_tanh_gelus_the_epilogue_left() -> None:
    kinds = [gelu(), gelu(approximate="none"), quantized_gelu(), gelu(torch.float32)]
    holder = torch.nn.ModuleList(kinds)
    assert install_gelu_epilogue(holder) == 1
    assert install_sigmoid_gelu(holder) == 2
    assert install_sigmoid_gelu(holder) == 0  # once only
    names = [type(m).__name__ for m in holder]
    assert names == ["EpilogueGELU", "GELU", "SigmoidGELU", "SigmoidGELU"]
    assert isinstance(holder[0], SigmoidGELU)  # a LoRA loaded later takes the sigmoid form
    assert uninstall_gelu_epilogue(holder) == 3
    assert all(type(m) is GELU for m in holder)
