"""Config -> load plan (`pipeline.planning`), pure: GPU tables are made up."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.common.config import ModelConfig
from serve_app.pipeline.measure import probe_gpus
from serve_app.pipeline.placement import (
    ComponentSize,
    GiB,
    GpuMemory,
    PlacementError,
    estimate_activation_headroom,
    estimate_vae_headroom,
    plan_placement,
)
from serve_app.pipeline.planning import (
    DEFAULT_HEADROOM_PIXELS,
    VAE_HEADROOM_MARGIN,
    LoadPlan,
    device_labels,
    headroom_for,
    max_memory_for,
    plan_cfg_parallel,
    plan_load,
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


def test_cfg_parallel_puts_a_copy_on_each_of_two_gpus_and_the_primary_with_the_vae() -> None:
    plan = plan_cfg_parallel(FULL, gpus(78, 78), headroom=2 * GiB, aux_headroom=3 * GiB)
    assert plan is not None and plan.uncond_device is not None
    placement = plan.placement
    primary = placement.device_map["transformer"]
    assert {primary, plan.uncond_device} == {0, 1}
    assert placement.device_map["vae"] == primary
    # Balanced: the text encoder goes with the copy, the VAE with the primary.
    assert placement.device_map["text_encoder"] == plan.uncond_device
    assert placement.bytes_on(0) + placement.bytes_on(1) == 2 * FULL[0].weight_bytes + sum(
        c.weight_bytes for c in FULL[1:]
    )
    table = plan.table()
    assert "uncond copy (cfg_parallel)" in table and "unconditional pass on cuda:" in table


def test_cfg_parallel_needs_room_for_two_copies() -> None:
    assert plan_cfg_parallel(FULL, gpus(40, 40), headroom=2 * GiB, aux_headroom=3 * GiB) is None
    cfg = model(cfg_parallel=True, headroom_max_pixels=1024 * 1024, headroom_ref_images=1)
    plan = plan_load(cfg, FULL, gpus(45, 45))
    assert plan.uncond_device is None and plan.placement.strategy == "components"
    assert any("cfg_parallel off" in n for n in plan.notes)
    assert "cfg_parallel off" in plan.table()
    one = plan_load(cfg, FULL, gpus(80))
    assert one.uncond_device is None and "needs 2 GPUs" in one.notes[0]


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
    parallel = plan_cfg_parallel(FULL, gpus(78, 78), headroom=GiB, aux_headroom=GiB)
    assert parallel is not None
    assert device_labels(parallel)["transformer_uncond"] == f"cuda:{parallel.uncond_device}"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cpu = LoadPlan(plan_placement(FULL, [], activation_headroom_bytes=0))
    assert device_labels(cpu) == {"transformer": "cpu", "text_encoder": "cpu", "vae": "cpu"}
