"""One loader per model source (`model.source`): where the weights come from and how they are put
on the replica's devices. Each returns a `LoadedPipeline`; `loader.load_runner` does the rest.

- `tiny`: the embedded random-weight model (built on first use), loaded as a folder;
- `local`: a diffusers model folder, or a Hugging Face model id (`hub`: its snapshot in the HF
  cache); with 2+ GPUs and device_map auto/balanced, or on one GPU with 8-bit layers or a
  streamed text encoder, through the placement planner (per-component loading), else
  diffusers' own `device_map`;
- `synthetic`: the full-size architecture with random weights made on the planned devices.

A fused LoRA with `quantize_at_load` (`lora.fuses_on_arrival`) is added to each adapted linear
as the planned loaders put it on its device, before it is quantized (`lora.FuseOnArrival`);
`LoadedPipeline.lora_fused` tells `loader` not to load it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.common.config import ModelConfig
from serve_app.pipeline.loading.hub import resolve_model_path
from serve_app.pipeline.loading.lora import FuseOnArrival, fuses_on_arrival
from serve_app.pipeline.placement.dispatch import load_local_pipeline, stream_from_cpu
from serve_app.pipeline.placement.load_plan import (
    device_labels,
    eight_bit_for,
    offloaded_for,
    plan_load,
)
from serve_app.pipeline.placement.measure import build_empty_component, component_sizes_from_configs
from serve_app.pipeline.placement.planner import ComponentSize, GpuMemory, Placement, PlacementError
from serve_app.pipeline.running.runner import SUPPORTED_PIPELINES

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Target:
    """What every loader is told: the GPUs this replica sees, the device map resolved from the
    config ("cpu", "cuda" or "balanced") and the torch dtype."""

    gpus: list[GpuMemory]
    device_map: str
    dtype: Any


@dataclass(frozen=True)
class LoadedPipeline:
    pipe: Any
    device_map: dict[str, str]  # component -> device label, for ModelInfo and /ready
    table: str  # the placement as logged
    transformer: Any  # what the speed switches apply to
    lora_fused: bool = False  # the fused LoRA was added to the linears as they were loaded


def load_tiny(model: ModelConfig, target: Target) -> LoadedPipeline:
    from serve_app.pipeline.random_weights.tiny import ensure_tiny_model

    path = ensure_tiny_model(model.path, variant=model.tiny_variant)
    logger.warning(
        "!!! SERVING THE EMBEDDED TINY MODEL WITH RANDOM WEIGHTS (%s): outputs are noise."
        " Set model.source=local and model.path (or QWEN_MODEL_DIR) for real edits. !!!",
        path,
    )
    return _from_folder(path, target)


def load_local(model: ModelConfig, target: Target) -> LoadedPipeline:
    assert model.path is not None
    # A Hugging Face id becomes its snapshot folder (downloaded if missing).
    path = resolve_model_path(model.path, revision=model.revision)
    planned = target.device_map == "balanced" and len(target.gpus) >= 2
    # 8-bit layers or a streamed text encoder: per component, each layer quantized on arrival.
    small = target.device_map == "cuda" and bool(eight_bit_for(model) or offloaded_for(model))
    if not (planned or small):
        return _from_folder(path, target)
    class_name = pipeline_class_name(path)
    sizes = component_sizes_from_configs(
        path,
        dtype_bytes=target.dtype.itemsize,
        eight_bit=eight_bit_for(model),
        offloaded=offloaded_for(model),
    )

    def build(placement: Placement, fuse: FuseOnArrival | None) -> Any:
        return load_local_pipeline(
            path,
            class_name,
            placement,
            dtype=target.dtype,
            eight_bit=eight_bit_for(model),
            on_arrival=fuse,
        )

    def stand_in() -> Any:
        return build_empty_component(path, "transformer")

    return _planned(model, target, sizes, what=str(path), build=build, stand_in=stand_in)


def load_synthetic(model: ModelConfig, target: Target) -> LoadedPipeline:
    from serve_app.pipeline.random_weights.synthetic import (
        build_synthetic_pipeline,
        synthetic_component_sizes,
        variant_dir,
    )

    sizes = synthetic_component_sizes(
        model.synthetic_variant,
        dtype_bytes=target.dtype.itemsize,
        overrides=model.synthetic_overrides,
        eight_bit=eight_bit_for(model),
        offloaded=offloaded_for(model),
    )

    def build(placement: Placement, fuse: FuseOnArrival | None) -> Any:
        logger.warning(
            "!!! SYNTHETIC MODEL: real architecture, RANDOM WEIGHTS: outputs are noise"
            " (benchmarks and GPU tests only). !!!"
        )
        return build_synthetic_pipeline(
            model.synthetic_variant,
            placement=placement,
            dtype=target.dtype,
            tokenizer_source=_synthetic_tokenizer_source(model.path),
            overrides=model.synthetic_overrides,
            eight_bit=eight_bit_for(model),
            on_arrival=fuse,
        )

    def stand_in() -> Any:
        overrides = (model.synthetic_overrides or {}).get("transformer")
        return build_empty_component(
            variant_dir(model.synthetic_variant), "transformer", overrides=overrides
        )

    what = f"synthetic Qwen-Image-Edit-{model.synthetic_variant} (random weights)"
    return _planned(model, target, sizes, what=what, build=build, stand_in=stand_in)


def fetch_model_files(model: ModelConfig) -> None:
    """Put the model's files on this node (build the tiny model, download a Hub id, the synthetic
    model's tokenizer) without loading them: a parallel replica's rank 0 does this before the
    other ranks start, so they find complete folders instead of racing to make them."""
    if model.source == "tiny":
        from serve_app.pipeline.random_weights.tiny import ensure_tiny_model

        ensure_tiny_model(model.path, variant=model.tiny_variant)
    elif model.source == "synthetic":
        _synthetic_tokenizer_source(model.path)
    elif model.path is not None:
        resolve_model_path(model.path, revision=model.revision)


LOADERS: dict[str, Callable[[ModelConfig, Target], LoadedPipeline]] = {
    "tiny": load_tiny,
    "local": load_local,
    "synthetic": load_synthetic,
}


def pipeline_class_name(model_dir: str | Path) -> str:
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a diffusers model folder (no model_index.json). Download one"
            " with `hf download Qwen/Qwen-Image-Edit-2509 --local-dir DIR`."
        )
    name = json.loads(index.read_text())["_class_name"]
    if name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{model_dir} holds a {name}; supported: {', '.join(SUPPORTED_PIPELINES)}."
        )
    return str(name)


def _from_folder(path: Path, target: Target) -> LoadedPipeline:
    """A model folder through diffusers' own `device_map` (one GPU, the CPU, or "balanced")."""
    class_name = pipeline_class_name(path)
    logger.info(
        "loading %s from %s: device_map=%s dtype=%s visible GPUs=%d",
        class_name, path, target.device_map, target.dtype, len(target.gpus),
    )  # fmt: skip
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    pipe = pipeline_cls.from_pretrained(str(path), dtype=target.dtype, device_map=target.device_map)
    placement = _placement_of(pipe, fallback=target.device_map)
    table = "\n".join(f"  {name:<14} -> {dev}" for name, dev in placement.items())
    return LoadedPipeline(pipe, placement, table, pipe.transformer)


def _planned(
    model: ModelConfig,
    target: Target,
    sizes: list[ComponentSize],
    *,
    what: str,
    build: Callable[[Placement, FuseOnArrival | None], Any],
    stand_in: Callable[[], Any],
) -> LoadedPipeline:
    """Plan the placement (`planning.plan_load`) and build the pipeline laid out so; a LoRA
    fused on arrival is read first from `stand_in()` (the transformer on the meta device)."""
    gpus = {"cpu": [], "cuda": target.gpus[:1]}.get(target.device_map, target.gpus)
    try:
        plan = plan_load(model, sizes, gpus)
    except PlacementError as exc:
        logger.error("cannot place %s on this replica's GPUs: %s", what, exc)
        raise
    table = plan.table()
    logger.info("placement of %s (%s, visible GPUs %d):\n%s", what, target.dtype, len(gpus), table)
    fuse = None
    # diffusers' CPU offload loads the whole bf16 pipeline: the LoRA is fused after it as usual.
    if fuses_on_arrival(model) and plan.placement.strategy != "cpu_offload":
        fuse = FuseOnArrival.load(model, stand_in(), dtype=target.dtype)
    pipe = build(plan.placement, fuse)
    if fuse is not None:
        fuse.finish(pipe.transformer)
    stream_from_cpu(pipe, plan.placement)
    return LoadedPipeline(
        pipe, device_labels(plan), table, pipe.transformer, lora_fused=fuse is not None
    )


def _placement_of(pipe: Any, *, fallback: str) -> dict[str, str]:
    """Component -> device, from diffusers' hf_device_map (a dict, a device string, or None)."""
    hf_map = getattr(pipe, "hf_device_map", None)
    if isinstance(hf_map, dict) and hf_map:
        return {str(k): str(v) for k, v in hf_map.items()}
    device = str(hf_map) if hf_map else fallback
    return {name: device for name in ("transformer", "text_encoder", "vae")}


def _synthetic_tokenizer_source(path: str | None) -> Path:
    """A folder with `tokenizer/` (e.g. a downloaded model's), else the embedded tiny model's
    (built on first use): its BPE, trained on the pipeline's prompt template, gives about the real
    Qwen tokenizer's text-token count (~220 for a short prompt and one reference)."""
    if path is not None and (Path(path) / "tokenizer").is_dir():
        return Path(path)
    from serve_app.pipeline.random_weights.tiny import ensure_tiny_model

    return ensure_tiny_model(path)
