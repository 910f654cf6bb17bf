"""From a `ModelConfig` and the replica's GPUs to a load plan: pure (no torch, no CUDA).

- `plan_load`: the placement planner (`placement.plan_placement`) fed with the config's headroom,
  `max_memory_gib` and `allow_cpu_offload`. (CFG on two GPUs is `model.parallel`: one process
  per GPU, each holding its own plan; see pipeline/parallel/.)
- `device_labels`: the plan as `ModelInfo.device_map` (and /ready) shows it.
- `eight_bit_for` / `offloaded_for`: which layers the config loads in 8 bits and which components
  it keeps on the CPU, so that the planner counts the bytes as they will be placed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from serve_app.common.config import ModelConfig
from serve_app.pipeline.placement.measure import EightBit
from serve_app.pipeline.placement.planner import (
    TRANSFORMER,
    ComponentSize,
    Device,
    GiB,
    GpuMemory,
    Placement,
    estimate_activation_headroom,
    estimate_vae_headroom,
    format_placement_table,
    plan_placement,
)
from serve_app.pipeline.speed.quantization import MIN_CAPABILITY, QuantizationError, eight_bit_kind

logger = logging.getLogger("ray.serve")

# limits.max_output_pixels' default: plan for the largest edit the default limits accept.
DEFAULT_HEADROOM_PIXELS = 2048 * 2048


# Measured on H100 (2026-11-27, bf16, synthetic weights, this serving path): the GPU holding the
# text encoder and VAE peaked 4.14 GiB over its weights for a 1024x1024 edit with one reference,
# 1.1 GiB more than `estimate_vae_headroom` (3 GiB at 1 MP; cuDNN workspaces depend on free
# memory). This margin covers it.
VAE_HEADROOM_MARGIN = int(1.5 * GiB)


# The VAE in tiles (`model.vae_tiling`; diffusers' 256-pixel tiles): an ESTIMATE of its peak at
# any size (one tile's activations and the whole image's output), checked by tests/gpu's small
# cards under their memory cap.
TILED_VAE_HEADROOM = 1 * GiB


def headroom_for(model: ModelConfig) -> tuple[int, int]:
    """(transformer activation headroom, text-encoder/VAE headroom) in bytes for this config."""
    pixels = model.headroom_max_pixels or DEFAULT_HEADROOM_PIXELS
    refs = model.headroom_ref_images
    refs = model.max_input_images if refs is None else refs
    vae = TILED_VAE_HEADROOM if model.vae_tiling else estimate_vae_headroom(max_pixels=pixels)
    return (
        estimate_activation_headroom(max_pixels=pixels, num_ref_images=refs),
        vae + VAE_HEADROOM_MARGIN,
    )


def eight_bit_for(model: ModelConfig) -> EightBit | None:
    """The layers this config loads in 8 bits (`quantization.eight_bit_kind`), or None.

    The transformer only with `quantize_at_load` (a fused LoRA is added to each linear as it
    arrives, before it is quantized: loading/lora.py `FuseOnArrival`; hotswap is refused with
    it): otherwise it is loaded in bf16 and quantized afterwards, so the plan counts it in bf16,
    what the GPU holds while loading."""
    quantization = model.quantization if model.quantize_at_load else "none"
    if quantization == "none" and model.text_encoder != "int8":
        return None

    def kind(component: str, module: object, fqn: str) -> str | None:
        return eight_bit_kind(
            component, module, fqn, quantization=quantization, text_encoder=model.text_encoder
        )

    return kind


def offloaded_for(model: ModelConfig) -> tuple[str, ...]:
    """Components this config keeps on the CPU, streamed to the GPU for their stage."""
    return ("text_encoder",) if model.text_encoder == "offload" else ()


def check_capability(model: ModelConfig, gpus: Sequence[GpuMemory]) -> None:
    """Refuse fp8 on GPUs without FP8 tensor cores (Ampere and older) before loading anything."""
    if model.quantization != "fp8":
        return
    old = [g for g in gpus if g.capability is not None and g.capability < MIN_CAPABILITY]
    if old:
        cards = ", ".join(f"cuda:{g.index} {g.name} ({g.capability[0]}.{g.capability[1]})"
                          for g in old if g.capability)  # fmt: skip
        raise QuantizationError(
            f"model.quantization fp8 is not supported on {cards}: FP8 needs compute capability"
            " 8.9 or newer (Ada, Hopper, Blackwell). 8-bit transformer weights on Ampere and"
            " older cards are not supported by this server: serve bf16 (quantization: none) on"
            " cards that hold it, e.g. deploy/configs/48gb-2gpu.yaml (two 48 GB cards) or"
            " deploy/configs/40gb-2gpu.yaml (two A100 40GB)."
        )


def max_memory_for(model: ModelConfig, gpus: Sequence[GpuMemory]) -> dict[int, int] | None:
    """`max_memory_gib` in bytes, restricted to the visible GPUs (a config written for a 2-GPU
    replica may cap GPU 1 that a 1-GPU replica does not have)."""
    if not model.max_memory_gib:
        return None
    visible = {g.index for g in gpus}
    unknown = sorted(set(model.max_memory_gib) - visible)
    if unknown:
        logger.info("max_memory_gib names GPUs this replica does not see: %s (ignored)", unknown)
    return {i: int(v * GiB) for i, v in model.max_memory_gib.items() if i in visible}


@dataclass(frozen=True)
class LoadPlan:
    placement: Placement

    def table(self) -> str:
        return format_placement_table(self.placement)


def plan_load(
    model: ModelConfig, components: list[ComponentSize], gpus: list[GpuMemory]
) -> LoadPlan:
    check_capability(model, gpus)
    headroom, aux = headroom_for(model)
    max_memory = max_memory_for(model, gpus)
    placement = plan_placement(
        components,
        gpus,
        activation_headroom_bytes=headroom,
        aux_headroom_bytes=aux,
        max_memory=max_memory,
        allow_cpu_offload=model.allow_cpu_offload,
    )
    return LoadPlan(placement=placement)


def device_labels(plan: LoadPlan) -> dict[str, str]:
    """Component -> device label for `ModelInfo.device_map` (and /ready)."""
    placement = plan.placement
    labels: dict[str, str] = {}
    for name, device in placement.device_map.items():
        if name == TRANSFORMER and placement.transformer_device_map:
            devices = sorted({d for d in placement.transformer_device_map.values()}, key=str)
            labels[name] = ",".join(_label(d) for d in devices)
        elif name in placement.streamed:
            labels[name] = f"cpu, streamed to {_label(placement.offload_gpu or 0)}"
        else:
            labels[name] = _label(device)
    if placement.strategy == "cpu_offload":
        labels["offload_gpu"] = _label(placement.offload_gpu or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and any(isinstance(d, int) for d in placement.device_map.values()):
        labels["cuda_visible_devices"] = visible
    return labels


def _label(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)
