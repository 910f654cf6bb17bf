"""Placement planner rules, on made-up GPU memory tables (no torch needed)."""

from __future__ import annotations

import pytest

from serve_app.pipeline.placement.planner import (
    ComponentSize,
    GiB,
    GpuMemory,
    Placement,
    PlacementError,
    estimate_activation_headroom,
    estimate_vae_headroom,
    format_placement_table,
    parse_bytes,
    plan_placement,
)

HEADROOM = int(2.3 * GiB)
NUM_BLOCKS = 60


def qwen_components(*, num_blocks: int = NUM_BLOCKS) -> list[ComponentSize]:
    """Sizes close to the real bf16 ones (transformer 38.05 GiB, text encoder 15.45, VAE 0.24)."""
    head = [
        ("pos_embed", 0),
        ("time_text_embed", 20_459_520),
        ("txt_norm", 7_168),
        ("img_in", 399_360),
        ("txt_in", 22_026_240),
    ]
    blocks = [(f"transformer_blocks.{i}", 679_662_592) for i in range(num_blocks)]
    tail = [("norm_out", 37_761_024), ("proj_out", 393_344)]
    units = head + blocks + tail
    return [
        ComponentSize("transformer", sum(b for _, b in units), units),
        ComponentSize("text_encoder", 16_584_333_648, None),
        ComponentSize("vae", 253_785_062, None),
    ]


def gpus(n: int, gib: float, *, free_gib: float | None = None) -> list[GpuMemory]:
    free = gib if free_gib is None else free_gib
    return [GpuMemory(i, "GPU", int(gib * GiB), int(free * GiB)) for i in range(n)]


def plan(n: int, gib: float, **kwargs) -> Placement:
    kwargs.setdefault("activation_headroom_bytes", HEADROOM)
    return plan_placement(qwen_components(), gpus(n, gib), **kwargs)


def assert_split_is_sound(placement: Placement, components: list[ComponentSize]) -> None:
    """Every unit placed exactly once, in order, each GPU holding one contiguous range, no CPU."""
    transformer = next(c for c in components if c.name == "transformer")
    assert transformer.blocks is not None
    tmap = placement.transformer_device_map
    assert tmap is not None
    assert list(tmap) == [name for name, _ in transformer.blocks]
    devices = list(tmap.values())
    assert "cpu" not in devices and "cpu" not in placement.device_map.values()
    # Contiguous: once a GPU's range ends, that GPU never appears again; GPUs ascend.
    runs = [d for i, d in enumerate(devices) if i == 0 or d != devices[i - 1]]
    assert runs == sorted(set(runs))
    # The input layers and the first block share the main GPU; output layers sit with the last.
    assert tmap["img_in"] == tmap["transformer_blocks.0"] == placement.device_map["transformer"]
    assert tmap["proj_out"] == tmap[f"transformer_blocks.{NUM_BLOCKS - 1}"] == devices[-1]


def assert_within_budgets(placement: Placement) -> None:
    for gpu, budget in placement.budgets.items():
        assert placement.bytes_on(gpu) + placement.reserved.get(gpu, 0) <= budget


def test_no_gpus_puts_everything_on_cpu() -> None:
    placement = plan_placement(qwen_components(), [], activation_headroom_bytes=HEADROOM)
    assert placement.strategy == "single"
    assert placement.device_map == {"transformer": "cpu", "text_encoder": "cpu", "vae": "cpu"}
    assert placement.transformer_device_map is None


def test_one_80gib_gpu_holds_everything() -> None:
    placement = plan(1, 80)
    assert placement.strategy == "single"
    assert set(placement.device_map.values()) == {0}
    assert_within_budgets(placement)


def test_two_80gib_gpus_give_the_transformer_a_gpu_of_its_own() -> None:
    placement = plan(2, 80)
    assert placement.strategy == "components"
    assert placement.device_map == {"transformer": 0, "text_encoder": 1, "vae": 1}
    assert placement.transformer_device_map is None
    assert_within_budgets(placement)


def test_transformer_goes_to_the_roomiest_gpu() -> None:
    table = [GpuMemory(0, "GPU", 80 * GiB, 50 * GiB), GpuMemory(1, "GPU", 80 * GiB, 79 * GiB)]
    placement = plan_placement(qwen_components(), table, activation_headroom_bytes=HEADROOM)
    assert placement.strategy == "components"
    assert placement.device_map["transformer"] == 1
    assert placement.device_map["text_encoder"] == 0


def test_four_gpus_first_fit_decreasing_keeps_small_components_together() -> None:
    placement = plan(4, 80)
    assert placement.strategy == "components"
    assert placement.device_map == {"transformer": 0, "text_encoder": 1, "vae": 1}


@pytest.mark.parametrize("gib", [32, 40])
def test_two_mid_size_gpus_split_the_transformer(gib: int) -> None:
    placement = plan(2, gib)
    assert placement.strategy == "split"
    assert_split_is_sound(placement, qwen_components())
    assert placement.transformer_device_map is not None
    assert set(placement.transformer_device_map.values()) == {0, 1}
    assert_within_budgets(placement)


def test_two_24gib_gpus_split_a_transformer_without_the_text_encoder() -> None:
    # All three components (53.7 GiB) cannot fit 2 x 24 GiB; the transformer + VAE can.
    components = [c for c in qwen_components() if c.name != "text_encoder"]
    placement = plan_placement(components, gpus(2, 24), activation_headroom_bytes=HEADROOM)
    assert placement.strategy == "split"
    assert_split_is_sound(placement, components)
    assert_within_budgets(placement)


@pytest.mark.parametrize("n", [3, 4])
def test_several_24gib_gpus_split_everything_onto_gpus(n: int) -> None:
    placement = plan(n, 24)
    assert placement.strategy == "split"
    assert_split_is_sound(placement, qwen_components())
    assert_within_budgets(placement)


def test_max_memory_caps_force_a_split() -> None:
    placement = plan(2, 80, max_memory={0: 30 * GiB, 1: "30GiB"})
    assert placement.strategy == "split"
    assert placement.budgets == {0: 30 * GiB, 1: 30 * GiB}
    assert_split_is_sound(placement, qwen_components())
    assert_within_budgets(placement)


def test_max_memory_never_exceeds_free_memory() -> None:
    table = [GpuMemory(0, "GPU", 80 * GiB, 20 * GiB)]
    placement = plan_placement(
        [ComponentSize("transformer", GiB, None)],
        table,
        activation_headroom_bytes=GiB,
        max_memory={0: 70 * GiB},
    )
    assert placement.budgets == {0: 20 * GiB}


def test_split_leaves_equal_room_on_every_gpu() -> None:
    placement = plan(2, 40)
    room = [placement.budgets[i] - placement.bytes_on(i) - placement.reserved[i] for i in (0, 1)]
    # The text encoder's GPU gets fewer blocks; the free room differs by less than one block.
    assert abs(room[0] - room[1]) < 0.7 * GiB


def test_vae_gpu_keeps_the_larger_aux_headroom_in_a_split() -> None:
    placement = plan(2, 40, aux_headroom_bytes=4 * GiB)
    vae_gpu = int(placement.device_map["vae"])
    other = 1 - vae_gpu
    assert placement.reserved == {vae_gpu: 4 * GiB, other: HEADROOM}


def test_blocks_are_contiguous_and_placed_once_on_many_gpus() -> None:
    components = qwen_components()
    placement = plan_placement(
        components,
        gpus(8, 80),
        activation_headroom_bytes=HEADROOM,
        max_memory={i: 20 * GiB for i in range(8)},
    )
    assert placement.strategy == "split"
    assert_split_is_sound(placement, components)
    assert_within_budgets(placement)
    placed = [r for r in placement.rows if r.component == "transformer"]
    assert sum(r.bytes for r in placed) == components[0].weight_bytes


def test_too_small_raises_with_missing_gib_and_advice() -> None:
    with pytest.raises(PlacementError) as info:
        plan(2, 24)
    message = str(info.value)
    # 53.7 GiB of weights + 2.3 GiB (transformer) + 3 GiB (VAE GPU) headroom against 48 GiB.
    assert info.value.missing_bytes == pytest.approx(11.0 * GiB, abs=0.1 * GiB)
    assert "11.0 GiB missing" in message
    assert "num_gpus >= 3" in message
    assert "max resolution" in message and "CPU offload" in message


def test_component_larger_than_any_gpu_is_named() -> None:
    with pytest.raises(PlacementError, match=r"text_encoder .* must sit on one GPU"):
        plan(8, 80, max_memory={i: 10 * GiB for i in range(8)})


def test_one_small_gpu_raises() -> None:
    with pytest.raises(PlacementError, match="GiB missing"):
        plan(1, 48)


def test_too_small_with_cpu_offload_allowed_offloads() -> None:
    placement = plan(2, 24, allow_cpu_offload=True)
    assert placement.strategy == "cpu_offload"
    assert set(placement.device_map.values()) == {"cpu"}
    assert placement.offload_gpu == 0
    assert placement.sequential_offload  # the 38 GiB transformer cannot visit a 24 GiB GPU whole


def test_cpu_offload_is_model_level_when_the_largest_component_fits() -> None:
    placement = plan(1, 48, allow_cpu_offload=True)
    assert placement.strategy == "cpu_offload"
    assert not placement.sequential_offload


def test_cpu_offload_is_not_used_when_gpus_suffice() -> None:
    assert plan(2, 40, allow_cpu_offload=True).strategy == "split"


def test_unsplittable_transformer_that_does_not_fit_raises() -> None:
    components = [
        ComponentSize("transformer", 30 * GiB, None),
        ComponentSize("vae", GiB, None),
    ]
    with pytest.raises(PlacementError):
        plan_placement(components, gpus(2, 24), activation_headroom_bytes=HEADROOM)


def test_block_granularity_failure_is_reported() -> None:
    # Two 10 GiB blocks cannot share 3 x 8 GiB GPUs even though 24 >= 20.
    units = [("a", 0), ("blocks.0", 10 * GiB), ("blocks.1", 10 * GiB)]
    components = [ComponentSize("transformer", 20 * GiB, units)]
    with pytest.raises(PlacementError, match="contiguous blocks"):
        plan_placement(components, gpus(3, 12), activation_headroom_bytes=4 * GiB)


def test_max_memory_for_an_unknown_gpu_is_rejected() -> None:
    with pytest.raises(ValueError, match="not visible"):
        plan(2, 80, max_memory={5: 10 * GiB})


def test_block_sizes_must_add_up() -> None:
    bad = [ComponentSize("transformer", 10, [("a", 3), ("b", 3)])]
    with pytest.raises(ValueError, match="add up"):
        plan_placement(bad, gpus(1, 80), activation_headroom_bytes=0)


def test_table_lists_ranges_devices_and_budgets() -> None:
    text = format_placement_table(plan(2, 40))
    assert "placement strategy: split" in text
    assert "transformer_blocks.0-" in text and "cuda:0" in text and "cuda:1" in text
    assert "norm_out, proj_out" in text
    assert "headroom" in text and "budget" in text


def test_activation_headroom_estimate_matches_the_field_measurement_with_margin() -> None:
    one_ref = estimate_activation_headroom(max_pixels=1024 * 1024, num_ref_images=1)
    # Measured: ~1 GiB over the weights at 1024x1024 with one reference.
    assert 1 * GiB < one_ref < 4 * GiB
    bigger = estimate_activation_headroom(max_pixels=2048 * 2048, num_ref_images=3)
    assert bigger > one_ref
    with pytest.raises(ValueError):
        estimate_activation_headroom(max_pixels=0, num_ref_images=1)


def test_vae_headroom_estimate_covers_the_measured_peak() -> None:
    # Measured 2.45 GiB over the weights for a 1024x1024 edit with a 1 MP reference (H100, bf16).
    at_1mp = estimate_vae_headroom(max_pixels=1024 * 1024)
    assert 2.45 * GiB < at_1mp < 4 * GiB
    assert estimate_vae_headroom(max_pixels=512 * 512) == at_1mp  # the 1 MP reference dominates
    assert estimate_vae_headroom(max_pixels=2048 * 2048) == 4 * at_1mp


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30GiB", 30 * GiB),
        ("30GB", 30 * 10**9),
        ("512MiB", 512 * 2**20),
        (7, 7),
        ("1.5GiB", 3 * GiB // 2),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected
