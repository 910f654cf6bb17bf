"""Config -> load plan (`pipeline.planning`), pure: GPU tables are made up."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.common.config import ModelConfig
from serve_app.pipeline.placement.load_plan import (
    DEFAULT_HEADROOM_PIXELS,
    VAE_HEADROOM_MARGIN,
    LoadPlan,
    device_labels,
    headroom_for,
    max_memory_for,
    plan_load,
)
from serve_app.pipeline.placement.measure import probe_gpus
from serve_app.pipeline.placement.planner import (
    ComponentSize,
    GiB,
    GpuMemory,
    PlacementError,
    estimate_activation_headroom,
    estimate_vae_headroom,
    plan_placement,
)

# The full-size model's weights (bf16), from the bundled configs.
BLOCKS = [("img_in", 2**20)] + [(f"transformer_blocks.{i}", int(0.634 * GiB)) for i in range(60)]
FULL = [
    ComponentSize("transformer", sum(b for _, b in BLOCKS), BLOCKS),
    ComponentSize("text_encoder", int(15.45 * GiB)),
    ComponentSize("vae", int(0.24 * GiB)),
]


def gpus(*free_gib: float) -> list[GpuMemory]:
    return [GpuMemory(i, "fake", int(80 * GiB), int(f * GiB)) for i, f in enumerate(free_gib)]


def model(**fields: Any) -> ModelConfig:
    return ModelConfig(**{"source": "synthetic", **fields})


def test_headroom_defaults_to_the_largest_edit_the_default_limits_accept() -> None:
    cfg = model(max_input_images=3)
    assert headroom_for(cfg) == (
        estimate_activation_headroom(max_pixels=DEFAULT_HEADROOM_PIXELS, num_ref_images=3),
        estimate_vae_headroom(max_pixels=DEFAULT_HEADROOM_PIXELS) + VAE_HEADROOM_MARGIN,
    )
    small = model(headroom_max_pixels=1024 * 1024, headroom_ref_images=1)
    assert headroom_for(small)[0] < headroom_for(cfg)[0]


def test_max_memory_ignores_gpus_the_replica_does_not_see() -> None:
    cfg = model(max_memory_gib={0: 30, 1: 30.5})
    assert max_memory_for(cfg, gpus(80)) == {0: 30 * GiB}
    assert max_memory_for(cfg, gpus(80, 80)) == {0: 30 * GiB, 1: int(30.5 * GiB)}
    assert max_memory_for(model(), gpus(80)) is None


def test_probe_gpus_uses_the_injected_functions() -> None:
    table = probe_gpus(
        device_count=lambda: 2,
        mem_get_info=lambda i: ((10 + i) * GiB, 80 * GiB),
        name_of=lambda i: f"GPU{i}",
    )
    assert table == [
        GpuMemory(0, "GPU0", 80 * GiB, 10 * GiB),
        GpuMemory(1, "GPU1", 80 * GiB, 11 * GiB),
    ]


def test_the_removed_cfg_parallel_switch_names_its_replacement() -> None:
    with pytest.raises(ValueError, match=r"model.parallel: \{gpus: 2\}"):
        model(cfg_parallel=True)


def test_plan_load_respects_max_memory_and_raises_when_nothing_fits() -> None:
    cfg = model(
        max_memory_gib={0: 31, 1: 31}, headroom_max_pixels=1024 * 1024, headroom_ref_images=1
    )
    plan = plan_load(cfg, FULL, gpus(78, 78))
    assert plan.placement.strategy == "split"
    assert all(plan.placement.bytes_on(i) <= 31 * GiB for i in (0, 1))
    with pytest.raises(PlacementError, match="must sit on one GPU"):
        plan_load(model(max_memory_gib={0: 20, 1: 20}), FULL, gpus(78, 78))
    offload = plan_load(
        model(max_memory_gib={0: 20, 1: 20}, allow_cpu_offload=True), FULL, gpus(78, 78)
    )
    assert offload.placement.strategy == "cpu_offload"


def test_device_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    cfg = model(headroom_max_pixels=1024 * 1024, headroom_ref_images=1)
    split = plan_load(
        model(
            max_memory_gib={0: 31, 1: 31},
            **cfg.model_dump(include={"headroom_max_pixels", "headroom_ref_images"}),
        ),
        FULL,
        gpus(78, 78),
    )
    labels = device_labels(split)
    assert labels["transformer"] == "cuda:0,cuda:1" and labels["cuda_visible_devices"] == "2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cpu = LoadPlan(plan_placement(FULL, [], activation_headroom_bytes=0))
    assert device_labels(cpu) == {"transformer": "cpu", "text_encoder": "cpu", "vae": "cpu"}
