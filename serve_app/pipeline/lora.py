"""LoRAs: each configured LoRA is a model id, held one of two ways (`model.lora_mode`).

- **fused**: the one LoRA is folded into the transformer's bf16 weights at load (diffusers'
  `fuse_lora`, then its peft layers unloaded), before fp8 and compile: the deployment serves the
  LoRA's model at the base model's cost per forward, and fp8 quantizes the fused weights (never a
  LoRA over a down-cast base).
- **hotswap**: the base model and every LoRA in one replica. Each LoRA is loaded through diffusers
  (`load_lora_weights`, which reads every published key format), then its factors are kept on the
  device, padded to the largest rank with its scale folded in. One resident peft adapter (the
  slot), of that rank, covers every module any LoRA adapts; switching copies a LoRA's factors into
  it (the base model: zeros, so each adapted linear adds exact zeros). The compiled blocks see the
  same modules, shapes and Python state whichever id runs: switching never recompiles.

Callers hold the runner's lock: switching mutates the shared transformer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.common.config import LoraConfig, ModelConfig
from serve_app.pipeline.hub import is_hub_id, resolve_hub_file

logger = logging.getLogger("ray.serve")

SLOT = "serve_slot"  # the hot-swap adapter's name (never a configured LoRA's: see _UNKNOWN)
_UNKNOWN = "\x00unknown"  # never a valid model id (config names are user strings)

Resolve = Callable[[LoraConfig], "tuple[str, str | None]"]


def resolve_lora(spec: LoraConfig) -> tuple[str, str | None]:
    """(folder, weight file name) for diffusers' loader: a file path is split into the two; a
    Hugging Face id is fetched (`weight_name` at `revision`) into the Hugging Face cache."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        return str(path.parent), spec.weight_name or path.name
    if path.is_dir():
        return str(path), spec.weight_name
    if is_hub_id(spec.path):
        if not spec.weight_name:
            raise FileNotFoundError(
                f"LoRA {spec.name!r}: {spec.path} is a Hugging Face id; set weight_name to the"
                " .safetensors file to load from it"
            )
        file = resolve_hub_file(
            spec.path, spec.weight_name, revision=spec.revision, what=f"LoRA {spec.name!r}"
        )
        return str(file.parent), file.name
    raise FileNotFoundError(
        f"LoRA {spec.name!r}: {spec.path} is neither a file, a folder nor a Hugging Face id"
    )


def hold_loras(pipe: Any, model: ModelConfig, *, resolve: Resolve = resolve_lora) -> HotSwap | None:
    """Load the configured LoRAs into the pipeline's transformer and hold them as `lora_mode`
    says; returns the switch for hotswap (None when there is nothing to switch)."""
    if not model.loras:
        return None
    for spec in model.loras:
        folder, weight_name = resolve(spec)
        pipe.load_lora_weights(
            folder, weight_name=weight_name, adapter_name=spec.name, local_files_only=True
        )
        logger.info("loaded LoRA %s from %s (scale %.2f)", spec.name, spec.path, spec.scale)
    if model.lora_mode == "fused":
        (spec,) = model.loras
        pipe.fuse_lora(components=["transformer"], lora_scale=spec.scale, adapter_names=[spec.name])
        pipe.unload_lora_weights()  # the weights keep the fused LoRA; its peft layers go
        logger.info("LoRA %s fused into the transformer weights", spec.name)
        return None
    return HotSwap.build(pipe.transformer, model.loras)


@dataclass(frozen=True)
class _Slot:
    """One adapted linear: the slot's factors and, per LoRA, what to copy into them."""

    a: Any  # slot lora_A weight, (rank, in)
    b: Any  # slot lora_B weight, (out, rank)
    factors: dict[str, tuple[Any, Any]]  # LoRA name -> (A padded, B padded and scaled)


class HotSwap:
    """The hot-swap slot over a transformer and the LoRAs it can hold (see the module
    docstring); `activate` makes one model id's LoRA (or none) the slot's content."""

    def __init__(self, slots: dict[str, _Slot], names: Sequence[str], rank: int) -> None:
        self._slots = slots
        self._names = list(names)
        self.rank = rank
        # None: the base model; _UNKNOWN: a switch failed half-way, so redo the next one.
        self._active: str | None = _UNKNOWN

    @classmethod
    def build(cls, transformer: Any, loras: Sequence[LoraConfig]) -> HotSwap:
        """Take each loaded adapter's factors off the transformer, delete the adapters, add the
        slot over the modules they adapted, and start on the base model."""
        import torch
        from peft import LoraConfig as PeftLoraConfig
        from peft.tuners.lora import LoraLayer

        names = [spec.name for spec in loras]
        layers = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
        rank = max(m.r[name] for m in layers.values() for name in names if name in m.r)
        taken: dict[str, dict[str, tuple[Any, Any]]] = {}
        with torch.no_grad():
            for module_name, layer in layers.items():
                taken[module_name] = {
                    spec.name: _padded(layer, spec.name, rank, scale=spec.scale)
                    for spec in loras
                    if spec.name in layer.lora_A
                }
        transformer.delete_adapters(names)
        config = PeftLoraConfig(
            r=rank, lora_alpha=rank, target_modules=sorted(taken), init_lora_weights=True
        )
        with warnings.catch_warnings():
            # peft warns that the model had adapters before (the ones just deleted).
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(config, adapter_name=SLOT)
        transformer.set_adapters([SLOT], [1.0])  # scaling alpha / r = 1: B carries the scale
        modules = dict(transformer.named_modules())
        slots = {
            name: _Slot(
                a=modules[name].lora_A[SLOT].weight,
                b=modules[name].lora_B[SLOT].weight,
                factors=factors,
            )
            for name, factors in taken.items()
        }
        swap = cls(slots, names, rank)
        swap.activate(None)
        logger.info(
            "LoRA hot-swap: %d adapters in one rank-%d slot over %d linears",
            len(names), rank, len(slots),
        )  # fmt: skip
        return swap

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def active(self) -> str | None:
        return self._active

    def activate(self, model_id: str | None) -> None:
        """Fill the slot with `model_id`'s LoRA, or with zeros for any other id (the base)."""
        import torch

        wanted = model_id if model_id in self._names else None
        if wanted == self._active:
            return
        self._active = _UNKNOWN
        copy_to, copy_from, zero = [], [], []
        for slot in self._slots.values():
            factors = slot.factors.get(wanted) if wanted is not None else None
            if factors is None:
                zero.append(slot.b)  # A may keep anything: B = 0 makes the product exact 0
            else:
                copy_to += [slot.a, slot.b]
                copy_from += list(factors)
        with torch.no_grad():
            # One multi-tensor launch each, instead of two copies per adapted linear.
            if copy_to:
                torch._foreach_copy_(copy_to, copy_from)
            if zero:
                torch._foreach_zero_(zero)
        self._active = wanted


def _padded(layer: Any, name: str, rank: int, *, scale: float) -> tuple[Any, Any]:
    """Adapter `name`'s (A, B) on `layer`, zero-padded to `rank`, with peft's scaling and the
    configured scale folded into B (so the slot's own scaling stays 1)."""
    import torch

    a = layer.lora_A[name].weight
    b = layer.lora_B[name].weight
    r = a.shape[0]
    a_out = torch.zeros((rank, a.shape[1]), dtype=a.dtype, device=a.device)
    b_out = torch.zeros((b.shape[0], rank), dtype=b.dtype, device=b.device)
    a_out[:r] = a
    b_out[:, :r] = b * (layer.scaling[name] * scale)
    return a_out, b_out
