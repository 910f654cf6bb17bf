"""From a `ModelConfig` and the replica's GPUs to a load plan: pure (no torch, no CUDA).

- `plan_load`: the placement planner (`placement.plan_placement`) fed with the config's headroom,
  `max_memory_gib` and `allow_cpu_offload`; with `cfg_parallel` it first tries a plan with a full
  transformer copy on two GPUs (`plan_cfg_parallel`) and falls back, with a note, when two copies
  do not fit.
- `device_labels`: the plan as `ModelInfo.device_map` (and /ready) shows it.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from serve_app.common.config import ModelConfig
from serve_app.pipeline.placement import (
    TRANSFORMER,
    ComponentSize,
    Device,
    GiB,
    GpuMemory,
    Placement,
    PlacementRow,
    estimate_activation_headroom,
    estimate_vae_headroom,
    format_placement_table,
    parse_bytes,
    plan_placement,
)

logger = logging.getLogger("ray.serve")

# limits.max_output_pixels' default: plan for the largest edit the default limits accept.
DEFAULT_HEADROOM_PIXELS = 2048 * 2048
UNCOND_COPY = "uncond copy (cfg_parallel)"


# Measured on H100 (2026-11-27, bf16, synthetic weights, this serving path): the GPU holding the
# text encoder and VAE peaked 4.14 GiB over its weights for a 1024x1024 edit with one reference,
# 1.1 GiB more than `estimate_vae_headroom` (3 GiB at 1 MP; cuDNN workspaces depend on free
# memory). This margin covers it.
VAE_HEADROOM_MARGIN = int(1.5 * GiB)


def headroom_for(model: ModelConfig) -> tuple[int, int]:
    """(transformer activation headroom, text-encoder/VAE headroom) in bytes for this config."""
    pixels = model.headroom_max_pixels or DEFAULT_HEADROOM_PIXELS
    refs = model.headroom_ref_images
    refs = model.max_input_images if refs is None else refs
    return (
        estimate_activation_headroom(max_pixels=pixels, num_ref_images=refs),
        estimate_vae_headroom(max_pixels=pixels) + VAE_HEADROOM_MARGIN,
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
    # The GPU holding the transformer copy for the unconditional pass, when cfg_parallel is on.
    uncond_device: int | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [format_placement_table(self.placement)]
        if self.uncond_device is not None:
            lines.append(
                f"cfg_parallel: conditional pass on cuda:{self.placement.device_map[TRANSFORMER]},"
                f" unconditional pass on cuda:{self.uncond_device}"
            )
        lines += self.notes
        return "\n".join(lines)


def plan_load(
    model: ModelConfig, components: list[ComponentSize], gpus: list[GpuMemory]
) -> LoadPlan:
    headroom, aux = headroom_for(model)
    max_memory = max_memory_for(model, gpus)
    notes = []
    if model.cfg_parallel:
        if len(gpus) < 2:
            notes.append(f"cfg_parallel off: it needs 2 GPUs, this replica sees {len(gpus)}")
        else:
            cfg = plan_cfg_parallel(
                components, gpus, headroom=headroom, aux_headroom=aux, max_memory=max_memory
            )
            if cfg is not None:
                return cfg
            notes.append(
                "cfg_parallel off: two transformer copies do not fit these GPUs; normal placement"
            )
    for note in notes:
        logger.warning("%s", note)
    placement = plan_placement(
        components,
        gpus,
        activation_headroom_bytes=headroom,
        aux_headroom_bytes=aux,
        max_memory=max_memory,
        allow_cpu_offload=model.allow_cpu_offload,
    )
    return LoadPlan(placement=placement, notes=notes)


def plan_cfg_parallel(
    components: list[ComponentSize],
    gpus: list[GpuMemory],
    *,
    headroom: int,
    aux_headroom: int,
    max_memory: Mapping[int, int | str] | None = None,
) -> LoadPlan | None:
    """A whole transformer on each of two GPUs, the other components wherever they fit; None when
    no pair of GPUs holds two copies plus their headroom.

    Among feasible layouts, the one leaving the most free memory on its fullest GPU wins. The
    primary copy (conditional pass) goes on the VAE's GPU when that is one of the pair: the
    pipeline creates its latents on the VAE's device, so the conditional pass needs no copy.
    """
    caps = {int(k): parse_bytes(v) for k, v in (max_memory or {}).items()}
    budgets = {g.index: max(0, min(g.free_bytes, caps.get(g.index, g.free_bytes))) for g in gpus}
    transformer = next(c for c in components if c.name == TRANSFORMER)
    others = sorted((c for c in components if c.name != TRANSFORMER), key=lambda c: -c.weight_bytes)
    order = sorted(budgets)
    best: tuple[int, tuple[int, int], dict[str, int], dict[int, int]] | None = None
    for pair in itertools.combinations(order, 2):
        for choice in itertools.product(order, repeat=len(others)):
            used = dict.fromkeys(order, 0)
            reserved = dict.fromkeys(order, 0)
            for gpu in pair:
                used[gpu] += transformer.weight_bytes
                reserved[gpu] = headroom
            assignment = {}
            for comp, gpu in zip(others, choice, strict=True):
                used[gpu] += comp.weight_bytes
                reserved[gpu] = max(reserved[gpu], aux_headroom)
                assignment[comp.name] = gpu
            room = {i: budgets[i] - used[i] - reserved[i] for i in order}
            if min(room.values()) < 0:
                continue
            slack = min(room[i] for i in order if used[i])
            if best is None or slack > best[0]:
                best = (slack, pair, assignment, {i: r for i, r in reserved.items() if r})
    if best is None:
        return None
    _, pair, assignment, reserved = best
    vae_gpu = assignment.get("vae")
    primary = vae_gpu if vae_gpu in pair else pair[0]
    secondary = pair[1] if primary == pair[0] else pair[0]
    rows = [
        PlacementRow(TRANSFORMER, "", primary, transformer.weight_bytes),
        PlacementRow(TRANSFORMER, UNCOND_COPY, secondary, transformer.weight_bytes),
    ]
    rows += [PlacementRow(c.name, "", assignment[c.name], c.weight_bytes) for c in others]
    device_map: dict[str, Device] = {TRANSFORMER: primary, **assignment}
    placement = Placement(
        strategy="components",
        device_map=device_map,
        transformer_device_map=None,
        rows=rows,
        budgets=budgets,
        reserved=reserved,
    )
    return LoadPlan(placement=placement, uncond_device=secondary)


def device_labels(plan: LoadPlan) -> dict[str, str]:
    """Component -> device label for `ModelInfo.device_map` (and /ready)."""
    placement = plan.placement
    labels: dict[str, str] = {}
    for name, device in placement.device_map.items():
        if name == TRANSFORMER and placement.transformer_device_map:
            devices = sorted({d for d in placement.transformer_device_map.values()}, key=str)
            labels[name] = ",".join(_label(d) for d in devices)
        else:
            labels[name] = _label(device)
    if plan.uncond_device is not None:
        labels["transformer_uncond"] = _label(plan.uncond_device)
    if placement.strategy == "cpu_offload":
        labels["offload_gpu"] = _label(placement.offload_gpu or 0)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and any(isinstance(d, int) for d in placement.device_map.values()):
        labels["cuda_visible_devices"] = visible
    return labels


def _label(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)
