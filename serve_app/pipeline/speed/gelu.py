"""The feed-forward's first linear and its tanh GELU as one cuBLASLt GEMM (bias + GELU epilogue).

Each of the transformer's 120 feed-forwards (image and text stream of 60 blocks) starts with
diffusers' `GELU` module: a linear to 4x the width, then `gelu(approximate="tanh")`. Compiled, that
is a cuBLAS GEMM writing the 12288-wide hidden state, then an inductor kernel reading it back and
writing it again: for the standard edit's 8192 image tokens 2 x 200 MB of memory traffic per block
for a pointwise function (that kernel's share of a forward: docs/gpu.md,
bench/results/h200-forward-variants-gelu.json). cuBLASLt computes the same tanh GELU in the GEMM's
epilogue, on the float32 accumulator before the one rounding to bf16 (torch's `_addmm_activation`,
which inductor calls as it is). The values differ from the two-kernel form by bf16 rounding only
(tests/gpu).

Used where it is the same function: CUDA tensors (on CPU torch's `_addmm_activation` applies
the exact erf GELU, not tanh), a plain `nn.Linear` with a bias (a LoRA-wrapped or fp8-quantized
projection keeps its own GEMM), half-precision weights.

Where the epilogue cannot take the GELU (fp8-quantized or LoRA-wrapped projections), the tanh
GELU runs after the GEMM as x * sigmoid(2u) instead of 0.5 x (1 + tanh(u)), u = sqrt(2/pi)
(x + 0.044715 x^3): the same function, since 0.5 (1 + tanh(u)) = sigmoid(2u), but one exp where
inductor's tanh is a longer libdevice routine. With fp8 the GELU shares a kernel with the per-row
quantization of the next linear's input, which computes it twice (for the row's maximum, then to
quantize), so the cheaper form pays twice (docs/gpu.md, bench/results/h200-forward-fp8-gelu.json).
The two forms round differently in float32 (the differing bf16 outputs nearly all tiny values
below zero); the sigmoid form is never farther from float64 (tests/gpu).
"""

from __future__ import annotations

import math
from typing import Any

from diffusers.models.activations import GELU

# Where `_addmm_activation(use_gelu=True)` is the tanh GELU (its CUDA kernel's epilogue).
_DEVICE_TYPES = frozenset({"cuda"})


def takes_epilogue(module: Any) -> bool:
    """Whether `module` (a diffusers GELU) computes what `gelu_linear` does on CUDA: tanh GELU
    of a plain half-precision `nn.Linear` with a bias."""
    import torch

    proj: Any = getattr(module, "proj", None)
    return (
        getattr(module, "approximate", None) == "tanh"
        and type(proj) is torch.nn.Linear  # a subclass or wrapper (LoRA) is not
        and proj.bias is not None
        and type(proj.weight) is torch.nn.Parameter  # no tensor subclass (torchao fp8)
        and proj.weight.dtype in (torch.bfloat16, torch.float16)
    )


def fusable(
    module: Any, hidden_states: Any, *, device_types: frozenset[str] = _DEVICE_TYPES
) -> bool:
    """Whether this call of `module` can run as one GEMM with a GELU epilogue."""
    return (
        takes_epilogue(module)
        and hidden_states.dtype == module.proj.weight.dtype
        and hidden_states.device.type in device_types
    )


def gelu_linear(module: Any, hidden_states: Any) -> Any:
    """`gelu(proj(hidden_states), approximate="tanh")` as one `_addmm_activation` call."""
    import torch

    proj = module.proj
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = torch._addmm_activation(proj.bias, flat, proj.weight.t(), use_gelu=True)
    return out.view(*hidden_states.shape[:-1], proj.out_features)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def tanh_gelu_by_sigmoid(gate: Any) -> Any:
    """`gelu(gate, approximate="tanh")` written as gate * sigmoid(2u), in float32 as inductor
    computes the tanh form (module docstring)."""
    import torch

    x = gate.float()
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    return (x * torch.sigmoid(2.0 * inner)).to(gate.dtype)


class SigmoidGELU(GELU):  # type: ignore[misc]
    """diffusers' GELU whose tanh form is computed by `tanh_gelu_by_sigmoid` on CUDA (same
    weights, same state dict: only the class of each instance changes)."""

    device_types: frozenset[str] = _DEVICE_TYPES

    def gelu(self, gate: Any) -> Any:
        if self.approximate == "tanh" and gate.device.type in self.device_types:
            return tanh_gelu_by_sigmoid(gate)
        return super().gelu(gate)


class EpilogueGELU(SigmoidGELU):
    """diffusers' GELU whose forward takes `gelu_linear` where `fusable`, and the sigmoid form
    where not (a LoRA loaded later wraps the projection)."""

    def forward(self, hidden_states: Any) -> Any:
        if fusable(self, hidden_states, device_types=self.device_types):
            return gelu_linear(self, hidden_states)
        return super().forward(hidden_states)


def install_gelu_epilogue(transformer: Any) -> int:
    """Switch the GELUs of `transformer` that `takes_epilogue` to `EpilogueGELU` (none where
    fp8 quantized the linears); returns how many. A LoRA loaded later wraps the projection,
    and those calls take diffusers' path again (`fusable`)."""
    count = 0
    for module in transformer.modules():
        if type(module) is GELU and takes_epilogue(module):
            module.__class__ = EpilogueGELU
            count += 1
    return count


def install_sigmoid_gelu(transformer: Any) -> int:
    """Switch the tanh GELUs of `transformer` left to diffusers (after `install_gelu_epilogue`:
    those whose projection fp8 quantized) to `SigmoidGELU`; returns how many."""
    count = 0
    for module in transformer.modules():
        if type(module) is GELU and getattr(module, "approximate", None) == "tanh":
            module.__class__ = SigmoidGELU
            count += 1
    return count


def uninstall_gelu_epilogue(transformer: Any) -> int:
    """Undo `install_gelu_epilogue` and `install_sigmoid_gelu` (benchmarks compare the forms
    in one process)."""
    count = 0
    for module in transformer.modules():
        if type(module) in (EpilogueGELU, SigmoidGELU):
            module.__class__ = GELU
            count += 1
    return count


__all__ = [
    "EpilogueGELU",
    "SigmoidGELU",
    "fusable",
    "gelu_linear",
    "install_gelu_epilogue",
    "install_sigmoid_gelu",
    "takes_epilogue",
    "tanh_gelu_by_sigmoid",
    "uninstall_gelu_epilogue",
]
