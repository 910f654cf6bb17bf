"""FP8 linear layers for the transformer (torchao), the `model.quantization: fp8` switch.

Each Linear of the transformer's 60 blocks gets float8 (e4m3) weights with one scale per output
row, and its input is quantized per row (per token) on the fly; the matmul runs on FP8 tensor
cores (`torch._scaled_mm`, Ada/Hopper and newer) and returns bf16. What stays in bf16, and why:
the per-block modulation linears (`img_mod`, `txt_mod`: one row per image, no speed to gain, and
their scales/shifts feed every token), the input/output projections (`img_in`, `txt_in`,
`proj_out`: few FLOPs, direct effect on the latents), the text encoder and
the VAE (run once per edit).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# FP8 tensor cores: compute capability 8.9 (Ada) and newer (Hopper 9.0, Blackwell 10.x).
MIN_CAPABILITY = (8, 9)
_BLOCK_LINEAR = re.compile(r"^transformer_blocks\.\d+\.")
_KEEP_BF16 = re.compile(r"(^|\.)(img_mod|txt_mod)\.")


class QuantizationError(RuntimeError):
    """The configured quantization cannot run on this replica (wrong device, missing package)."""


@dataclass(frozen=True)
class QuantizationReport:
    method: str
    layers: int
    bytes_before: int
    bytes_after: int

    def note(self) -> str:
        gib = 1024**3
        return (
            f"quantization {self.method}: {self.layers} transformer linears"
            f" ({self.bytes_before / gib:.2f} -> {self.bytes_after / gib:.2f} GiB of weights)"
        )


def is_fp8_target(module: Any, fqn: str) -> bool:
    """Which transformer submodules get FP8 weights (see the module docstring)."""
    import torch.nn as nn

    if not isinstance(module, nn.Linear) or not _BLOCK_LINEAR.match(fqn):
        return False
    if _KEEP_BF16.search(fqn):
        return False
    # _scaled_mm needs both matrix dimensions to be multiples of 16.
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


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
    capability: Capability | None = None,
) -> QuantizationReport | None:
    """Quantize `transformer` in place; None when `method` is "none".

    `quantize(module, filter_fn)` and `capability(device)` default to torchao's `quantize_` with
    dynamic per-row float8 and `torch.cuda.get_device_capability`; tests inject fakes.
    """
    if method == "none":
        return None
    if method != "fp8":
        raise QuantizationError(f"unknown quantization {method!r}")
    targets = [(n, m) for n, m in transformer.named_modules() if is_fp8_target(m, n)]
    if not targets:
        raise QuantizationError("quantization fp8: the transformer has no eligible linear layers")
    devices = {m.weight.device for _, m in targets}
    check_fp8_devices(devices, capability=capability or _cuda_capability)
    before = _weight_bytes(targets)
    (quantize or _torchao_fp8)(transformer, is_fp8_target)
    return QuantizationReport(method, len(targets), before, _weight_bytes(targets))


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


__all__ = [
    "MIN_CAPABILITY",
    "QuantizationError",
    "QuantizationReport",
    "assign_weight",
    "check_fp8_devices",
    "is_fp8_target",
    "quantize_transformer",
]
