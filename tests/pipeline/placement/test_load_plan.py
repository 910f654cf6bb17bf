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


# --- one card, sizes as placed (the bundled 2511 configs on the meta device) ------------------


@pytest.fixture(scope="module")
def placed() -> Any:
    """Component sizes of the full-size 2511 per (quantization, text_encoder, quantize_at_load),
    as placed."""
    from serve_app.pipeline.placement.load_plan import eight_bit_for, offloaded_for
    from serve_app.pipeline.random_weights.synthetic import synthetic_component_sizes

    cache: dict[tuple[str, str, bool], list[ComponentSize]] = {}

    def sizes(cfg: ModelConfig) -> list[ComponentSize]:
        key = (cfg.quantization, cfg.text_encoder, cfg.quantize_at_load)
        if key not in cache:
            cache[key] = synthetic_component_sizes(
                "2511", eight_bit=eight_bit_for(cfg), offloaded=offloaded_for(cfg)
            )
        return cache[key]

    return sizes


def card(gib: int, *, capability: tuple[int, int] = (8, 9)) -> list[GpuMemory]:
    """One card as a replica sees it: its size less half a GiB of CUDA context."""
    return [GpuMemory(0, f"{gib} GB", gib * GiB, int((gib - 0.5) * GiB), capability)]


def one_card(**fields: Any) -> ModelConfig:
    """A one-card config: 8-bit layers made on arrival (`quantize_at_load`, as they ship)."""
    small = {"headroom_max_pixels": 1024 * 1024} if fields.pop("small", False) else {}
    return model(compile=True, quantize_at_load=True, **small, **fields)


def test_fp8_without_quantize_at_load_plans_the_bf16_load(placed: Any) -> None:
    """fp8 quantized after loading (the 80 GB path): the card holds bf16 while loading."""
    bf16 = {c.name: c for c in placed(model())}
    later = {c.name: c for c in placed(model(compile=True, quantization="fp8"))}
    assert later["transformer"].weight_bytes == bf16["transformer"].weight_bytes


def test_fp8_counts_block_linears_in_fp8_and_modulation_in_int8(placed: Any) -> None:
    bf16 = {c.name: c for c in placed(model())}
    fp8 = {c.name: c for c in placed(one_card(quantization="fp8"))}
    # 720 block linears 25.31 -> ~12.66 GiB, 120 modulation linears ~12.66 -> ~6.33 GiB.
    saved = (bf16["transformer"].weight_bytes - fp8["transformer"].weight_bytes) / GiB
    assert 18.8 < saved < 19.1
    assert fp8["transformer"].form == "bf16+fp8+int8" and bf16["transformer"].form == "bf16"
    assert fp8["text_encoder"].weight_bytes == bf16["text_encoder"].weight_bytes
    assert fp8["transformer"].blocks is not None
    assert sum(b for _, b in fp8["transformer"].blocks) == fp8["transformer"].weight_bytes
    int8 = {c.name: c for c in placed(one_card(quantization="fp8", text_encoder="int8"))}
    assert int8["text_encoder"].form == "bf16+int8"
    assert 7.5 * GiB < int8["text_encoder"].weight_bytes < 9 * GiB
    streamed = {c.name: c for c in placed(one_card(quantization="fp8", text_encoder="offload"))}
    assert streamed["text_encoder"].streamed_bytes is not None
    assert streamed["text_encoder"].streamed_bytes < 1.1 * GiB  # the embedding, one module


def test_a_fused_lora_keeps_the_transformer_in_8_bits(placed: Any) -> None:
    """A LoRA fused as each linear loads (then quantized) leaves the one-card plan as it is:
    the transformer counted in 8 bits, the table saying so, on a 24 GB card."""
    from serve_app.pipeline.placement.load_plan import eight_bit_for, offloaded_for
    from serve_app.pipeline.random_weights.synthetic import synthetic_component_sizes

    settings = {"quantization": "fp8", "text_encoder": "offload", "small": True,
                "vae_tiling": True}  # fmt: skip
    lora = {"lora_mode": "fused", "loras": [{"name": "l4", "path": "/l4", "recipe": "lightning-4"}]}
    cfg = one_card(**settings, **lora)
    sizes = synthetic_component_sizes(
        "2511", eight_bit=eight_bit_for(cfg), offloaded=offloaded_for(cfg)
    )
    assert sizes == placed(one_card(**settings))
    transformer = {c.name: c for c in sizes}["transformer"]
    assert transformer.form == "bf16+fp8+int8"
    bf16 = {c.name: c for c in placed(model())}["transformer"]
    assert transformer.weight_bytes < bf16.weight_bytes - 18 * GiB
    plan = plan_load(cfg, sizes, card(24))
    assert plan.placement.strategy == "single" and "bf16+fp8+int8" in plan.table()


@pytest.mark.parametrize(
    ("gib", "fields", "expected"),
    [
        # bf16 (53.74 GiB): only an 80 GB card.
        (80, {}, "single"),
        (48, {}, None),
        (32, {"small": True}, None),
        (24, {"small": True}, None),
        # fp8 transformer, bf16 text encoder resident (~34.8 GiB): 48 GB up to 2 MP, not 4 MP.
        (80, {"quantization": "fp8"}, "single"),
        (48, {"quantization": "fp8"}, None),
        (48, {"quantization": "fp8", "headroom_max_pixels": 2048 * 1024}, "single"),
        (32, {"quantization": "fp8", "small": True}, None),
        # int8 text encoder (~27.6 GiB): 32 GB at 1 MP with the VAE tiled.
        (32, {"quantization": "fp8", "text_encoder": "int8", "small": True}, None),
        (
            32,
            {"quantization": "fp8", "text_encoder": "int8", "small": True, "vae_tiling": True},
            "single",
        ),
        (
            24,
            {"quantization": "fp8", "text_encoder": "int8", "small": True, "vae_tiling": True},
            None,
        ),
        # text encoder streamed from the CPU (~19.3 GiB on the card): 24 GB at 1 MP, VAE tiled.
        (24, {"quantization": "fp8", "text_encoder": "offload", "small": True}, None),
        (
            24,
            {"quantization": "fp8", "text_encoder": "offload", "small": True, "vae_tiling": True},
            "single",
        ),
    ],
)
def test_one_card_decisions(
    placed: Any, gib: int, fields: dict[str, Any], expected: str | None
) -> None:
    cfg = one_card(**fields)
    if expected is None:
        with pytest.raises(PlacementError, match=r"does not fit the replica's 1 GPU\(s\)"):
            plan_load(cfg, placed(cfg), card(gib))
        return
    plan = plan_load(cfg, placed(cfg), card(gib))
    placement = plan.placement
    assert placement.strategy == expected
    assert placement.bytes_on(0) + placement.reserved[0] <= placement.budgets[0]
    assert placement.device_map["transformer"] == 0
    if cfg.text_encoder == "offload":
        assert placement.device_map["text_encoder"] == "cpu" and placement.offload_gpu == 0
        assert "streamed to cuda:0" in plan.table()
        assert device_labels(plan)["text_encoder"] == "cpu, streamed to cuda:0"
    if cfg.quantization == "fp8":
        assert "bf16+fp8+int8" in plan.table()


def test_the_refusal_says_what_is_missing_and_what_to_change(placed: Any) -> None:
    cfg = one_card(quantization="fp8")
    with pytest.raises(PlacementError) as error:
        plan_load(cfg, placed(cfg), card(24))
    message = str(error.value)
    assert "it needs" in message and "GiB missing" in message
    assert "lower the max resolution" in message and error.value.missing_bytes > 0


def test_fp8_is_refused_plainly_on_ampere(placed: Any) -> None:
    from serve_app.pipeline.speed.quantization import QuantizationError

    cfg = one_card(quantization="fp8", text_encoder="int8", headroom_max_pixels=2048 * 1024)
    with pytest.raises(QuantizationError, match=r"not supported on cuda:0 48 GB \(8\.6\)"):
        plan_load(cfg, placed(cfg), card(48, capability=(8, 6)))
    # int8 weight-only alone needs no FP8 tensor cores.
    bf16 = one_card(text_encoder="int8", small=True, vae_tiling=True)
    with pytest.raises(PlacementError):  # but the bf16 transformer does not fit 48 GB either
        plan_load(bf16, placed(bf16), card(48, capability=(8, 6)))
    assert plan_load(bf16, placed(bf16), card(80, capability=(8, 0))).placement.strategy == (
        "single"
    )
