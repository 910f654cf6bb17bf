"""LoRAs: each configured LoRA is a model id, held one of two ways (`model.lora_mode`).

- **fused**: the one LoRA is folded into the transformer's bf16 weights at load (diffusers'
  `fuse_lora`, then its peft layers unloaded), before fp8 and compile: the deployment serves the
  LoRA's model at the base model's cost per forward, and fp8 quantizes the fused weights (never a
  LoRA over a down-cast base). With `model.quantize_at_load` (the one-card configs) the bf16
  transformer never sits on the card, so there is nothing to fuse into afterwards: the LoRA's
  factors are read first (`FuseOnArrival`: diffusers loads the file into a weightless stand-in of
  the transformer, so its key formats, ranks and alphas are read as `load_lora_weights` reads
  them), and each adapted linear gets base + its LoRA's product in bf16 as it reaches its GPU,
  THEN is quantized (`quantization.quantize_onto`, the synthetic loader's per-module hook).
- **hotswap**: the base model and every LoRA in one replica, each id at the fused model's cost
  per forward. Each LoRA is loaded through diffusers (`load_lora_weights`, which reads every
  published key format); its factors are taken off and the adapters unloaded, so the linears are
  plain again and fp8 and compile see exactly what they see without LoRAs. The adapted linears'
  base weights are kept aside (pinned host memory beside a GPU). A request for another id
  rewrites those linears in place: base + that LoRA's product (what fusing adds), quantized
  afresh when fp8 is on; the base id gets the base weights back, bit for bit. The compiled
  blocks see the same modules, shapes and tensors for every id: switching never recompiles.
  The price is paid once per switch (the base weights copied back), not on every forward as
  an unfused adapter's extra GEMMs would be. Not with `quantize_at_load` (the config refuses
  it): switching rewrites bf16 base weights loaded first, and the modulation linears' int8
  weights are not re-quantized in place; one-card configs serve a LoRA fused.

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
# One LoRA on one linear: (A, B, scale): the linear's fused weight is base + B @ A * scale.
Factors = tuple[Any, Any, float]


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
        names = [spec.name for spec in loras]
        taken = take_factors(transformer, loras, check=_check_resident)
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
                    value = fused_weight(value, factors)
                assign_weight(weight, value)
        self._active = wanted


def fused_weight(base: Any, factors: Factors) -> Any:
    """base + B @ A * scale: what peft's merge adds (diffusers' `fuse_lora`: B @ A times the
    layer's scaling, the configured scale folded in), on `base`'s device, the sum in the
    promoted dtype (the caller writes it into the weight's). One place for the arithmetic
    of hot-swapping and of fusing on arrival."""
    a, b, scale = factors
    return base + (b.to(base.device) @ a.to(base.device)) * scale


def take_factors(
    transformer: Any,
    loras: Sequence[LoraConfig],
    *,
    check: Callable[[str, Any], None] | None = None,
) -> dict[str, dict[str, Factors]]:
    """Adapted linear's name -> LoRA name -> its factors, copied off the peft layers diffusers'
    `load_lora_weights` put in `transformer` (scale: peft's scaling times the configured one).
    `check(name, base weight)` runs on each adapted linear first."""
    import torch
    from peft.tuners.lora import LoraLayer

    taken: dict[str, dict[str, Factors]] = {}
    with torch.no_grad():
        for module_name, layer in transformer.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if check is not None:
                check(module_name, layer.get_base_layer().weight)
            taken[module_name] = {
                spec.name: (
                    layer.lora_A[spec.name].weight.detach().clone(),
                    layer.lora_B[spec.name].weight.detach().clone(),
                    layer.scaling[spec.name] * spec.scale,
                )
                for spec in loras
                if spec.name in layer.lora_A
            }
    return taken


def fuses_on_arrival(model: ModelConfig) -> bool:
    """Whether this config's fused LoRA is added to each linear as it is loaded (the transformer
    loaded in 8 bits: `quantize_at_load` with fp8), rather than to the loaded bf16 weights."""
    return (
        bool(model.loras)
        and model.lora_mode == "fused"
        and model.quantize_at_load
        and model.quantization != "none"
    )


class FuseOnArrival:
    """The fused LoRA for a transformer loaded a layer at a time (`lora_mode: fused` with
    `quantize_at_load`): called with each module as it reaches its device, it adds the LoRA's
    product to an adapted linear's bf16 weight there, before the loader quantizes it; `finish`
    fuses the adapted linears the loader moved without handing them over (those kept in bf16)
    and checks that every one was fused."""

    def __init__(self, factors: dict[str, Factors], *, name: str) -> None:
        self._factors = dict(factors)
        self._done: set[str] = set()
        self.name = name

    @classmethod
    def load(
        cls,
        model: ModelConfig,
        stand_in: Any,
        *,
        dtype: Any,
        resolve: Resolve = resolve_lora,
    ) -> FuseOnArrival:
        """Read the config's one LoRA as `load_lora_weights` would load it into the transformer:
        into `stand_in` (the transformer built on the meta device, `measure.build_empty_component`)
        whose linears get weightless `dtype` weights on the CPU (a zero broadcast to each shape:
        no memory), so diffusers and peft read the file's keys, ranks and alphas and make the
        factors in the dtype and device a loaded transformer gives them."""
        from diffusers.loaders import QwenImageLoraLoaderMixin

        (spec,) = model.loras
        _weightless_linears(stand_in, dtype=dtype)
        folder, weight_name = resolve(spec)
        state, metadata = QwenImageLoraLoaderMixin.lora_state_dict(
            folder, weight_name=weight_name, local_files_only=True, return_lora_metadata=True
        )
        QwenImageLoraLoaderMixin.load_lora_into_transformer(
            state,
            transformer=stand_in,
            adapter_name=spec.name,
            metadata=metadata,
            low_cpu_mem_usage=True,  # as load_lora_weights: no random init of the factors first
        )
        factors = {
            module: held[spec.name]
            for module, held in take_factors(stand_in, [spec]).items()
            if spec.name in held
        }
        logger.info(
            "LoRA %s from %s (scale %.2f): %d linears, each fused as it is loaded",
            spec.name, spec.path, spec.scale, len(factors),
        )  # fmt: skip
        return cls(factors, name=spec.name)

    @property
    def pending(self) -> list[str]:
        """The adapted linears not fused yet."""
        return sorted(set(self._factors) - self._done)

    def __call__(self, module: Any, fqn: str) -> None:
        factors = self._factors.get(fqn)
        if factors is None or fqn in self._done:
            return
        import torch

        weight = module.weight
        if weight.device.type == "meta" or getattr(weight, "qdata", None) is not None:
            raise ValueError(
                f"LoRA {self.name}: {fqn} reached the fuse step offloaded or already quantized;"
                " fuse it into bf16 weights on their device (use quantize_at_load: false)"
            )
        with torch.no_grad():
            weight.copy_(fused_weight(weight, factors))
        self._done.add(fqn)

    def finish(self, transformer: Any) -> None:
        """Fuse the adapted linears not handed over on arrival (moved with the rest of the
        component, in bf16), then check that every adapted linear of the file was found."""
        modules = dict(transformer.named_modules())
        missing = [fqn for fqn in self.pending if fqn not in modules]
        if missing:
            raise ValueError(
                f"LoRA {self.name}: {len(missing)} adapted layers are not in the transformer"
                f" (e.g. {missing[0]}): a LoRA for another model?"
            )
        for fqn in self.pending:
            self(modules[fqn], fqn)
        logger.info("LoRA %s fused into %d linears as they were loaded", self.name, len(self._done))


def _weightless_linears(module: Any, *, dtype: Any) -> None:
    """Give every linear of a meta-device module CPU parameters of `dtype` that hold no memory
    (a zero broadcast to the shape): enough for peft to inject LoRA layers beside them and put
    the factors on the CPU in the dtype a loaded transformer's linears would give them."""
    import torch
    from torch import nn

    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            for pname, param in list(sub.named_parameters(recurse=False)):
                empty = torch.zeros((), dtype=dtype).expand(param.shape)
                setattr(sub, pname, nn.Parameter(empty, requires_grad=False))


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
