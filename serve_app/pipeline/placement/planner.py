"""Where each pipeline component lives when a model replica owns N GPUs.

A pure planner: plain numbers in (component sizes, per-GPU memory), plain data out (a
pipeline-level component -> device map, plus an accelerate-style module -> device map when the
transformer has to be split). No torch, no CUDA, so the rules are unit-tested on CPU with made-up
GPU tables; the numbers come from `measure` (component sizes, the GPUs' free memory).

Why not diffusers' `device_map="balanced"`: it places whole components round-robin and silently puts
one that does not fit on the CPU (its `_assign_components_to_devices`). Why not accelerate's
`infer_auto_device_map`: it needs the module itself, fills GPUs greedily in index order and falls
back to CPU; we want explicit
headroom per GPU, balanced contiguous block ranges and an error instead of a silent CPU fallback.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

GiB = 1024**3

Device = int | str  # a CUDA index as torch/accelerate take it, or "cpu"
Strategy = Literal["single", "components", "split", "cpu_offload"]

TRANSFORMER = "transformer"
# What a GPU holding the text encoder / VAE keeps free when the caller gives no figure: the VAE's
# peak at 1 MP (see `estimate_vae_headroom`).
DEFAULT_AUX_HEADROOM_BYTES = 3 * GiB
# Trying every assignment of the small components to GPUs is exact; past this many, greedy.
_MAX_ASSIGNMENTS = 4096


@dataclass(frozen=True)
class GpuMemory:
    """One visible GPU as seen by the replica (index as torch numbers it inside the replica)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int] | None = None  # CUDA compute capability, when known


@dataclass(frozen=True)
class ComponentSize:
    """A pipeline component's weights.

    `blocks`, when given, is the component cut into units that may sit on different GPUs, in forward
    order, covering all of its weights: for the transformer the non-block modules before the blocks
    (`pos_embed`, `time_text_embed`, `txt_norm`, `img_in`, `txt_in`), `transformer_blocks.0..59`,
    then `norm_out`, `proj_out`. Names are module paths inside the component, as accelerate's
    `device_map` and `dispatch_model` take them.

    Bytes are as placed: layers loaded in 8 bits count one byte per weight (`form` says which,
    e.g. "bf16+fp8+int8"). `streamed_bytes`, when given: the component stays on the CPU and is
    streamed to the GPU of its stage a module at a time, this many bytes at most at once.
    """

    name: str
    weight_bytes: int
    blocks: list[tuple[str, int]] | None = None
    form: str = ""
    streamed_bytes: int | None = None


@dataclass(frozen=True)
class PlacementRow:
    """One line of the human table: a component (or a range of its blocks) on a device."""

    component: str
    part: str  # "" for a whole component, else a compact list of module names
    device: Device
    bytes: int
    form: str = ""  # the weights' form as placed ("bf16", "bf16+fp8+int8"); "" unknown

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass(frozen=True)
class Placement:
    """The plan.

    - `device_map`: pipeline component -> device (`int` CUDA index or `"cpu"`). For `"split"` the
      transformer's entry is its main device (the GPU holding its input layers); the per-module map
      is `transformer_device_map`. For `"cpu_offload"` every component is `"cpu"` and
      `offload_gpu` is the GPU each one visits in turn (`enable_model_cpu_offload`, or
      `enable_sequential_cpu_offload` when `sequential_offload`).
    - `transformer_device_map`: accelerate-style module -> device for a split transformer, usable as
      `QwenImageTransformer2DModel.from_pretrained(..., device_map=...)` or `dispatch_model`.
    - `budgets` / `reserved`: per GPU, the bytes the plan could use and the activation headroom kept
      free out of them; shown by `format_placement_table`.
    - A component kept on the CPU and streamed (`ComponentSize.streamed_bytes`) is `"cpu"` in
      `device_map`, and `offload_gpu` is the GPU it is streamed to.
    """

    strategy: Strategy
    device_map: dict[str, Device]
    transformer_device_map: dict[str, Device] | None
    rows: list[PlacementRow]
    offload_gpu: int | None = None
    sequential_offload: bool = False
    budgets: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)

    def bytes_on(self, device: Device) -> int:
        return sum(r.bytes for r in self.rows if r.device == device)

    @property
    def streamed(self) -> list[str]:
        """Components kept on the CPU and streamed to `offload_gpu` (not a "cpu_offload" plan)."""
        if self.strategy == "cpu_offload" or self.offload_gpu is None:
            return []
        return [name for name, device in self.device_map.items() if device == "cpu"]


class PlacementError(Exception):
    """The components do not fit the replica's GPUs and CPU offload is off."""

    def __init__(self, message: str, *, missing_bytes: int) -> None:
        super().__init__(message)
        self.missing_bytes = missing_bytes


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string such as "30GiB", "30GB", "512MiB" (accelerate's spelling)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", value, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a memory size: {value!r}")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    power = "_KMGT".index(prefix.upper()) if prefix else 0
    return int(float(number) * base**power)


def estimate_activation_headroom(
    *,
    max_pixels: int,
    num_ref_images: int,
    ref_pixels: int = 1024 * 1024,
    text_tokens: int = 1024,
    hidden_size: int = 3072,
    dtype_bytes: int = 2,
    buffer_multiple: int = 24,
    fixed_bytes: int = 1 * GiB,
) -> int:
    """Rough GPU memory a transformer forward needs on top of its weights: an ESTIMATE.

    Tokens: the VAE downsamples 8x and latents are packed 2x2, so one token per 16x16 = 256 pixels;
    the output image gives `max_pixels / 256`, each reference (the Plus pipeline resizes references
    to ~`ref_pixels`, 1 MP, whatever the output size) `ref_pixels / 256`, plus the prompt's tokens.
    One [tokens, hidden] bf16 tensor is the unit; a dual-stream block holds the residual streams,
    the normed/modulated copies, Q/K/V and the 4x-wide MLP intermediate at once, about 20 units at
    its peak with SDPA (no tokens^2 score matrix), so `buffer_multiple` = 24 leaves some margin.
    `fixed_bytes` covers cuBLAS/attention workspaces and allocator fragmentation.
    Check (H100, bf16, SDPA, synthetic weights, 2026-11-27): the transformer's GPU peaked 0.85 GiB
    over its weights at 1024x1024 with one reference (estimate 2.27 GiB) and 1.74 GiB at
    1536x1536 with two (estimate 3.53 GiB).
    """
    if max_pixels <= 0 or num_ref_images < 0:
        raise ValueError("max_pixels must be > 0 and num_ref_images >= 0")
    tokens = max_pixels // 256 + num_ref_images * (ref_pixels // 256) + text_tokens
    return tokens * hidden_size * dtype_bytes * buffer_multiple + fixed_bytes


def estimate_vae_headroom(
    *,
    max_pixels: int,
    ref_pixels: int = 1024 * 1024,
    bytes_per_pixel: int = 3072,
) -> int:
    """Rough GPU memory the text encoder + VAE stages need on top of their weights: an ESTIMATE.

    The VAE dominates: it encodes each reference at ~`ref_pixels` and decodes the output at
    `max_pixels`, one at a time, with full-resolution 3-D conv activations, so its peak grows with
    the larger of the two. Measured on an H100 in bf16 (2026-11-27, synthetic weights) on the GPU
    holding the VAE and text encoder: 2.45-2.5 GiB over the weights for a 1024x1024 edit with one
    reference (~2500 B/pixel), 5.5 GiB at 1536x1536 with two; 3072 B/pixel (3 GiB at 1 MP, 6.75
    at 2.36 MP) leaves some margin. VAE tiling (`pipe.vae.enable_tiling()`) would cap it.
    """
    if max_pixels <= 0:
        raise ValueError("max_pixels must be > 0")
    return max(max_pixels, ref_pixels) * bytes_per_pixel


def plan_placement(
    components: list[ComponentSize],
    gpus: list[GpuMemory],
    *,
    activation_headroom_bytes: int,
    max_memory: Mapping[int, int | str] | None = None,
    allow_cpu_offload: bool = False,
    aux_headroom_bytes: int = DEFAULT_AUX_HEADROOM_BYTES,
    transformer_name: str = TRANSFORMER,
) -> Placement:
    """Decide where every component goes.

    Per-GPU budget = `free_bytes`, capped by `max_memory[index]` when given (a GPU missing from
    `max_memory` is not capped). Each GPU keeps free the largest activation peak among the stages
    it runs: `activation_headroom_bytes` where transformer weights live, `aux_headroom_bytes` where
    only the text encoder / VAE do (stages run one after another, so their peaks do not add up).

    Order of preference: no GPUs -> everything on "cpu" ("single"); one GPU that holds everything
    -> "single"; several GPUs where each component fits some GPU -> "components" (transformer alone
    on the roomiest GPU, the others first-fit decreasing elsewhere); else the transformer's blocks
    split contiguously over the GPUs -> "split"; else "cpu_offload" if allowed, else
    `PlacementError`.
    """
    _check_components(components, transformer_name)
    if not gpus:
        return _all_on_cpu(components)
    budgets = _budgets(gpus, max_memory)
    streamed = [c for c in components if c.streamed_bytes is not None]
    if streamed:
        # Kept on the CPU: the GPU holding the text encoder / VAE stages keeps room for the
        # module streamed in at a time, on top of their own peak.
        components = [c for c in components if c.streamed_bytes is None]
        aux_headroom_bytes += max(c.streamed_bytes or 0 for c in streamed)
    plan = _plan_on_gpus(
        components,
        budgets,
        headroom=activation_headroom_bytes,
        aux_headroom=aux_headroom_bytes,
        transformer_name=transformer_name,
    )
    if plan is not None:
        return _with_streamed(plan, streamed)
    if allow_cpu_offload:
        return _cpu_offload(
            components + streamed,
            budgets,
            headroom=max(activation_headroom_bytes, aux_headroom_bytes),
        )
    raise _placement_error(
        components,
        budgets,
        headroom=activation_headroom_bytes,
        aux_headroom=aux_headroom_bytes,
        transformer_name=transformer_name,
    )


def format_placement_table(placement: Placement) -> str:
    """A fixed-width table for logs: one row per component / block range, then one per GPU."""
    header = ("component", "part", "device", "weights", "GiB")
    lines = [
        (r.component, r.part or "-", _device_label(r.device), r.form or "-", f"{r.gib:.2f}")
        for r in placement.rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i == len(header) - 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    out = [f"placement strategy: {placement.strategy}", fmt(header)]
    out += [fmt(row) for row in lines]
    if placement.strategy == "cpu_offload":
        mode = "sequential" if placement.sequential_offload else "model"
        out.append(f"{mode} CPU offload, executing on {_device_label(placement.offload_gpu or 0)}")
    for index, budget in sorted(placement.budgets.items()):
        used = placement.bytes_on(index)
        reserved = placement.reserved.get(index, 0)
        out.append(
            f"{_device_label(index)}: weights {used / GiB:.2f} GiB + headroom "
            f"{reserved / GiB:.2f} GiB of {budget / GiB:.2f} GiB budget"
        )
    return "\n".join(out)


# --- planning ---------------------------------------------------------------------------------


def _with_streamed(plan: Placement, streamed: list[ComponentSize]) -> Placement:
    """The plan with the streamed components on "cpu", each visiting the GPU of the stages
    that are not the transformer's (where the VAE sits)."""
    if not streamed:
        return plan
    visit = next(
        (d for n, d in plan.device_map.items() if n != TRANSFORMER and isinstance(d, int)),
        plan.device_map[TRANSFORMER],
    )
    rows = [
        PlacementRow(c.name, f"streamed to {_device_label(visit)}", "cpu", c.weight_bytes, c.form)
        for c in streamed
    ]
    return replace(
        plan,
        device_map={**plan.device_map, **{c.name: "cpu" for c in streamed}},
        rows=[*plan.rows, *rows],
        offload_gpu=visit if isinstance(visit, int) else None,
    )


def _check_components(components: list[ComponentSize], transformer_name: str) -> None:
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate component names: {names}")
    for c in components:
        if c.blocks is not None and sum(b for _, b in c.blocks) != c.weight_bytes:
            raise ValueError(f"{c.name}: block sizes do not add up to weight_bytes")
    if transformer_name not in names:
        raise ValueError(f"no {transformer_name!r} among components {names}")


def _budgets(gpus: list[GpuMemory], max_memory: Mapping[int, int | str] | None) -> dict[int, int]:
    caps = {int(k): parse_bytes(v) for k, v in (max_memory or {}).items()}
    unknown = set(caps) - {g.index for g in gpus}
    if unknown:
        raise ValueError(f"max_memory names GPUs that are not visible: {sorted(unknown)}")
    return {g.index: max(0, min(g.free_bytes, caps.get(g.index, g.free_bytes))) for g in gpus}


def _all_on_cpu(components: list[ComponentSize]) -> Placement:
    return Placement(
        strategy="single",
        device_map={c.name: "cpu" for c in components},
        transformer_device_map=None,
        rows=[PlacementRow(c.name, "", "cpu", c.weight_bytes, c.form) for c in components],
    )


def _plan_on_gpus(
    components: list[ComponentSize],
    budgets: dict[int, int],
    *,
    headroom: int,
    aux_headroom: int,
    transformer_name: str,
) -> Placement | None:
    transformer = next(c for c in components if c.name == transformer_name)
    others = sorted(
        (c for c in components if c.name != transformer_name), key=lambda c: -c.weight_bytes
    )
    if len(budgets) == 1:
        return _single(components, budgets, headroom=max(headroom, aux_headroom))
    return _by_components(
        transformer, others, budgets, headroom=headroom, aux_headroom=aux_headroom
    ) or _split(transformer, others, budgets, headroom=headroom, aux_headroom=aux_headroom)


def _single(
    components: list[ComponentSize], budgets: dict[int, int], *, headroom: int
) -> Placement | None:
    ((index, budget),) = budgets.items()
    if sum(c.weight_bytes for c in components) + headroom > budget:
        return None
    return Placement(
        strategy="single",
        device_map={c.name: index for c in components},
        transformer_device_map=None,
        rows=[PlacementRow(c.name, "", index, c.weight_bytes, c.form) for c in components],
        budgets=dict(budgets),
        reserved={index: headroom},
    )


def _by_components(
    transformer: ComponentSize,
    others: list[ComponentSize],
    budgets: dict[int, int],
    *,
    headroom: int,
    aux_headroom: int,
) -> Placement | None:
    # Roomiest GPU for the transformer; ties go to the lowest index.
    home = min(budgets, key=lambda i: (-budgets[i], i))
    if transformer.weight_bytes + headroom > budgets[home]:
        return None
    used = {i: 0 for i in budgets}
    reserved = {i: 0 for i in budgets}
    used[home], reserved[home] = transformer.weight_bytes, headroom
    device_map: dict[str, Device] = {transformer.name: home}
    # First-fit decreasing over the other GPUs in index order; the transformer's GPU last.
    bins = [i for i in sorted(budgets) if i != home] + [home]
    for comp in others:
        for i in bins:
            need_reserved = max(reserved[i], aux_headroom)
            if used[i] + comp.weight_bytes + need_reserved <= budgets[i]:
                used[i] += comp.weight_bytes
                reserved[i] = need_reserved
                device_map[comp.name] = i
                break
        else:
            return None
    rows = [PlacementRow(transformer.name, "", home, transformer.weight_bytes, transformer.form)]
    rows += [PlacementRow(c.name, "", device_map[c.name], c.weight_bytes, c.form) for c in others]
    return Placement(
        strategy="components",
        device_map=device_map,
        transformer_device_map=None,
        rows=rows,
        budgets=dict(budgets),
        reserved={i: r for i, r in reserved.items() if r},
    )


def _split(
    transformer: ComponentSize,
    others: list[ComponentSize],
    budgets: dict[int, int],
    *,
    headroom: int,
    aux_headroom: int,
) -> Placement | None:
    """Transformer blocks over all GPUs in index order, the small components wherever the split
    stays feasible and leaves the most free memory on the fullest GPU."""
    if not transformer.blocks:
        return None
    gpu_order = sorted(budgets)
    best: tuple[int, dict[str, int], list[int], dict[int, int]] | None = None
    for assignment in _assignments(others, gpu_order, budgets):
        # Any GPU may get blocks, so each keeps the transformer's headroom, or the aux one where
        # the text encoder / VAE sit if that is larger.
        hosts = set(assignment.values())
        reserve = {i: max(headroom, aux_headroom if i in hosts else 0) for i in gpu_order}
        caps = [budgets[i] - reserve[i] - _load(assignment, others, i) for i in gpu_order]
        if min(caps) < 0:
            continue
        bounds = _contiguous_split([b for _, b in transformer.blocks], caps)
        if bounds is None:
            continue
        loads = _split_loads(transformer.blocks, bounds, others, assignment, gpu_order)
        # Minimise the negated smallest leftover room: free memory is what absorbs spikes.
        tightest = -min(budgets[i] - reserve[i] - loads[i] for i in gpu_order)
        if best is None or tightest < best[0]:
            best = (tightest, assignment, bounds, reserve)
    if best is None:
        return None
    _, assignment, bounds, reserved = best
    transformer_map: dict[str, Device] = {}
    rows: list[PlacementRow] = []
    for gpu, (start, end) in zip(gpu_order, itertools.pairwise([0, *bounds]), strict=True):
        units = transformer.blocks[start:end]
        transformer_map.update({name: gpu for name, _ in units})
        if units:
            names = [n for n, _ in units]
            rows.append(
                PlacementRow(
                    transformer.name,
                    _compact(names),
                    gpu,
                    sum(b for _, b in units),
                    transformer.form,
                )
            )
    device_map: dict[str, Device] = {transformer.name: transformer_map[transformer.blocks[0][0]]}
    device_map.update(assignment)
    rows += [PlacementRow(c.name, "", assignment[c.name], c.weight_bytes, c.form) for c in others]
    return Placement(
        strategy="split",
        device_map=device_map,
        transformer_device_map=transformer_map,
        rows=rows,
        budgets=dict(budgets),
        reserved=reserved,
    )


def _assignments(
    others: list[ComponentSize], gpu_order: list[int], budgets: dict[int, int]
) -> Iterable[dict[str, int]]:
    """Every way to put the small components on GPUs; greedy worst-fit when there are too many."""
    if len(gpu_order) ** len(others) <= _MAX_ASSIGNMENTS:
        for choice in itertools.product(gpu_order, repeat=len(others)):
            yield {c.name: gpu for c, gpu in zip(others, choice, strict=True)}
        return
    room = dict(budgets)
    greedy = {}
    for c in others:
        gpu = max(gpu_order, key=lambda i: (room[i], -i))
        greedy[c.name] = gpu
        room[gpu] -= c.weight_bytes
    yield greedy


def _load(assignment: Mapping[str, int], others: list[ComponentSize], gpu: int) -> int:
    return sum(c.weight_bytes for c in others if assignment[c.name] == gpu)


def _split_loads(
    blocks: list[tuple[str, int]],
    bounds: list[int],
    others: list[ComponentSize],
    assignment: Mapping[str, int],
    gpu_order: list[int],
) -> dict[int, int]:
    loads = {}
    for gpu, (start, end) in zip(gpu_order, itertools.pairwise([0, *bounds]), strict=True):
        loads[gpu] = sum(b for _, b in blocks[start:end]) + _load(assignment, others, gpu)
    return loads


def _contiguous_split(sizes: list[int], caps: list[int]) -> list[int] | None:
    """End index (exclusive) of each GPU's range of `sizes`, in order, each range within its cap.

    Cut points aim at equal leftover room on every GPU (water-filling: GPU i targets
    max(0, cap_i - L) with L chosen so the targets add up to the total), and a cut is only taken if
    the rest can still be packed greedily into the GPUs after it (greedy fill-to-capacity is the
    exact feasibility test for an ordered contiguous packing). None if no packing exists.
    """
    prefix = [0, *itertools.accumulate(sizes)]
    total, n = prefix[-1], len(sizes)
    if total > sum(caps):
        return None
    targets = list(itertools.accumulate(_water_fill(total, caps)))
    bounds: list[int] = []
    start = 0
    for gpu, cap in enumerate(caps):
        if gpu == len(caps) - 1:
            if total - prefix[start] > cap:
                return None
            bounds.append(n)
            break
        # Both tests are monotone in k: any cut in [lo, hi] keeps this GPU and the rest in caps.
        hi = max(k for k in range(start, n + 1) if prefix[k] - prefix[start] <= cap)
        lo = next(
            (k for k in range(start, hi + 1) if _greedy_fits(sizes[k:], caps[gpu + 1 :])), None
        )
        if lo is None:
            return None
        target = targets[gpu]
        start = min(range(lo, hi + 1), key=lambda k: (abs(prefix[k] - target), k))
        bounds.append(start)
    return bounds


def _water_fill(total: int, caps: Sequence[int]) -> list[float]:
    """Loads max(0, cap - level) summing to `total`: every GPU keeps the same room where it can."""
    low, high = min(0.0, float(min(caps))), float(max(caps))
    for _ in range(100):  # bisection on the common leftover level
        level = (low + high) / 2
        if sum(max(0.0, c - level) for c in caps) > total:
            low = level
        else:
            high = level
    return [max(0.0, c - high) for c in caps]


def _greedy_fits(sizes: Sequence[int], caps: Sequence[int]) -> bool:
    gpu, room = 0, caps[0] if caps else 0
    for size in sizes:
        while size > room:
            gpu += 1
            if gpu >= len(caps):
                return False
            room = caps[gpu]
        room -= size
    return True


def _cpu_offload(
    components: list[ComponentSize], budgets: dict[int, int], *, headroom: int
) -> Placement:
    """Weights on CPU, each component visiting the roomiest GPU in turn. Model-level offload needs
    the largest component plus headroom on that GPU; below that, only sequential (per-layer)."""
    gpu = min(budgets, key=lambda i: (-budgets[i], i))
    largest = max(c.weight_bytes for c in components)
    return Placement(
        strategy="cpu_offload",
        device_map={c.name: "cpu" for c in components},
        transformer_device_map=None,
        rows=[PlacementRow(c.name, "", "cpu", c.weight_bytes, c.form) for c in components],
        offload_gpu=gpu,
        sequential_offload=largest + headroom > budgets[gpu],
        budgets=dict(budgets),
        reserved={gpu: headroom},
    )


def _placement_error(
    components: list[ComponentSize],
    budgets: dict[int, int],
    *,
    headroom: int,
    aux_headroom: int,
    transformer_name: str,
) -> PlacementError:
    """Say how much is missing: first a component that fits no single GPU, else the total."""
    n, largest_gpu = len(budgets), max(budgets.values())
    advice = (
        "lower the max resolution (smaller activation headroom), raise max_memory if it caps the "
        "GPUs, or enable CPU offload (slow)"
    )
    # With several GPUs only the transformer splits: a bigger component needs a bigger GPU.
    for c in sorted(components, key=lambda c: -c.weight_bytes) if n > 1 else []:
        own = headroom if c.name == transformer_name else aux_headroom
        missing = c.weight_bytes + own - largest_gpu
        if missing > 0 and not (c.name == transformer_name and c.blocks):
            message = (
                f"{c.name} ({c.weight_bytes / GiB:.1f} GiB + {own / GiB:.1f} GiB headroom) must "
                f"sit on one GPU but the largest GPU budget is {largest_gpu / GiB:.1f} GiB (free "
                f"memory capped by max_memory): {missing / GiB:.1f} GiB missing. Use GPUs with "
                f"more free memory, {advice}."
            )
            return PlacementError(message, missing_bytes=missing)
    weights = sum(c.weight_bytes for c in components)
    # One GPU at least holds the text encoder / VAE; the others only transformer blocks.
    reserve = max(headroom, aux_headroom) + headroom * (n - 1)
    need, have = weights + reserve, sum(budgets.values())
    missing = need - have
    if missing > 0:
        what = f"{missing / GiB:.1f} GiB missing"
    else:
        # Enough bytes in total, but the blocks cannot be cut to fit the GPUs' free room.
        largest_block = max(
            (b for c in components if c.name == transformer_name for _, b in c.blocks or []),
            default=0,
        )
        missing = max(largest_block, 1)
        what = (
            f"the total fits but not as contiguous blocks (largest block "
            f"{largest_block / GiB:.2f} GiB); about {missing / GiB:.1f} GiB missing"
        )
    room = largest_gpu - headroom
    gpus_hint = (
        f"num_gpus >= {max(n + 1, math.ceil(weights / room))} of this size"
        if room > 0
        else "GPUs with more free memory"
    )
    message = (
        f"the model does not fit the replica's {n} GPU(s): it needs {need / GiB:.1f} GiB "
        f"(weights {weights / GiB:.1f} GiB + activation headroom {reserve / GiB:.1f} GiB: "
        f"{headroom / GiB:.1f} GiB per transformer GPU, {aux_headroom / GiB:.1f} GiB where the "
        f"VAE sits) but they offer {have / GiB:.1f} GiB (free memory capped by max_memory): "
        f"{what}. Give the replica more GPUs ({gpus_hint}), {advice}."
    )
    return PlacementError(message, missing_bytes=int(missing))


def _compact(names: list[str]) -> str:
    """'a, b, transformer_blocks.0-13' from ['a', 'b', 'transformer_blocks.0', ...]."""
    parts: list[str] = []
    run: tuple[str, int, int] | None = None  # prefix, first, last
    for name in names:
        prefix, _, idx = name.rpartition(".")
        if prefix and idx.isdigit():
            if run and run[0] == prefix and run[2] + 1 == int(idx):
                run = (prefix, run[1], int(idx))
                continue
            if run:
                parts.append(_run_label(run))
            run = (prefix, int(idx), int(idx))
            continue
        if run:
            parts.append(_run_label(run))
            run = None
        parts.append(name)
    if run:
        parts.append(_run_label(run))
    return ", ".join(parts)


def _run_label(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}"


def _device_label(device: Device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else device
