"""How one replica's ranks share an edit: CFG degree x Ulysses degree (pure: no torch, no Ray).

Rank layout: rank = cfg_index * ulysses + ulysses_index. CFG group `c` (ranks c*U .. c*U+U-1)
computes branch `c` of every true-CFG step (0: the prompt, 1: the negative prompt); inside a group
the Ulysses ranks split the token sequence (diffusers' context parallelism: all-to-all attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from serve_app.common.sizing import SIZE_MULTIPLE

Degree = int | Literal["auto"]


class ParallelPlanError(ValueError):
    """A parallel shape that cannot run (said before anything is loaded)."""


@dataclass(frozen=True)
class ParallelPlan:
    cfg: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    def coords(self, rank: int) -> tuple[int, int]:
        """(CFG group, Ulysses rank inside it) of a global rank."""
        return divmod(rank, self.ulysses)

    def describe(self) -> str:
        parts = []
        if self.cfg > 1:
            parts.append(f"CFG {self.cfg}")
        if self.ulysses > 1:
            parts.append(f"Ulysses {self.ulysses}")
        shape = " x ".join(parts) or "single rank"
        return f"{shape} over {self.world_size} rank(s)"


def plan_parallel(
    world_size: int,
    *,
    cfg: Degree = "auto",
    ulysses: Degree = "auto",
    heads: int | None = None,
    true_cfg: bool = True,
) -> ParallelPlan:
    """The plan for `world_size` ranks. `auto` puts CFG first (its two passes need no exchange
    inside a forward: one all-gather per step), then Ulysses over the rest: measured on H200 a CFG
    split of 2 GPUs beats Ulysses 2 (docs/gpu.md). With `true_cfg` False (some model id runs
    without true CFG by default, e.g. a distilled LoRA) `auto` is Ulysses over every rank: a CFG
    split would leave half the ranks idle on those edits."""
    if world_size < 1:
        raise ParallelPlanError(f"model.parallel.gpus must be >= 1, got {world_size}")
    if cfg == "auto":
        even = world_size % 2 == 0 and (ulysses == "auto" or world_size // 2 == ulysses)
        # An explicit ulysses of half the ranks asks for the CFG split whatever the ids run.
        cfg = 2 if even and (true_cfg or ulysses != "auto") else 1
    if cfg not in (1, 2):
        raise ParallelPlanError(f"model.parallel.cfg must be 1 or 2, got {cfg}")
    if world_size % cfg:
        raise ParallelPlanError(f"model.parallel.cfg {cfg} does not divide {world_size} GPUs")
    if ulysses == "auto":
        ulysses = world_size // cfg
    if cfg * ulysses != world_size:
        raise ParallelPlanError(
            f"model.parallel: cfg {cfg} x ulysses {ulysses} = {cfg * ulysses} ranks, but the"
            f" replica has {world_size} GPUs (ranks): the product must equal the GPU count"
        )
    if heads is not None and ulysses > 1 and heads % ulysses:
        raise ParallelPlanError(
            f"model.parallel.ulysses {ulysses} must divide the transformer's {heads} attention"
            " heads (each Ulysses rank computes whole heads)"
        )
    return ParallelPlan(cfg=cfg, ulysses=ulysses)


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (the text stream's padded length)."""
    return -(-length // multiple) * multiple


def ulysses_work_size(
    width: int,
    height: int,
    *,
    extra_tokens: int,
    degree: int,
    patch: int = SIZE_MULTIPLE,
    search: int = 4,
) -> tuple[int, int]:
    """The size to denoise at so that the image tokens split evenly over `degree` Ulysses ranks.

    Image tokens are (width/patch) x (height/patch) for the target plus `extra_tokens` for the
    reference images. When they do not divide by `degree`, the nearest size (each side within
    `search` patches, closest aspect ratio, then closest area) whose token count does is returned;
    the runner resizes the result to the requested size. `width`, `height`: multiples of `patch`.
    """
    cols, rows = width // patch, height // patch
    if degree <= 1 or (cols * rows + extra_tokens) % degree == 0:
        return width, height
    candidates = [
        # closest aspect ratio, then closest area, then the smallest change
        (
            abs(math.log(c * rows / (r * cols))),
            abs(c * r - cols * rows),
            abs(c - cols) + abs(r - rows),
            c,
            r,
        )
        for c in range(max(1, cols - search), cols + search + 1)
        for r in range(max(1, rows - search), rows + search + 1)
        if (c * r + extra_tokens) % degree == 0
    ]
    if not candidates:
        raise ParallelPlanError(f"no size near {width}x{height} splits over {degree} ranks")
    *_, c, r = min(candidates)
    return c * patch, r * patch
