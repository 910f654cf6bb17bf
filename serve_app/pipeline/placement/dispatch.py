"""Putting loaded modules on their devices with accelerate: hooks, CPU offload, and a model
folder loaded per component onto the planned devices."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.pipeline.placement.measure import EightBit, build_empty_component, component_class
from serve_app.pipeline.placement.planner import TRANSFORMER, Device, Placement
from serve_app.pipeline.speed.quantization import quantize_onto

if TYPE_CHECKING:
    from torch import nn


def dispatch_component(
    module: nn.Module, device_map: Mapping[str, Any], *, main_device: Any = None
) -> None:
    """Accelerate hooks so the component's forward takes inputs from any device and answers on
    the caller's (as diffusers' own multi-device loading does). Main device: `main_device`, else
    where the first module (the input layers) lives, not whatever a set yields."""
    from accelerate import dispatch_model

    main = main_device if main_device is not None else next(iter(device_map.values()))
    skip = getattr(module, "_skip_keys", None) or getattr(
        module, "_skip_keys_device_placement", None
    )
    dispatch_model(
        module,
        device_map=dict(device_map),
        main_device=main,
        force_hooks=True,
        skip_keys=sorted(skip) if isinstance(skip, set) else skip,
    )


def strip_inner_hooks(module: nn.Module) -> bool:
    """Keep only the top-level accelerate hook of a component that sits on one device.

    `dispatch_model` with `{"": gpu}` also hooks every submodule that holds weights (an
    `AlignDevicesHook` per block and per linear layer), which costs Python time on every call and
    stops `torch.compile(fullgraph=True)` of the blocks. With all weights on one device only the
    top-level hook (inputs to the component's device, outputs back to the caller's) is needed.
    Returns whether hooks were removed; a component spread over devices keeps all of them.
    """
    from accelerate.hooks import remove_hook_from_submodules

    devices = {p.device for p in module.parameters()}
    # Weights on "meta" are offloaded: their hooks load them, so they must stay.
    if not hasattr(module, "_hf_hook") or len(devices) != 1 or devices.pop().type == "meta":
        return False
    for child in module.children():
        remove_hook_from_submodules(child)
    return True


def enable_cpu_offload(pipe: Any, placement: Placement) -> None:
    """diffusers' model (or sequential) CPU offload onto the plan's offload GPU."""
    gpu = placement.offload_gpu or 0
    if placement.sequential_offload:
        pipe.enable_sequential_cpu_offload(gpu_id=gpu)
    else:
        pipe.enable_model_cpu_offload(gpu_id=gpu)


def stream_from_cpu(pipe: Any, placement: Placement) -> list[str]:
    """Components the plan keeps on the CPU (all but a "cpu_offload" plan's) get accelerate's
    `cpu_offload` hooks: their weights are copied to `offload_gpu` a module at a time as their
    forward runs and dropped after; returns their names."""
    names = placement.streamed
    if not names or placement.offload_gpu is None:
        return []
    import torch
    from accelerate import cpu_offload

    gpu = torch.device("cuda", placement.offload_gpu)
    for name in names:
        cpu_offload(getattr(pipe, name), execution_device=gpu)
    return names


def load_local_pipeline(
    path: str | Path,
    class_name: str,
    placement: Placement,
    *,
    dtype: Any,
    to_device: Callable[[Device], Any] | None = None,
    eight_bit: EightBit | None = None,
    on_arrival: Callable[[Any, str], None] | None = None,
) -> Any:
    """Load a diffusers model folder laid out as `placement` says.

    Each of transformer / text_encoder / vae is loaded with `from_pretrained(subfolder=...)` and
    an explicit `device_map` (per block for a split transformer, so its weights stream straight to
    their GPUs), then the pipeline is assembled around them (scheduler, tokenizer and processor
    from the folder). `to_device` maps a plan device (GPU index or "cpu") to what `device_map`
    takes; tests map every GPU to "cpu" to run this path without GPUs. A component with layers
    `eight_bit` names is read into CPU memory and moved to its GPU a layer at a time, each
    quantized on arrival (`quantization.quantize_onto`): its bf16 weights need not fit the GPU.
    `on_arrival(layer, fqn)` runs on each of the transformer's 8-bit layers on its GPU before it
    is quantized (a fused LoRA: loading/lora.py `FuseOnArrival`).
    """
    import diffusers

    convert = to_device or (lambda d: d)
    pipeline_cls = getattr(diffusers, class_name)
    if placement.strategy == "cpu_offload":
        pipe = pipeline_cls.from_pretrained(str(path), dtype=dtype)
        enable_cpu_offload(pipe, placement)
        return pipe
    # Streamed components get their own hooks afterwards (`stream_from_cpu`).
    several_devices = (
        len({r.device for r in placement.rows if r.component not in placement.streamed}) > 1
    )
    modules: dict[str, Any] = {}
    for name in placement.device_map:
        cls: Any = component_class(path, name)
        if name == TRANSFORMER and placement.transformer_device_map:
            device_map = {k: convert(v) for k, v in placement.transformer_device_map.items()}
            if _has_eight_bit(cls, path, name, eight_bit):
                assert eight_bit is not None
                module = cls.from_pretrained(str(path), subfolder=name, dtype=dtype)  # CPU
                for unit, device in device_map.items():  # each block quantized onto its GPU
                    quantize_onto(
                        module.get_submodule(unit),
                        device,
                        lambda m, fqn, unit=unit: eight_bit(  # type: ignore[misc,arg-type]
                            TRANSFORMER, m, _joined(unit, fqn)
                        ),
                        on_arrival=_under(unit, on_arrival),
                    )
            else:
                module = cls.from_pretrained(
                    str(path), subfolder=name, device_map=device_map, dtype=dtype
                )
            if not hasattr(module, "_hf_hook"):
                dispatch_component(module, device_map)
        elif _has_eight_bit(cls, path, name, eight_bit) and placement.device_map[name] != "cpu":
            module = cls.from_pretrained(str(path), subfolder=name, dtype=dtype)  # on the CPU
            assert eight_bit is not None
            quantize_onto(
                module,
                convert(placement.device_map[name]),
                lambda m, fqn, name=name: eight_bit(name, m, fqn),  # type: ignore[misc,arg-type]
                on_arrival=on_arrival if name == TRANSFORMER else None,
            )
            if several_devices:
                dispatch_component(module, {"": convert(placement.device_map[name])})
        else:
            device_map = {"": convert(placement.device_map[name])}
            module = cls.from_pretrained(
                str(path), subfolder=name, device_map=device_map, dtype=dtype
            )
            if several_devices:
                dispatch_component(module, device_map)
        module.eval().requires_grad_(False)
        modules[name] = module
    return pipeline_cls.from_pretrained(str(path), dtype=dtype, **modules)


def _joined(unit: str, fqn: str) -> str:
    """A submodule's name in the component from its name in placement unit `unit`."""
    return f"{unit}.{fqn}" if fqn and unit else fqn or unit


def _under(
    unit: str, on_arrival: Callable[[Any, str], None] | None
) -> Callable[[Any, str], None] | None:
    """`on_arrival` for the modules of placement unit `unit`, told their names in the component."""
    if on_arrival is None:
        return None
    hook = on_arrival
    return lambda m, fqn: hook(m, _joined(unit, fqn))


def _has_eight_bit(cls: Any, path: str | Path, name: str, eight_bit: EightBit | None) -> bool:
    """Whether any layer of component `name` is loaded in 8 bits (checked on the meta device)."""
    if eight_bit is None:
        return False
    module = build_empty_component(path, name)
    return any(eight_bit(name, m, fqn) for fqn, m in module.named_modules())
