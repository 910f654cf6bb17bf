"""Full-size Qwen-Image-Edit-2509/-2511 pipelines with random weights: GPU tests, no downloads.

The real classes are built from the configs bundled under `configs/qwen-image-edit-<variant>/`
(the published model folders' configs) and their weights are materialised with small random values
DIRECTLY on the devices a `Placement` chose: each parameter starts on the meta device and is
allocated on its GPU, so a 20 B-parameter transformer split over two GPUs never passes through host
memory. The outputs are noise, but every shape, dtype, device hop and memory figure is the real one.

Everything is exposed per module (`build_component`, `load_tokenizer_and_processor`) and every
config takes `overrides`, so tests build SHRUNK models (e.g. `{"transformer": {"num_layers": 2}}`)
on CPU through the same code path; the full size (~29 B parameters, ~54 GiB in bf16) only fits a
GPU machine.

Tokenizer: real Qwen tokenizer files cannot be downloaded here. `tokenizer_source` names a folder
to take a tokenizer from (a model folder with `tokenizer/`, e.g. the tiny model folder that
`serve_app/pipeline/random_weights/tiny.py` writes, or a tokenizer folder itself); with None a
byte-level tokenizer (256 byte tokens + the Qwen special tokens) is built in memory. Either
vocabulary is far smaller than the text encoder's 152064 rows, which is fine: every token id stays
below the vocab size, and the text encoder's image / video / vision-start / vision-end ids are set
to that tokenizer's ids.
The processor is always assembled here (Qwen2VLImageProcessor sized to the vision config's patch /
merge / temporal patch sizes, so the image-token count matches the vision tower).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.pipeline.placement.dispatch import dispatch_component, enable_cpu_offload
from serve_app.pipeline.placement.measure import (
    EightBit,
    build_empty_component,
    component_sizes_from_configs,
    load_component_config,
)
from serve_app.pipeline.placement.planner import ComponentSize, Device, Placement
from serve_app.pipeline.random_weights.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    byte_level_bpe,
    qwen2_tokenizer,
)

if TYPE_CHECKING:
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from torch import nn

SYNTHETIC_VARIANTS = ("2509", "2511")
CONFIGS_DIR = Path(__file__).parent.parent / "configs"  # pipeline/configs: the bundled real configs
MODEL_COMPONENTS = ("transformer", "text_encoder", "vae")
DEFAULT_INIT_STD = 0.02
# The text encoder's config fields that name special token ids.
_TOKEN_ID_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

Overrides = Mapping[str, Mapping[str, Any]]


def variant_dir(variant: str) -> Path:
    """The bundled config folder of a variant ("2509" or "2511"), laid out like the HF repo."""
    if variant not in SYNTHETIC_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {SYNTHETIC_VARIANTS}")
    return CONFIGS_DIR / f"qwen-image-edit-{variant}"


def synthetic_component_sizes(
    variant: str,
    *,
    dtype_bytes: int = 2,
    overrides: Overrides | None = None,
    eight_bit: EightBit | None = None,
    offloaded: Iterable[str] = (),
) -> list[ComponentSize]:
    """Transformer (with its placement units), text encoder and VAE sizes, from the meta device,
    as placed (`measure.component_sizes_from_configs`: 8-bit layers, components streamed)."""
    return component_sizes_from_configs(
        variant_dir(variant),
        dtype_bytes=dtype_bytes,
        overrides=overrides,
        eight_bit=eight_bit,
        offloaded=offloaded,
    )


def build_synthetic_pipeline(
    variant: str,
    *,
    placement: Placement,
    dtype: torch.dtype,
    tokenizer_source: str | Path | None,
    overrides: Overrides | None = None,
    init_std: float = DEFAULT_INIT_STD,
    seed: int = 0,
    eight_bit: EightBit | None = None,
    on_arrival: Callable[[nn.Module, str], None] | None = None,
) -> QwenImageEditPlusPipeline:
    """A `QwenImageEditPlusPipeline` of the variant, random weights laid out as `placement` says.

    "single" / "components" / "split": weights go straight to their devices; with more than one
    device every component gets accelerate hooks (as diffusers' own `device_map` loading does) so
    inputs follow the weights. "cpu_offload": weights on CPU, then model (or sequential) offload
    to `placement.offload_gpu`. `eight_bit` (`planning.eight_bit_for`): the layers it names are
    quantized as soon as they are made; a component the plan streams from the CPU is made on
    its GPU a module at a time and moved to the CPU (the caller attaches the streaming hooks).
    `on_arrival(module, fqn)` runs on each transformer module as soon as it is made, before it
    is quantized (a fused LoRA: loading/lora.py `FuseOnArrival`).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    model_dir = variant_dir(variant)
    overrides = overrides or {}
    text_config = load_component_config(
        model_dir, "text_encoder", overrides=overrides.get("text_encoder")
    )
    tokenizer, processor = load_tokenizer_and_processor(
        tokenizer_source, vision_config=text_config["vision_config"]
    )
    token_ids = special_token_ids(tokenizer)
    if max(token_ids.values()) >= text_config["text_config"]["vocab_size"]:
        raise ValueError(f"tokenizer ids {token_ids} exceed the text encoder's vocabulary")
    hooks = placement.strategy in ("components", "split")
    modules = {}
    for index, name in enumerate(MODEL_COMPONENTS):
        extra = dict(overrides.get(name) or {})
        if name == "text_encoder":
            extra = {**extra, **token_ids}
        device_map, then = _staging(
            placement, name, eight_bit, on_arrival=on_arrival if name == "transformer" else None
        )
        modules[name] = build_component(
            model_dir,
            name,
            device_map=device_map,
            dtype=dtype,
            overrides=extra,
            init_std=init_std,
            seed=seed + index,
            add_hooks=hooks,
            then=then,
        )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    pipe: Any = QwenImageEditPlusPipeline(  # Any: diffusers registers components dynamically
        scheduler=scheduler, tokenizer=tokenizer, processor=processor, **modules
    )
    if placement.strategy == "cpu_offload":
        enable_cpu_offload(pipe, placement)
    return pipe


def _staging(
    placement: Placement,
    name: str,
    eight_bit: EightBit | None,
    *,
    on_arrival: Callable[[nn.Module, str], None] | None = None,
) -> tuple[dict[str, Device], Callable[[nn.Module, str], None] | None]:
    """Where component `name`'s weights are made, and what happens to each module made
    (`on_arrival`, then its quantization)."""
    from accelerate.utils import set_module_tensor_to_device

    from serve_app.pipeline.speed.quantization import quantize_linear

    device_map = component_device_map(placement, name)
    if name in placement.streamed:
        assert placement.offload_gpu is not None

        def to_cpu(module: nn.Module, _: str) -> None:
            for pname, _param in list(module.named_parameters(recurse=False)):
                set_module_tensor_to_device(module, pname, "cpu", clear_cache=False)

        return {"": placement.offload_gpu}, to_cpu
    eight = None if placement.device_map[name] == "cpu" else eight_bit
    if eight is None and on_arrival is None:
        return device_map, None

    def arrive(module: nn.Module, fqn: str) -> None:
        if on_arrival is not None:
            on_arrival(module, fqn)
        kind = eight(name, module, fqn) if eight is not None else None
        if kind is not None:
            quantize_linear(module, kind)  # type: ignore[arg-type]

    return device_map, arrive


def component_device_map(placement: Placement, name: str) -> dict[str, Device]:
    """Module -> device for one component: the split map for a split transformer, else `{"": d}`."""
    if name == "transformer" and placement.transformer_device_map:
        return dict(placement.transformer_device_map)
    return {"": placement.device_map[name]}


def build_component(
    model_dir: str | Path,
    name: str,
    *,
    device_map: Mapping[str, Device],
    dtype: torch.dtype,
    overrides: Mapping[str, Any] | None = None,
    init_std: float = DEFAULT_INIT_STD,
    seed: int = 0,
    add_hooks: bool = False,
    then: Callable[[nn.Module, str], None] | None = None,
) -> nn.Module:
    """One component of `model_dir`, random weights allocated where `device_map` puts each module.

    With `add_hooks` the module is dispatched with accelerate hooks (main device = the device of
    its first module) so its forward accepts inputs from any device and returns them on the
    caller's device; a split map always gets hooks.
    """
    module = build_empty_component(model_dir, name, overrides=overrides)
    materialize_random_(
        module, device_map=device_map, dtype=dtype, init_std=init_std, seed=seed, then=then
    )
    module.eval().requires_grad_(False)
    if add_hooks or len(set(device_map.values())) > 1:
        _dispatch(module, device_map)
    return module


def materialize_random_(
    module: nn.Module,
    *,
    device_map: Mapping[str, Device],
    dtype: torch.dtype,
    init_std: float = DEFAULT_INIT_STD,
    seed: int = 0,
    then: Callable[[nn.Module, str], None] | None = None,
) -> None:
    """Replace every meta parameter with a random one on its mapped device; move buffers there too.

    Values: weights ~ N(0, init_std) (keeps activations finite through 60 blocks), biases 0,
    normalisation scales 1 (a 0.02 scale would shrink every norm's output 50x). The numbers are
    drawn on the target device (one seeded generator per device): drawing 20 B of them on the CPU
    would take minutes. `then(submodule, name)` runs as soon as a submodule's own parameters are
    made (the small-card loader quantizes a layer there, or moves it to the CPU), so the
    component's full bf16 weights never sit on the GPU at once.
    """
    from accelerate.utils import find_tied_parameters, retie_parameters, set_module_tensor_to_device

    tied = find_tied_parameters(module)
    norm_params = _norm_parameter_names(module)
    generators: dict[Device, torch.Generator] = {}
    seen: set[int] = set()
    # Module by module, each one's own parameters: the order of `named_parameters()`.
    for prefix, sub in list(module.named_modules()):
        for pname, param in list(sub.named_parameters(recurse=False)):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{prefix}.{pname}" if prefix else pname
            device = _device_for(name, device_map)
            if device not in generators:
                generators[device] = _generator(device, seed)
            target = _torch_device(device)
            value = _random_like(
                param, name in norm_params, dtype, init_std, target, generators[device]
            )
            set_module_tensor_to_device(
                module, name, target, value=value, dtype=value.dtype, clear_cache=False
            )
        if then is not None:
            then(sub, prefix)
    for name, buffer in list(module.named_buffers()):
        set_module_tensor_to_device(
            module,
            name,
            _torch_device(_device_for(name, device_map)),
            value=buffer,
            dtype=buffer.dtype,
            clear_cache=False,
        )
    retie_parameters(module, tied)


def load_tokenizer_and_processor(
    tokenizer_source: str | Path | None, *, vision_config: Mapping[str, Any]
) -> tuple[Any, Any]:
    """(tokenizer, Qwen2VLProcessor) for the pipeline; see the module docstring for the sources."""
    from transformers import AutoTokenizer, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if tokenizer_source is None:
        tokenizer = byte_level_tokenizer()
    else:
        folder = Path(tokenizer_source)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(folder)
    missing = [t for t in QWEN_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer from {tokenizer_source} lacks Qwen special tokens {missing}")
    sizes = {
        "patch_size": vision_config.get("patch_size", 14),
        "merge_size": vision_config.get("spatial_merge_size", 2),
        "temporal_patch_size": vision_config.get("temporal_patch_size", 2),
    }
    # transformers 5's Qwen2VLProcessor needs an explicit video processor; Qwen2.5-VL's own pixel
    # range.
    processor = Qwen2VLProcessor(
        image_processor=_image_processor_class()(min_pixels=3136, max_pixels=12845056, **sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
    )
    return tokenizer, processor


def byte_level_tokenizer() -> Any:
    """A Qwen2 tokenizer with no merges: one token per UTF-8 byte, then the Qwen special tokens
    (ids 256..262), whole and never split, as in the real vocabulary's relative order."""
    return qwen2_tokenizer(byte_level_bpe())


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The text-encoder config fields that must equal the tokenizer's special-token ids."""
    return {
        field: tokenizer.convert_tokens_to_ids(token) for field, token in _TOKEN_ID_FIELDS.items()
    }


# --- helpers ----------------------------------------------------------------------------------


def _dispatch(module: nn.Module, device_map: Mapping[str, Device]) -> None:
    main = next(iter(device_map.values()))
    dispatch_component(module, device_map, main_device=_torch_device(main))


def _device_for(tensor_name: str, device_map: Mapping[str, Device]) -> Device:
    """Longest module prefix of `tensor_name` in `device_map` ("" matches everything)."""
    parts = tensor_name.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in device_map:
            return device_map[prefix]
    raise KeyError(f"{tensor_name} is not covered by the device map")


def _torch_device(device: Device) -> torch.device:
    import torch

    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _norm_parameter_names(module: nn.Module) -> set[str]:
    """Scale parameters of normalisation layers (LayerNorm, RMSNorm, the VAE's RMS_norm.gamma)."""
    names = set()
    for prefix, sub in module.named_modules():
        if "norm" not in type(sub).__name__.lower():
            continue
        for pname, _ in sub.named_parameters(recurse=False):
            if pname in ("weight", "gamma"):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names


def _random_like(
    param: torch.Tensor,
    is_norm_scale: bool,
    dtype: torch.dtype,
    init_std: float,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    import torch

    target = dtype if param.dtype.is_floating_point else param.dtype
    if is_norm_scale:
        return torch.ones(param.shape, dtype=target, device=device)
    if param.ndim <= 1:  # biases (and 1-d scales outside norm layers): start at zero
        return torch.zeros(param.shape, dtype=target, device=device)
    value = torch.empty(param.shape, dtype=target, device=device)
    return value.normal_(0.0, init_std, generator=generator)


def _image_processor_class() -> Any:
    # The torchvision-backed image processor is `Qwen2VLImageProcessor` from transformers 5.2x
    # (the PIL one moved to `image_processing_pil_qwen2_vl`); before that it is `...Fast`.
    import importlib.util

    import transformers

    if importlib.util.find_spec("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"):
        return transformers.Qwen2VLImageProcessor
    return transformers.Qwen2VLImageProcessorFast  # type: ignore[attr-defined]


def _generator(device: Device, seed: int) -> torch.Generator:
    import torch

    return torch.Generator(device=_torch_device(device)).manual_seed(seed)


__all__ = [
    "CONFIGS_DIR",
    "QWEN_SPECIAL_TOKENS",
    "SYNTHETIC_VARIANTS",
    "build_component",
    "build_synthetic_pipeline",
    "byte_level_tokenizer",
    "component_device_map",
    "load_tokenizer_and_processor",
    "materialize_random_",
    "special_token_ids",
    "synthetic_component_sizes",
    "variant_dir",
]


# The linears a step-distillation LoRA of these blocks adapts here: each block's 8 attention
# projections and its 4 feed-forward linears (the 720 linears fp8 quantizes); the modulation
# linears are left alone.
SYNTHETIC_LORA_TARGETS = re.compile(
    r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj"
    r"|add_v_proj|to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))$"
)


def build_synthetic_lora(
    variant: str,
    target_dir: str | Path,
    *,
    rank: int = 64,
    seed: int = 0,
    gain: float = 4.0,
    overrides: Overrides | None = None,
) -> Path:
    """A random LoRA for the synthetic transformer, in the diffusers/peft key format that
    `load_lora_weights` reads, written as `target_dir/pytorch_lora_weights.safetensors` (bf16):
    rank `rank` on every `SYNTHETIC_LORA_TARGETS` linear, scaled so that each adapted weight
    matrix moves by about `gain / sqrt(in_features)` of its norm. For GPU tests and benchmarks
    of LoRA serving (speed and agreement, not quality); the numbers are drawn on the CPU (no CUDA
    context in the caller)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    transformer = build_empty_component(
        variant_dir(variant), "transformer", overrides=(overrides or {}).get("transformer")
    )
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and SYNTHETIC_LORA_TARGETS.match(name):
            a = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=gen)
            b *= gain * DEFAULT_INIT_STD / rank**0.5
            state[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            state[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))
    return path
