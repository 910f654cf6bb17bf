"""Every block's AdaLN modulation for all of an edit's timesteps at once, made at its first forward.

Each of the transformer's 60 blocks starts with `img_mod` and `txt_mod`: SiLU, then a linear from
the timestep embedding (3072 wide) to 6 x 3072 shift / scale / gate values. Its input is one row
per sample (two with 2511's zero-timestep references), so each is a matrix-vector product bound by
reading its weights: 120 x 113 MB, ~13.6 GB per forward (its share of a forward: docs/gpu.md,
bench/results/h200-forward-modulation.json). Yet the rows
depend only on the timestep, and the scheduler knows every timestep before the first step. So at
an edit's first forward, each module computes its output for all of them in one matrix product
(its weights read once for the edit, not once per forward), and every forward picks its rows.

Which rows: a pre-hook on `time_text_embed` sees the timesteps the forward embeds and finds each
among the table's (the scheduler's, converted as the pipelines pass them, plus the zero timestep);
`txt_mod`, which 2511 hands only the first half of the rows, reads the first half. The first
forward of an edit checks that every timestep is found (one host sync per edit); where one is not
(a caller with its own timesteps), the modules compute as diffusers does for that edit.

The values are diffusers' own function; only the rounding of the batched products differs
(tests/gpu). A LoRA on these linears is included (tables are made after the edit's adapters are
set). Not used on a transformer split across devices or driven by accelerate hooks (offload).
Costs: tables of 64 x 18432 values per module up to 63 steps (then 128, ...), 283 MB in bf16.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("ray.serve")

Schedule = Callable[[], "torch.Tensor | None"]


class TabledModulation(nn.Sequential):
    """diffusers' `img_mod` / `txt_mod` (SiLU, Linear) that reads its output from `mod_table`
    where one is set (same weights, same state dict: only the class of each instance changes)."""

    mod_table: torch.Tensor | None
    mod_rows: torch.Tensor | None

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        table = self.mod_table
        if table is None or self.mod_rows is None:
            return super().forward(temb)
        # The first rows: `txt_mod` gets the first half of 2511's (sample, zero-timestep) rows.
        return table.index_select(0, self.mod_rows[: temb.shape[0]])


class ModulationTables:
    """The tables of one transformer's modulation modules, remade at each edit's first forward.

    `schedule` returns the timesteps the pipeline denoises with (its scheduler's `timesteps`,
    diffusers' 0-1000 scale), or None.
    """

    def __init__(self, transformer: Any, schedule: Schedule) -> None:
        self.modules: list[TabledModulation] = [
            module
            for block in transformer.transformer_blocks
            for module in (block.img_mod, block.txt_mod)
        ]
        self._schedule = schedule
        self._source: weakref.ref[torch.Tensor] | None = None  # the schedule tables were made of
        self._keys: torch.Tensor | None = None  # their timesteps, as the forward sees them
        self._rows: torch.Tensor | None = None
        self._warned = False

    @property
    def active(self) -> bool:
        return self._keys is not None

    def before_embedding(self, module: Any, args: tuple[Any, ...]) -> None:
        """`time_text_embed`'s pre-hook: (re)make the tables for a new schedule, set the rows."""
        timestep, hidden_states = args[0], args[1]
        schedule = self._schedule()
        if schedule is None:  # not called by a pipeline: diffusers' path
            if self._source is not None:
                self._clear()
            return None
        if self._source is None or self._source() is not schedule:
            self._make(module, schedule, timestep, hidden_states)
        if self._keys is None:
            return None
        rows = (timestep[:, None] == self._keys[None, :]).int().argmax(dim=1)
        if self._rows is None or self._rows.shape != rows.shape:
            self._rows = rows
            for mod in self.modules:
                mod.mod_rows = rows
        else:
            self._rows.copy_(rows)  # the same tensor in every module: no attribute writes
        return None

    def _make(
        self, embed: Any, schedule: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        self._clear()
        self._source = weakref.ref(schedule)
        # As the pipelines pass them: `t.to(latents.dtype) / 1000`, then the zero timestep.
        keys = schedule.to(device=timestep.device, dtype=timestep.dtype) / 1000
        keys = torch.cat([keys, keys.new_zeros(1)])
        if not bool(torch.isin(timestep, keys).all()):  # one host sync per edit
            if not self._warned:
                logger.warning(
                    "modulation tables: this forward's timesteps are not the scheduler's;"
                    " computing the modulation per forward"
                )
                self._warned = True
            return
        temb = embed.forward(keys, hidden)  # `.forward`: not this hook again
        rows = table_rows(len(keys))
        for mod in self.modules:
            values = nn.Sequential.forward(mod, temb)
            mod.mod_table = torch.cat(
                [values, values.new_zeros(rows - len(keys), *values.shape[1:])]
            )
        self._keys = keys

    def _clear(self) -> None:
        self._source = self._keys = self._rows = None
        for mod in self.modules:
            mod.mod_table = None
            mod.mod_rows = None


def table_rows(timesteps: int) -> int:
    """Rows of a table for `timesteps` (the schedule's and the zero one): at least 64, a power of
    two. A table's shape is part of what the compiled blocks were compiled for (torch.compile
    keeps module buffers' shapes static): a few sizes, not one per step count, so the warm-up
    edit's 2 steps and a 50-step edit run the same compiled code."""
    return max(64, 1 << (timesteps - 1).bit_length())


def tables_fit(transformer: Any) -> str | None:
    """Why `transformer` cannot take modulation tables, or None where it can."""
    embed = getattr(transformer, "time_text_embed", None)
    blocks = getattr(transformer, "transformer_blocks", None)
    if embed is None or blocks is None:
        return "not a Qwen-Image transformer"
    if getattr(embed, "use_additional_t_cond", False):
        return "its timestep embedding takes another condition"
    modules = [embed, *(m for block in blocks for m in (block.img_mod, block.txt_mod))]
    if any(hasattr(m, "_hf_hook") for m in modules):
        return "accelerate hooks move its weights"
    if len({p.device for m in modules for p in m.parameters()}) > 1:
        return "it is split across devices"
    return None


def install_modulation_tables(transformer: Any, schedule: Schedule) -> ModulationTables | None:
    """Switch `transformer`'s modulation modules to `TabledModulation` and hook its timestep
    embedding; None (nothing changed) where `tables_fit` says no."""
    if tables_fit(transformer) is not None or hasattr(transformer, "_modulation_tables"):
        return None
    for block in transformer.transformer_blocks:
        for module in (block.img_mod, block.txt_mod):
            module.__class__ = TabledModulation
            module.register_buffer("mod_table", None, persistent=False)
            module.register_buffer("mod_rows", None, persistent=False)
    tables = ModulationTables(transformer, schedule)
    handle = transformer.time_text_embed.register_forward_pre_hook(tables.before_embedding)
    transformer._modulation_tables = (tables, handle)
    return tables


def uninstall_modulation_tables(transformer: Any) -> bool:
    """Undo `install_modulation_tables` (benchmarks compare both forms in one process)."""
    installed = getattr(transformer, "_modulation_tables", None)
    if installed is None:
        return False
    tables, handle = installed
    handle.remove()
    for module in tables.modules:
        del module.mod_table, module.mod_rows  # the buffers
        module.__class__ = nn.Sequential
    del transformer._modulation_tables
    return True


__all__ = [
    "ModulationTables",
    "TabledModulation",
    "install_modulation_tables",
    "table_rows",
    "tables_fit",
    "uninstall_modulation_tables",
]
