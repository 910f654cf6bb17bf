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


def probe_gpus(
    *,
    device_count: Callable[[], int] | None = None,
    mem_get_info: Callable[[int], tuple[int, int]] | None = None,
    name_of: Callable[[int], str] | None = None,
) -> list[GpuMemory]:
    """Every GPU this process sees (inside a Ray replica: the ones Ray gave it), free and total
    bytes as the driver reports them now. Each function can be replaced (tests)."""
    import torch

    if device_count is None and not torch.cuda.is_available():
        return []
    count = (device_count or torch.cuda.device_count)()
    info = mem_get_info or torch.cuda.mem_get_info
    names = name_of or torch.cuda.get_device_name
    gpus = []
    for index in range(count):
        free, total = info(index)
        gpus.append(GpuMemory(index=index, name=names(index), total_bytes=total, free_bytes=free))
    return gpus


_DTYPES_BY_BYTES = {1: "float8_e4m3fn", 2: "bfloat16", 4: "float32"}
SIZED_COMPONENTS = ("transformer", "text_encoder", "vae")


def component_sizes_from_configs(
    model_dir: str | Path,
    *,
    dtype_bytes: int = 2,
    names: Iterable[str] = SIZED_COMPONENTS,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    split_components: Iterable[str] = (TRANSFORMER,),
) -> list[ComponentSize]:
    """Sizes of the components of a diffusers model folder, measured on the meta device.

    Reads `model_index.json` for each component's class and `<name>/config.json` for its config,
    builds the real class under accelerate's `init_empty_weights` (no memory is allocated) and
    counts bytes at `dtype_bytes` per floating-point element with accelerate's
    `compute_module_sizes`. Works on the bundled configs (`serve_app/pipeline/configs/...`) and on
    a downloaded model folder alike.
    `overrides` deep-merges into a component's config (tests shrink models with it).
    """
    split = set(split_components)
    sizes = []
    for name in names:
        module = build_empty_component(model_dir, name, overrides=(overrides or {}).get(name))
        sizes.append(measure_module(name, module, dtype_bytes=dtype_bytes, split=name in split))
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


def measure_module(name: str, module: nn.Module, *, dtype_bytes: int, split: bool) -> ComponentSize:
    """Bytes of `module` at `dtype_bytes` per float element, with its placement units if `split`."""
    import torch
    from accelerate.utils import compute_module_sizes

    dtype = getattr(torch, _DTYPES_BY_BYTES[dtype_bytes])
    sizes = compute_module_sizes(module, dtype=dtype)
    blocks = placement_units(module, sizes) if split else None
    return ComponentSize(name=name, weight_bytes=int(sizes[""]), blocks=blocks)


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
