"""8-bit weights: FP8 linear layers for the transformer (torchao), the `model.quantization: fp8`
switch, and int8 weight-only layers where speed does not matter but memory does.

Each Linear of the transformer's 60 blocks gets float8 (e4m3) weights with one scale per output
row, and its input is quantized per row (per token) on the fly; the matmul runs on FP8 tensor
cores (`torch._scaled_mm`, Ada/Hopper and newer) and returns bf16. With `model.quantize_at_load`
(the one-card configs), the per-block modulation linears (`img_mod`, `txt_mod`: one row per
timestep, read once per edit to make the modulation tables) get int8 weights (weight-only: their
bf16 input is kept, the weights are dequantized in the matmul), which halves their ~6.8 B
parameters at no cost per step. With `model.text_encoder: int8` the text encoder's linears get
int8 weights the same way (any GPU: no FP8 tensor cores needed). What stays in bf16, and why:
the input/output projections (`img_in`, `txt_in`, `proj_out`: few FLOPs, direct effect on the
latents) and the VAE.

`eight_bit_kind` says which layer of which component gets which; the placement planner counts
bytes with it (`measure`), and the synthetic loader quantizes each layer as it is made, so the
bf16 weights never have to fit the GPU at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

# FP8 tensor cores: compute capability 8.9 (Ada) and newer (Hopper 9.0, Blackwell 10.x).
MIN_CAPABILITY = (8, 9)
_BLOCK_LINEAR = re.compile(r"^transformer_blocks\.\d+\.")
_KEEP_BF16 = re.compile(r"(^|\.)(img_mod|txt_mod)\.")
_MODULATION_LINEAR = re.compile(r"^transformer_blocks\.\d+\.(img_mod|txt_mod)\.1$")
# Bytes per output row of a quantized weight's scale (float32 at most).
SCALE_BYTES = 4
Kind = Literal["fp8", "int8"]


class QuantizationError(RuntimeError):
    """The configured quantization cannot run on this replica (wrong device, missing package)."""


@dataclass(frozen=True)
class QuantizationReport:
    method: str
    layers: int
    bytes_before: int
    bytes_after: int
    int8_layers: int = 0  # the modulation linears, int8 weight-only

    def note(self) -> str:
        gib = 1024**3
        int8 = f" and {self.int8_layers} modulation linears in int8" if self.int8_layers else ""
        return (
            f"quantization {self.method}: {self.layers} transformer linears{int8}"
            f" ({self.bytes_before / gib:.2f} -> {self.bytes_after / gib:.2f} GiB of weights)"
        )


def is_fp8_target(module: Any, fqn: str) -> bool:
    """Which transformer submodules get FP8 weights (see the module docstring)."""
    import torch.nn as nn

    if not isinstance(module, nn.Linear) or not _BLOCK_LINEAR.match(fqn):
        return False
    if _KEEP_BF16.search(fqn) or is_quantized(module):
        return False
    # _scaled_mm needs both matrix dimensions to be multiples of 16.
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def is_modulation_target(module: Any, fqn: str) -> bool:
    """A block's `img_mod` / `txt_mod` linear (the modulation's SiLU is module 0)."""
    import torch.nn as nn

    return (
        isinstance(module, nn.Linear)
        and bool(_MODULATION_LINEAR.match(fqn))
        and not is_quantized(module)
    )


def is_quantized(module: Any) -> bool:
    """Whether the module's weight is already a torchao 8-bit tensor (quantized at load)."""
    return getattr(getattr(module, "weight", None), "qdata", None) is not None


def eight_bit_kind(
    component: str, module: Any, fqn: str, *, quantization: str, text_encoder: str
) -> Kind | None:
    """Which 8-bit form the layer `fqn` of `component` gets under these settings, or None."""
    import torch.nn as nn

    if component == "transformer" and quantization == "fp8":
        if is_fp8_target(module, fqn):
            return "fp8"
        if is_modulation_target(module, fqn):
            return "int8"
    is_linear = isinstance(module, nn.Linear) and not is_quantized(module)
    if component == "text_encoder" and text_encoder == "int8" and is_linear:
        return "int8"
    return None


def eight_bit_bytes(module: Any) -> int:
    """A linear's weight bytes in 8 bits: one byte per element and a scale per output row."""
    weight = module.weight
    return weight.numel() + weight.shape[0] * SCALE_BYTES


def quantize_linear(module: Any, kind: Kind) -> None:
    """Quantize one linear layer in place (its weight where it is now: on its GPU)."""
    quantize = _torchao_fp8 if kind == "fp8" else _torchao_int8
    quantize(module, lambda m, fqn: m is module)


def quantize_onto(
    module: Any,
    device: Any,
    kind_of: Callable[[Any, str], Kind | None],
    *,
    on_arrival: Callable[[Any, str], None] | None = None,
) -> int:
    """Move `module` to `device` one layer at a time, quantizing each layer `kind_of` names as
    it arrives, so the GPU never holds its bf16 weights at once; returns the layers quantized.
    `on_arrival(layer, fqn)` runs on each such layer on `device` before it is quantized (a fused
    LoRA added to its bf16 weight: loading/lora.py `FuseOnArrival`)."""
    done = 0
    for fqn, sub in list(module.named_modules()):
        kind = kind_of(sub, fqn)
        if kind is not None:
            sub.to(device)
            if on_arrival is not None:
                on_arrival(sub, fqn)
            quantize_linear(sub, kind)
            done += 1
    module.to(device)
    return done


Capability = Callable[[Any], "tuple[int, int] | None"]


def check_fp8_devices(devices: set[Any], *, capability: Capability) -> None:
    """Raise unless every device holding a target layer is a GPU with FP8 tensor cores.
    `capability(device)` is the compute capability, None for a device that is no CUDA GPU."""
    found = {device: capability(device) for device in devices}
    bad = sorted(str(d) for d, cc in found.items() if cc is None)
    if bad:
        raise QuantizationError(
            f"quantization fp8 needs the transformer on GPUs; it is on {', '.join(bad)}"
            " (set model.quantization: none, or give the replica GPUs and no cpu offload)"
        )
    for device, cc in sorted(found.items(), key=lambda item: str(item[0])):
        if cc is not None and tuple(cc) < MIN_CAPABILITY:
            raise QuantizationError(
                f"quantization fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada,"
                f" Hopper or newer); {device} has {cc[0]}.{cc[1]}. Set model.quantization: none."
            )


def quantize_transformer(
    transformer: Any,
    method: str,
    *,
    quantize: Callable[[Any, Callable[[Any, str], bool]], None] | None = None,
    quantize_int8: Callable[[Any, Callable[[Any, str], bool]], None] | None = None,
    capability: Capability | None = None,
    modulation: bool = False,
) -> QuantizationReport | None:
    """Quantize `transformer` in place (fp8 block linears; with `modulation`, int8 modulation
    linears: `model.quantize_at_load`); None when `method` is "none". Layers already quantized
    at load are counted, not quantized again.

    `quantize(module, filter_fn)`, `quantize_int8(module, filter_fn)` and `capability(device)`
    default to torchao's `quantize_` with dynamic per-row float8, with int8 weight-only per row,
    and `torch.cuda.get_device_capability`; tests inject fakes.
    """
    if method == "none":
        return None
    if method != "fp8":
        raise QuantizationError(f"unknown quantization {method!r}")
    targets = [(n, m) for n, m in transformer.named_modules() if is_fp8_target(m, n)]
    mods = [(n, m) for n, m in transformer.named_modules() if is_modulation_target(m, n)]
    if not modulation:
        mods = []
    # Quantized while loading (the synthetic loader on small cards): counted, not redone.
    done = [(n, m) for n, m in transformer.named_modules() if is_quantized(m)]
    if not targets and not done:
        raise QuantizationError("quantization fp8: the transformer has no eligible linear layers")
    devices = {m.weight.device for _, m in targets + done}
    check_fp8_devices(devices, capability=capability or _cuda_capability)
    before = _weight_bytes(targets + mods + done)
    if targets:
        (quantize or _torchao_fp8)(transformer, is_fp8_target)
    if mods:
        (quantize_int8 or _torchao_int8)(transformer, is_modulation_target)
    after = _weight_bytes(targets + mods + done)
    done_int8 = sum(bool(_MODULATION_LINEAR.match(n)) for n, _ in done)
    return QuantizationReport(
        method,
        len(targets) + len(done) - done_int8,
        before,
        after,
        len(mods) + done_int8,
    )


def assign_weight(weight: Any, value: Any) -> None:
    """Write the high-precision `value` into `weight` in place, quantized as `weight` is: an
    FP8 weight is quantized afresh from `value` with its own settings (what `quantize_transformer`
    did at load, so a value equal to the loaded one gives the loaded bytes back), a plain one is
    copied. In place, so compiled graphs keep reading the same tensors."""
    qdata = getattr(weight, "qdata", None)
    if qdata is None:
        weight.copy_(value)
        return
    import torch
    from torchao.quantization import PerRow

    fresh = type(weight).from_hp(
        value,
        float8_dtype=qdata.dtype,
        granularity=PerRow(),
        mm_config=weight.mm_config,
        kernel_preference=weight.kernel_preference,
        act_quant_kwargs=weight.act_quant_kwargs,
    )
    torch._foreach_copy_([qdata, weight.scale], [fresh.qdata, fresh.scale])


def _weight_bytes(targets: list[tuple[str, Any]]) -> int:
    total = 0
    for _, module in targets:
        weight = module.weight
        # torchao's float8 weights are tensor subclasses: count their data and scales.
        qdata = getattr(weight, "qdata", None)
        scale = getattr(weight, "scale", None)
        if qdata is not None:
            total += qdata.numel() * qdata.element_size()
            total += 0 if scale is None else scale.numel() * scale.element_size()
        else:
            total += weight.numel() * weight.element_size()
    return total


def _cuda_capability(device: Any) -> tuple[int, int] | None:
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def _torchao_fp8(module: Any, filter_fn: Callable[[Any, str], bool]) -> None:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:  # pragma: no cover - build_app checks the extra first
        from serve_app.common.extras import install_hint

        raise QuantizationError(
            f"quantization fp8 needs torchao ({exc}): {install_hint('fp8')}"
        ) from exc
    # set_inductor_config=False: torchao would switch on inductor's coordinate-descent tuning
    # for the whole process, which lengthens the replica's compile at start.
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), set_inductor_config=False
    )
    quantize_(module, config, filter_fn=filter_fn)


def _torchao_int8(module: Any, filter_fn: Callable[[Any, str], bool]) -> None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, PerRow, quantize_
    except ImportError as exc:  # pragma: no cover - build_app checks the extra first
        from serve_app.common.extras import install_hint

        hint = install_hint("fp8")
        raise QuantizationError(f"int8 weights need torchao ({exc}): {hint}") from exc
    # version 2: torchao's Int8Tensor (qdata + a scale per row); set_inductor_config as above.
    config = Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False, version=2)
    quantize_(module, config, filter_fn=filter_fn)


__all__ = [
    "MIN_CAPABILITY",
    "QuantizationError",
    "QuantizationReport",
    "assign_weight",
    "check_fp8_devices",
    "eight_bit_bytes",
    "eight_bit_kind",
    "is_fp8_target",
    "is_modulation_target",
    "is_quantized",
    "quantize_linear",
    "quantize_onto",
    "quantize_transformer",
]
