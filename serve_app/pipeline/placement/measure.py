"""The numbers the placement planner works from: the replica's GPUs (free memory, from the
driver) and each component's weight bytes, measured by building the real classes on the meta
device (accelerate's `init_empty_weights` and `compute_module_sizes`: no memory allocated)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.pipeline.placement.planner import TRANSFORMER, ComponentSize, GpuMemory

if TYPE_CHECKING:
    from torch import nn


GpuProbe = Callable[[], list[GpuMemory]]
# (component, module, its name inside the component) -> the 8-bit form the layer is loaded in
# ("fp8", "int8") or None; `quantization.eight_bit_kind` with the config's settings.
EightBit = Callable[[str, Any, str], "str | None"]


def probe_gpus(
    *,
    device_count: Callable[[], int] | None = None,
    mem_get_info: Callable[[int], tuple[int, int]] | None = None,
    name_of: Callable[[int], str] | None = None,
    capability_of: Callable[[int], tuple[int, int]] | None = None,
) -> list[GpuMemory]:
    """Every GPU this process sees (inside a Ray replica: the ones Ray gave it), free and total
    bytes as the driver reports them now, and its compute capability. Each function can be
    replaced (tests).

    Free memory is also capped by this process's allocator limit where one is set
    (`torch.cuda.set_per_process_memory_fraction`, how tests emulate a smaller card)."""
    import torch

    if device_count is None and not torch.cuda.is_available():
        return []
    count = (device_count or torch.cuda.device_count)()
    info = mem_get_info or _mem_get_info
    names = name_of or torch.cuda.get_device_name
    # A made-up table (tests) has no compute capability unless given one.
    capability = capability_of or (None if device_count else torch.cuda.get_device_capability)
    gpus = []
    for index in range(count):
        free, total = info(index)
        cc = capability(index) if capability is not None else None
        gpus.append(
            GpuMemory(
                index=index,
                name=names(index),
                total_bytes=total,
                free_bytes=free,
                capability=(int(cc[0]), int(cc[1])) if cc is not None else None,
            )
        )
    return gpus


def _mem_get_info(index: int) -> tuple[int, int]:
    """(free, total) from the driver, both capped by a per-process memory fraction if set."""
    import torch

    free, total = torch.cuda.mem_get_info(index)
    fraction = _memory_fraction(index)
    if fraction is None:
        return free, total
    cap = int(total * fraction)
    return max(0, min(free, cap - torch.cuda.memory_reserved(index))), cap


def _memory_fraction(index: int) -> float | None:
    import torch

    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(getter(index)) if getter is not None else 1.0
    return fraction if fraction < 1.0 else None


_DTYPES_BY_BYTES = {1: "float8_e4m3fn", 2: "bfloat16", 4: "float32"}
_DTYPE_NAMES = {1: "fp8", 2: "bf16", 4: "fp32"}
SIZED_COMPONENTS = ("transformer", "text_encoder", "vae")


def component_sizes_from_configs(
    model_dir: str | Path,
    *,
    dtype_bytes: int = 2,
    names: Iterable[str] = SIZED_COMPONENTS,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    split_components: Iterable[str] = (TRANSFORMER,),
    eight_bit: EightBit | None = None,
    offloaded: Iterable[str] = (),
) -> list[ComponentSize]:
    """Sizes of the components of a diffusers model folder, measured on the meta device.

    Reads `model_index.json` for each component's class and `<name>/config.json` for its config,
    builds the real class under accelerate's `init_empty_weights` (no memory is allocated) and
    counts bytes at `dtype_bytes` per floating-point element with accelerate's
    `compute_module_sizes`. Works on the bundled configs (`serve_app/pipeline/configs/...`) and on
    a downloaded model folder alike.
    `overrides` deep-merges into a component's config (tests shrink models with it).
    `eight_bit` says which layers are loaded in 8 bits (counted as placed: a byte per weight and
    a scale per row); `offloaded` names components kept on the CPU and streamed to the GPU.
    """
    split, streamed = set(split_components), set(offloaded)
    sizes = []
    for name in names:
        module = build_empty_component(model_dir, name, overrides=(overrides or {}).get(name))
        sizes.append(
            measure_module(
                name,
                module,
                dtype_bytes=dtype_bytes,
                split=name in split,
                eight_bit=eight_bit,
                offloaded=name in streamed,
            )
        )
    return sizes


def build_empty_component(
    model_dir: str | Path, name: str, *, overrides: Mapping[str, Any] | None = None
) -> nn.Module:
    """The component's real class built from its config with its parameters on the meta device.

    Buffers and plain tensor attributes stay real (CPU): `init_empty_weights` leaves buffers alone,
    and the transformer's RoPE tables are plain attributes that must not become meta tensors.
    """
    from accelerate import init_empty_weights

    cls = component_class(model_dir, name)
    config = load_component_config(model_dir, name, overrides=overrides)
    with init_empty_weights():
        return instantiate(cls, config)


def measure_module(
    name: str,
    module: nn.Module,
    *,
    dtype_bytes: int,
    split: bool,
    eight_bit: EightBit | None = None,
    offloaded: bool = False,
) -> ComponentSize:
    """Bytes of `module` at `dtype_bytes` per float element, with its placement units if `split`;
    the layers `eight_bit` names counted in 8 bits. `offloaded`: the largest module's own weights
    are what its GPU must hold at once (accelerate's cpu_offload moves one module at a time)."""
    import torch
    from accelerate.utils import compute_module_sizes

    from serve_app.pipeline.speed.quantization import eight_bit_bytes

    dtype = getattr(torch, _DTYPES_BY_BYTES[dtype_bytes])
    sizes = dict(compute_module_sizes(module, dtype=dtype))
    kinds: set[str] = set()
    for fqn, sub in module.named_modules():
        kind = eight_bit(name, sub, fqn) if eight_bit is not None else None
        if kind is None:
            continue
        kinds.add(kind)
        saved = sub.weight.numel() * dtype_bytes - eight_bit_bytes(sub)
        parts = fqn.split(".") if fqn else []
        for cut in range(len(parts) + 1):
            sizes[".".join(parts[:cut])] -= saved
    blocks = placement_units(module, sizes) if split else None
    form = _DTYPE_NAMES[dtype_bytes] + "".join(f"+{k}" for k in sorted(kinds))
    streamed = None
    if offloaded:
        streamed = max(
            sum(p.numel() for p in sub.parameters(recurse=False)) * dtype_bytes
            for sub in module.modules()
        )
    return ComponentSize(
        name=name,
        weight_bytes=int(sizes[""]),
        blocks=blocks,
        form=form,
        streamed_bytes=streamed,
    )


def placement_units(module: nn.Module, sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """The module's top-level children in registration (= forward) order, with every `ModuleList`
    (the repeated blocks) expanded to its items; root-level parameters become units of their own."""
    from torch import nn

    units: list[tuple[str, int]] = [
        (n, int(sizes[n])) for n, _ in module.named_parameters(recurse=False)
    ]
    for child_name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            units += [
                (f"{child_name}.{i}", int(sizes.get(f"{child_name}.{i}", 0)))
                for i in range(len(child))
            ]
        else:
            units.append((child_name, int(sizes.get(child_name, 0))))
    return units


def component_class(model_dir: str | Path, name: str) -> type:
    """The class `model_index.json` names for component `name` (e.g. diffusers' VAE class)."""
    import importlib

    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name)


def load_component_config(
    model_dir: str | Path, name: str, *, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`<model_dir>/<name>/config.json` as a dict, with `overrides` deep-merged in."""
    config = json.loads((Path(model_dir) / name / "config.json").read_text())
    return _deep_merge(config, overrides or {})


def instantiate(cls: Any, config: Mapping[str, Any]) -> nn.Module:
    """Build a diffusers (`from_config`) or transformers (`config_class.from_dict`) model."""
    if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers ModelMixin
        return cls.from_config(dict(config))
    return cls(cls.config_class.from_dict(dict(config)))


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
