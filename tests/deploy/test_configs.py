"""Every Serve config the project ships, checked offline: serve_config.yaml (1 GPU),
deploy/configs/*.yaml (the other GPU shapes), deploy/local.yaml (make run) and the serveConfigV2
of the RayService manifests.

Each is validated with Ray's ServeDeploySchema made strict (pydantic ignores unknown keys, so a
typo would silently fall back to a default) and with our own config loader. The shape files
must equal serve_config.yaml except in the keys that make the shape, so a change to the common
part is made everywhere or fails here; and each shape's placement is planned against the cards
it is meant for, with the same planner the replica runs at start.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from serve_app.common.config import load_config
from serve_app.pipeline.placement.load_plan import eight_bit_for, offloaded_for, plan_load
from serve_app.pipeline.placement.planner import GiB, GpuMemory, PlacementError
from serve_app.pipeline.random_weights.synthetic import synthetic_component_sizes
from tests.deploy.files import (
    AUTOSCALING,
    LOCAL_CONFIG,
    MODEL_DEPLOYMENT,
    RAYSERVICE,
    README,
    ROOT,
    SERVE_CONFIG,
    SHAPE_CONFIGS,
    app,
    commented_lightning,
    deployment,
    differences,
    gpus_per_replica,
    name,
    serve_config_of,
)

GPU_CONFIGS = [SERVE_CONFIG, *SHAPE_CONFIGS]
SERVE_CONFIGS = [*GPU_CONFIGS, LOCAL_CONFIG, RAYSERVICE, AUTOSCALING]

# What a shape file may change in serve_config.yaml (dotted paths, deployments keyed by name).
_MODEL = "applications.*.args.model"
_DEP = f"applications.*.deployments.{MODEL_DEPLOYMENT}"
SHAPE_KEYS = (
    f"{_DEP}.num_replicas",
    f"{_DEP}.ray_actor_options.num_gpus",
    f"{_MODEL}.compile",
    f"{_MODEL}.compile_dynamic",
    f"{_MODEL}.compile_cpp_wrapper",
    f"{_MODEL}.parallel",
    f"{_MODEL}.parallel.*",
    f"{_MODEL}.headroom_max_pixels",
    f"{_MODEL}.headroom_ref_images",
    f"{_MODEL}.max_memory_gib",
    f"{_MODEL}.max_memory_gib.*",
    "applications.*.args.limits.max_output_pixels",
)

# What a distilled-model config may change besides (its LoRA, how it is held, and fp8 after it).
LORA_KEYS = (
    f"{_MODEL}.loras*",
    f"{_MODEL}.lora_mode",
    f"{_MODEL}.quantization",
)
# Configs that serve a distilled LoRA instead of the base model (fp8 where the card has it).
DISTILLED = {"deploy/configs/1gpu-lightning.yaml"}
# What a one-card config for a small card may change besides: 8-bit weights, where the text
# encoder lives, the VAE in tiles.
SMALL_CARD_KEYS = (
    f"{_MODEL}.quantization",
    f"{_MODEL}.quantize_at_load",
    f"{_MODEL}.text_encoder",
    f"{_MODEL}.vae_tiling",
)
# One card smaller than 80 GB: the whole model in 8 bits where it must be (fp8 needs Ada or newer).
SMALL_CARDS = {
    "deploy/configs/48gb-1gpu.yaml",
    "deploy/configs/32gb-1gpu.yaml",
    "deploy/configs/24gb-1gpu.yaml",
}

# The cards each GPU config is for (GiB per GPU), the placement the planner must choose there
# (for a replica over ranks: each rank's, on its one GPU) and the GPUs of one replica. README's
# table says the same.
CARDS: dict[str, tuple[int, str, int]] = {
    "serve_config.yaml": (80, "single", 1),
    "deploy/configs/1gpu-lightning.yaml": (80, "single", 1),
    "deploy/configs/2gpu-latency.yaml": (80, "single", 2),
    "deploy/configs/2gpu-throughput.yaml": (80, "single", 1),
    "deploy/configs/4gpu.yaml": (80, "single", 4),
    "deploy/configs/8gpu.yaml": (80, "single", 8),
    "deploy/configs/48gb-2gpu.yaml": (48, "components", 2),
    "deploy/configs/40gb-2gpu.yaml": (40, "split", 2),
    "deploy/configs/24gb-4gpu.yaml": (24, "split", 4),
    "deploy/configs/48gb-1gpu.yaml": (48, "single", 1),
    "deploy/configs/32gb-1gpu.yaml": (32, "single", 1),
    "deploy/configs/24gb-1gpu.yaml": (24, "single", 1),
}
# A card's free memory as a replica sees it: the CUDA context takes about half a GiB.
CONTEXT_GIB = 0.5


def _model_candidates(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation admits (through Optional, Union, List)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _model_candidates(arg)]


def _unknown_keys(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys pydantic would silently ignore. `args` stays out: load_config forbids extras."""
    if not isinstance(data, Mapping):
        return []
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    unknown = [f"{where}{key}" for key in data if key not in known]
    for key, value in data.items():
        if key not in fields:
            continue
        candidates = _model_candidates(fields[key].annotation)
        if len(candidates) != 1:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            suffix = f"[{i}]" if isinstance(value, list) else ""
            unknown += _unknown_keys(candidates[0], item, f"{where}{key}{suffix}.")
    return unknown


def _gpus(path: Path) -> int:
    return int(deployment(serve_config_of(path), MODEL_DEPLOYMENT)["ray_actor_options"]["num_gpus"])


# --- valid for Ray and for us ----------------------------------------------------------------


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=name)
def test_serve_config_is_valid_for_ray(path: Path) -> None:
    config = serve_config_of(path)
    ServeDeploySchema.model_validate(config)
    assert _unknown_keys(ServeDeploySchema, config) == []
    for entry in app(config)["deployments"]:
        if "autoscaling_config" in entry:
            # ServeDeploySchema takes autoscaling_config as a plain dict: check it here.
            AutoscalingConfig.model_validate(entry["autoscaling_config"])
            assert _unknown_keys(AutoscalingConfig, entry["autoscaling_config"]) == []


def test_strict_serve_check_catches_typos() -> None:
    config = copy.deepcopy(serve_config_of(SERVE_CONFIG))
    deployment(config, MODEL_DEPLOYMENT)["max_queued_request"] = 8
    deployment(config, MODEL_DEPLOYMENT)["ray_actor_options"]["num_gpu"] = 1
    assert _unknown_keys(ServeDeploySchema, config) == [
        "applications[0].deployments[0].max_queued_request",
        "applications[0].deployments[0].ray_actor_options.num_gpu",
    ]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=name)
def test_builder_accepts_the_args(path: Path) -> None:
    application = app(serve_config_of(path))
    module_name, _, attr = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr))
    load_config(application["args"], environ={})


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=name)
def test_the_proxy_waits_longer_than_the_app(path: Path) -> None:
    """Past args.request_timeout_s the app answers 504 OpenAI JSON (the ingress itself at most
    DEADLINE_GRACE_S later, should the model never answer); the proxy's own timeout (a
    plain-text 408) must come later, or clients never see the JSON."""
    from serve_app.ingress.model_client import DEADLINE_GRACE_S

    config = serve_config_of(path)
    app_timeout = load_config(app(config)["args"], environ={}).request_timeout_s
    assert config["http_options"]["request_timeout_s"] > app_timeout + DEADLINE_GRACE_S


# --- the GPU shapes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [p for p in GPU_CONFIGS if name(p) not in DISTILLED | SMALL_CARDS], ids=name
)
def test_gpu_configs_serve_bf16_by_default(path: Path) -> None:
    model = load_config(app(serve_config_of(path))["args"], environ={}).model
    assert (model.quantization, model.dtype, model.source) == ("none", "auto", "local")
    assert model.path == "Qwen/Qwen-Image-Edit-2511"
    text = path.read_text()
    if CARDS[name(path)][0] >= 80:
        # fp8 (measured on these cards) is one documented line away: the comments say what it
        # changes.
        assert "`quantization: fp8`" in text and "relative L2" in text
        fp8 = copy.deepcopy(app(serve_config_of(path))["args"])
        fp8["model"]["quantization"] = "fp8"
        assert load_config(fp8, environ={}).model.quantization == "fp8"


@pytest.mark.parametrize("path", SHAPE_CONFIGS, ids=name)
def test_shape_configs_are_serve_config_yaml_in_another_shape(path: Path) -> None:
    ours, reference = serve_config_of(path), serve_config_of(SERVE_CONFIG)
    allowed = SHAPE_KEYS + (LORA_KEYS if name(path) in DISTILLED else ())
    allowed += SMALL_CARD_KEYS if name(path) in SMALL_CARDS else ()
    unexpected = {
        d for d in differences(ours, reference) if not any(fnmatch.fnmatch(d, p) for p in allowed)
    }
    assert unexpected == set(), f"{name(path)} differs from serve_config.yaml beyond its shape"
    assert f"serve run {name(path)}" in path.read_text(), "the header says how to run it"


def test_shape_check_sees_a_changed_common_key() -> None:
    reference = serve_config_of(SERVE_CONFIG)
    changed = copy.deepcopy(reference)
    app(changed)["args"]["generation"]["default_steps"] = 40
    deployment(changed, MODEL_DEPLOYMENT)["ray_actor_options"]["num_gpus"] = 2
    found = differences(changed, reference)
    assert found == {
        "applications.qwen-image-edit.args.generation.default_steps",
        f"applications.qwen-image-edit.deployments.{MODEL_DEPLOYMENT}.ray_actor_options.num_gpus",
    }
    assert [d for d in found if not any(fnmatch.fnmatch(d, p) for p in SHAPE_KEYS)] == [
        "applications.qwen-image-edit.args.generation.default_steps"
    ]


def test_every_gpu_config_has_its_cards() -> None:
    assert set(CARDS) == {name(p) for p in GPU_CONFIGS}


def _plan(path: Path, card_gib: float, **override: Any) -> Any:
    args = copy.deepcopy(app(serve_config_of(path))["args"])
    args["model"].update(override)
    model = load_config(args, environ={}).model
    gpus = [
        GpuMemory(i, f"{card_gib} GB", int(card_gib * GiB), int((card_gib - CONTEXT_GIB) * GiB))
        for i in range(_gpus(path))
    ]
    # The weights as the replica places them (8-bit layers, a text encoder kept on the CPU).
    sizes = synthetic_component_sizes(
        "2511", dtype_bytes=2, eight_bit=eight_bit_for(model), offloaded=offloaded_for(model)
    )
    return plan_load(model, sizes, gpus)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=name)
def test_each_shape_places_the_full_model_on_its_cards(path: Path) -> None:
    """The replica's own planner, on the full-size Qwen-Image-Edit-2511 in bf16 and the free
    memory of the cards the config is for: it fits, in the documented strategy, with
    activation headroom for the largest edit the config's limits accept."""
    card_gib, strategy, gpus = CARDS[name(path)]
    plan = _plan(path, card_gib)
    assert plan.placement.strategy == strategy
    # Only a text encoder the config streams from the CPU stays there.
    model = load_config(app(serve_config_of(path))["args"], environ={}).model
    streamed = {"text_encoder"} if model.text_encoder == "offload" else set()
    assert {n for n, d in plan.placement.device_map.items() if d == "cpu"} == streamed
    assert gpus_per_replica(serve_config_of(path)) == gpus


def test_the_lightning_config_serves_the_fused_4_step_recipe_in_fp8() -> None:
    """One step to the fast model: the 2511 Lightning 4-step LoRA by its Hub id, fused, then fp8
    and compile; its id alone is served and runs the recipe's 4 steps without true CFG."""
    config = load_config(
        app(serve_config_of(ROOT / "deploy/configs/1gpu-lightning.yaml"))["args"], environ={}
    )
    model = config.model
    (lora,) = model.loras
    assert (lora.recipe, model.lora_mode, model.quantization, model.compile) == (
        "lightning-4", "fused", "fp8", True,
    )  # fmt: skip
    assert lora.path == "lightx2v/Qwen-Image-Edit-2511-Lightning"
    assert lora.weight_name and "2511-Lightning-4steps" in lora.weight_name
    assert model.model_ids == [lora.name]
    assert config.defaults_for(lora.name) == (4, 1.0)


@pytest.mark.parametrize("path", sorted(SMALL_CARDS), ids=str)
def test_small_card_configs_fit_one_card_only_as_configured(path: str) -> None:
    """Each one-card config fits its card with the limit it sets and its 8-bit / streamed
    components, the largest edit its limits accept planned for; in bf16 it would not."""
    config = load_config(app(serve_config_of(ROOT / path))["args"], environ={})
    model, limits = config.model, config.limits
    assert (model.quantization, model.compile) == ("fp8", True)
    assert model.headroom_max_pixels == limits.max_output_pixels
    assert model.headroom_ref_images is None  # planned for max_input_images references
    card_gib = CARDS[path][0]
    plan = _plan(ROOT / path, card_gib)
    assert plan.placement.device_map["transformer"] == 0
    expected = "cpu" if model.text_encoder == "offload" else 0
    assert plan.placement.device_map["text_encoder"] == expected
    assert "bf16+fp8+int8" in plan.table()
    with pytest.raises(PlacementError):
        _plan(ROOT / path, card_gib, quantization="none", text_encoder="resident")


@pytest.mark.parametrize("path", sorted(SMALL_CARDS), ids=str)
def test_small_card_configs_carry_a_ready_lightning_entry(path: str) -> None:
    """Uncommented, the Lightning lines of a one-card config give the fused 4-step model (the
    LoRA of 1gpu-lightning.yaml), still planned in 8 bits on its card."""
    snippet = commented_lightning(ROOT / path)
    assert set(snippet) == {"loras", "lora_mode"}
    args = copy.deepcopy(app(serve_config_of(ROOT / path))["args"])
    args["model"].update(snippet)
    config = load_config(args, environ={})
    (lora,) = config.model.loras
    lightning = load_config(
        app(serve_config_of(ROOT / "deploy/configs/1gpu-lightning.yaml"))["args"], environ={}
    )
    assert config.model.loras == lightning.model.loras
    assert config.model.model_ids == [lora.name]
    assert config.defaults_for(lora.name) == (4, 1.0)
    plan = _plan(ROOT / path, CARDS[path][0], **snippet)
    assert plan.placement.strategy == "single" and "bf16+fp8+int8" in plan.table()


def test_24gb_cards_need_the_1mp_limit() -> None:
    path = ROOT / "deploy/configs/24gb-4gpu.yaml"
    with pytest.raises(PlacementError):
        _plan(path, 24, headroom_max_pixels=None)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=name)
def test_replicas_over_ranks_take_one_gpu_per_rank(path: Path) -> None:
    """With model.parallel the builder gives each rank a one-GPU bundle; a replica that asked
    for more would not fit in bundle 0, and the planner would see GPUs the rank cannot use."""
    model = load_config(app(serve_config_of(path))["args"], environ={}).model
    if model.parallel.gpus > 1:
        assert _gpus(path) == 1
        assert not model.compile_cpp_wrapper  # only for host-bound steps: none here


# --- README's table --------------------------------------------------------------------------

_CONFIG_CELL = re.compile(r"^\|[^|]*\|\s*`(serve_config\.yaml|deploy/configs/[\w.-]+\.yaml)`")


def test_readme_table_lists_every_gpu_config() -> None:
    listed = [m[1] for line in README.read_text().splitlines() if (m := _CONFIG_CELL.match(line))]
    assert sorted(set(listed)) == sorted(CARDS)
    assert listed[0] == "serve_config.yaml", "the first row is the one-GPU config"
