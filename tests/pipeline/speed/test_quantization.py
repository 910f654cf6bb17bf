"""FP8 quantization switch: which layers, device checks, config rules (CPU; the real torchao FP8
path runs in tests/gpu)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from serve_app.common.config import GenerationConfig, LoraConfig, ModelConfig
from serve_app.pipeline.loading.loader import load_runner
from serve_app.pipeline.random_weights.synthetic import build_component, variant_dir
from serve_app.pipeline.speed.quantization import (
    QuantizationError,
    check_fp8_devices,
    eight_bit_kind,
    is_fp8_target,
    is_modulation_target,
    quantize_transformer,
)
from serve_app.pipeline.speed.switches import apply_speed_switches
from tests.pipeline.random_weights.test_synthetic import SHRUNK

HOPPER = (9, 0)


@pytest.fixture(scope="module")
def transformer() -> Any:
    return build_component(
        variant_dir("2511"),
        "transformer",
        device_map={"": "cpu"},
        dtype=torch.bfloat16,
        overrides=SHRUNK["transformer"],
    )


def targets(module: Any) -> list[str]:
    return [name for name, m in module.named_modules() if is_fp8_target(m, name)]


def test_fp8_targets_are_the_block_projections_and_mlps(transformer: Any) -> None:
    names = targets(transformer)
    per_block = {n.split(".", 2)[2] for n in names}
    assert per_block == {
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
        "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    }  # fmt: skip
    assert len(names) == 12 * 2  # two blocks in the shrunk model
    # Modulation and the model's input/output projections stay in bf16.
    assert not [n for n in names if "_mod" in n or not n.startswith("transformer_blocks.")]


def test_odd_shapes_and_other_layers_are_not_targets() -> None:
    # (No LoRA adapter layer is ever left to quantize: fused and hot-swapped LoRAs are weights.)
    assert not is_fp8_target(torch.nn.Linear(64, 24), "transformer_blocks.0.attn.to_q")
    assert not is_fp8_target(torch.nn.LayerNorm(64), "transformer_blocks.0.norm")
    assert is_fp8_target(torch.nn.Linear(64, 32), "transformer_blocks.3.attn.to_q")


def test_quantize_hands_the_filter_to_the_quantizer_and_reports(transformer: Any) -> None:
    seen: list[str] = []
    seen_int8: list[str] = []

    def fake_quantize(module: Any, filter_fn: Any) -> None:
        seen.extend(n for n, m in module.named_modules() if filter_fn(m, n))

    def fake_int8(module: Any, filter_fn: Any) -> None:
        seen_int8.extend(n for n, m in module.named_modules() if filter_fn(m, n))

    report = quantize_transformer(
        transformer,
        "fp8",
        quantize=fake_quantize,
        quantize_int8=fake_int8,
        capability=lambda d: HOPPER,
        modulation=True,
    )
    assert report is not None and report.layers == 24 and report.int8_layers == 4
    assert seen == targets(transformer)
    assert seen_int8 == [
        f"transformer_blocks.{i}.{m}.1" for i in range(2) for m in ("img_mod", "txt_mod")
    ]
    assert report.bytes_before == report.bytes_after > 0  # the fakes changed nothing
    assert (
        "quantization fp8: 24 transformer linears and 4 modulation linears in int8" in report.note()
    )


def test_eight_bit_kinds_by_component_and_setting(transformer: Any) -> None:
    def kinds(component: str, module: Any, **settings: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for fqn, sub in module.named_modules():
            kind = eight_bit_kind(component, sub, fqn, **settings)
            if kind is not None:
                found[kind] = found.get(kind, 0) + 1
        return found

    assert kinds("transformer", transformer, quantization="fp8", text_encoder="resident") == {
        "fp8": 24,
        "int8": 4,
    }
    assert kinds("transformer", transformer, quantization="none", text_encoder="int8") == {}
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    assert kinds("text_encoder", encoder, quantization="fp8", text_encoder="resident") == {}
    assert kinds("text_encoder", encoder, quantization="none", text_encoder="int8") == {"int8": 2}


def test_quantize_onto_moves_and_quantizes_one_layer_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import serve_app.pipeline.speed.quantization as quantization

    calls: list[tuple[str, str]] = []

    def fake_linear(module: Any, kind: str) -> None:
        calls.append((str(module.weight.device), kind))

    monkeypatch.setattr(quantization, "quantize_linear", fake_linear)
    module = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)
    )
    done = quantization.quantize_onto(
        module, "cpu", lambda m, fqn: "int8" if isinstance(m, torch.nn.Linear) else None
    )
    assert done == 2 and calls == [("cpu", "int8"), ("cpu", "int8")]


def test_already_quantized_layers_are_no_targets() -> None:
    linear = torch.nn.Linear(64, 64)

    class Quantized(torch.Tensor):
        qdata = torch.zeros(1)

    linear.weight = torch.nn.Parameter(
        torch.zeros(64, 64).as_subclass(Quantized), requires_grad=False
    )
    assert not is_fp8_target(linear, "transformer_blocks.0.attn.to_q")
    assert not is_modulation_target(linear, "transformer_blocks.0.img_mod.1")
    assert is_modulation_target(torch.nn.Linear(64, 64), "transformer_blocks.0.img_mod.1")
    assert not is_modulation_target(
        torch.nn.Linear(64, 64), "transformer_blocks.0.img_mod.1.lora_A"
    )


def test_none_leaves_the_model_alone(transformer: Any) -> None:
    def never(module: Any, filter_fn: Any) -> None:
        raise AssertionError("must not quantize")

    assert quantize_transformer(transformer, "none", quantize=never) is None


def test_fp8_refuses_cpu_weights_and_old_gpus(transformer: Any) -> None:
    with pytest.raises(QuantizationError, match="needs the transformer on GPUs; it is on cpu"):
        quantize_transformer(transformer, "fp8", quantize=lambda m, f: None)
    with pytest.raises(QuantizationError, match="it is on cpu"):
        check_fp8_devices({torch.device("cpu")}, capability=lambda d: None)
    with pytest.raises(QuantizationError, match=r"cuda:0 has 8\.0"):
        check_fp8_devices({torch.device("cuda", 0)}, capability=lambda d: (8, 0))
    check_fp8_devices({torch.device("cuda", 0)}, capability=lambda d: (8, 9))  # Ada: fine


def test_speed_switches_quantize_before_compiling(transformer: Any) -> None:
    # The switch is wired in: CPU weights are refused before compile would have wrapped blocks.
    model = ModelConfig(source="tiny", quantization="fp8", compile=True)
    with pytest.raises(QuantizationError, match="on GPUs"):
        apply_speed_switches(transformer, model)
    assert all(b._compiled_call_impl is None for b in transformer.transformer_blocks)


def test_config_rules() -> None:
    assert ModelConfig(source="tiny").quantization == "none"
    # fp8 combines with LoRAs (fused before it, or hot-swapped beside it: pipeline/loading/lora.py).
    with_lora = ModelConfig(
        source="tiny",
        quantization="fp8",
        compile=True,
        loras=[LoraConfig(name="fast", path="/x.safetensors")],
    )
    assert with_lora.quantization == "fp8" and with_lora.loras
    with pytest.raises(ValidationError, match="needs GPUs"):
        ModelConfig(source="tiny", quantization="fp8", compile=True, device_map="cpu")
    with pytest.raises(ValidationError):
        ModelConfig(source="tiny", quantization="int4", compile=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"needs model\.compile: true"):
        ModelConfig(source="tiny", quantization="fp8")


def test_replica_without_gpus_fails_before_loading() -> None:
    cfg = ModelConfig(
        source="synthetic", synthetic_overrides=SHRUNK, quantization="fp8", compile=True
    )
    with pytest.raises(QuantizationError, match="needs GPUs; this replica sees none"):
        load_runner(cfg, GenerationConfig(), gpu_probe=lambda: [])
