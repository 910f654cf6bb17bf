"""LoRAs: each configured LoRA is a model id, held one of two ways (`model.lora_mode`).

- **fused**: the one LoRA is folded into the transformer's bf16 weights at load (diffusers'
  `fuse_lora`, then its peft layers unloaded), before fp8 and compile: the deployment serves the
  LoRA's model at the base model's cost per forward, and fp8 quantizes the fused weights (never a
  LoRA over a down-cast base).
- **hotswap**: the base model and every LoRA in one replica, each id at the fused model's cost
  per forward. Each LoRA is loaded through diffusers (`load_lora_weights`, which reads every
  published key format); its factors are taken off and the adapters unloaded, so the linears are
  plain again and fp8 and compile see exactly what they see without LoRAs. The adapted linears'
  base weights are kept aside (pinned host memory beside a GPU). A request for another id
  rewrites those linears in place: base + that LoRA's product (what fusing adds), quantized
  afresh when fp8 is on; the base id gets the base weights back, bit for bit. The compiled
  blocks see the same modules, shapes and tensors for every id: switching never recompiles.
  The price is paid once per switch (the base weights copied back), not on every forward as
  an unfused adapter's extra GEMMs would be.

Callers hold the runner's lock: switching mutates the shared transformer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.common.config import LoraConfig, ModelConfig
from serve_app.pipeline.loading.hub import is_hub_id, resolve_hub_file

logger = logging.getLogger("ray.serve")

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
class _Linear:
    """One adapted linear: its module, its base weight (bf16, off to the side) and, per LoRA,
    the factors whose product is added to that base."""

    module: Any  # the transformer's nn.Linear (its weight is rewritten in place)
    base: Any  # its base weight, as loaded: on the host (pinned) beside a GPU, else a copy
    factors: dict[str, tuple[Any, Any, float]]  # LoRA name -> (A, B, scale) on the weight's device


class HotSwap:
    """The LoRAs one replica can switch between, held as weights (see the module docstring);
    `activate` makes one model id's fused weights (or the base's) the linears' content."""

    def __init__(self, linears: Sequence[_Linear], names: Sequence[str]) -> None:
        self._linears = list(linears)
        self._names = list(names)
        # None: the base model; _UNKNOWN: a switch failed half-way, so redo the next one.
        self._active: str | None = None

    @classmethod
    def build(cls, transformer: Any, loras: Sequence[LoraConfig]) -> HotSwap:
        """Take each loaded adapter's factors off the transformer, unload the adapters (the
        linears are plain again, with the base weights), and keep each adapted linear's base
        weight aside. Runs before fp8 and compile: both see plain linears."""
        import torch
        from peft.tuners.lora import LoraLayer

        names = [spec.name for spec in loras]
        layers: dict[str, Any] = {
            n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)
        }
        taken: dict[str, dict[str, tuple[Any, Any, float]]] = {}
        with torch.no_grad():
            for module_name, layer in layers.items():
                _check_resident(module_name, layer.get_base_layer().weight)
                taken[module_name] = {
                    spec.name: (
                        layer.lora_A[spec.name].weight.detach().clone(),
                        layer.lora_B[spec.name].weight.detach().clone(),
                        layer.scaling[spec.name] * spec.scale,
                    )
                    for spec in loras
                    if spec.name in layer.lora_A
                }
        transformer.unload_lora()  # plain linears again, holding the base weights
        modules = dict(transformer.named_modules())
        weights = [modules[name].weight for name in taken]
        linears = [
            _Linear(module=modules[name], base=base, factors=factors)
            for (name, factors), base in zip(taken.items(), _aside(weights), strict=True)
        ]
        held = sum(lin.base.numel() * lin.base.element_size() for lin in linears)
        logger.info(
            "LoRA hot-swap: %d LoRAs over %d linears; their base weights kept aside (%.2f GiB)",
            len(names), len(linears), held / 1024**3,
        )  # fmt: skip
        return cls(linears, names)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def linears(self) -> int:
        """How many linears switching rewrites."""
        return len(self._linears)

    def activate(self, model_id: str | None) -> None:
        """Make the adapted linears hold `model_id`'s fused weights: base + its LoRA's product,
        quantized as the linear is (fp8: afresh, per row); any other id gets the base back."""
        import torch

        from serve_app.pipeline.speed.quantization import assign_weight

        wanted = model_id if model_id in self._names else None
        if wanted == self._active:
            return
        self._active = _UNKNOWN
        with torch.no_grad():
            for lin in self._linears:
                weight = lin.module.weight
                value = lin.base.to(weight.device, non_blocking=True)
                factors = lin.factors.get(wanted) if wanted is not None else None
                if factors is not None:
                    a, b, scale = factors
                    # What peft's merge adds (B @ A times the scaling), in the weight's dtype:
                    # the same fused weights `lora_mode: fused` gets from diffusers.
                    value = value + (b @ a) * scale
                assign_weight(weight, value)
        self._active = wanted


def _check_resident(name: str, weight: Any) -> None:
    if weight.device.type == "meta":
        raise ValueError(
            f"lora_mode hotswap rewrites the adapted linears' weights, but {name} is offloaded"
            " (model.cpu_offload / max_memory): give the transformer room on the GPUs, or use"
            " lora_mode: fused"
        )


_CHUNK_BYTES = 1 << 30  # a power of two: the pinned-host allocator rounds each request up to one


def _aside(weights: Sequence[Any]) -> list[Any]:
    """Copies of `weights` kept off the GPU: beside CUDA weights, views into pinned host chunks
    of 1 GiB (copying one back is then a fast DMA; one pinned allocation per weight would each be
    rounded up to a power of two); plain clones otherwise."""
    import torch

    if any(w.device.type != "cuda" for w in weights):
        return [w.detach().clone() for w in weights]
    held: list[Any] = []
    chunk, used = None, 0
    with torch.no_grad():
        for w in weights:
            size = w.numel() * w.element_size()
            if chunk is None or used + size > chunk.numel():
                chunk = torch.empty(max(size, _CHUNK_BYTES), dtype=torch.uint8, pin_memory=True)
                used = 0
            view = chunk[used : used + size].view(w.dtype).view(w.shape)
            view.copy_(w.detach())
            held.append(view)
            used += size
    return held
