"""Bundled full-size configs, meta-device sizes, and the synthetic build path on SHRUNK models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.pipeline.placement.measure import (
    build_empty_component,
    component_class,
    component_sizes_from_configs,
)
from serve_app.pipeline.placement.planner import ComponentSize, GiB, GpuMemory, plan_placement
from serve_app.pipeline.random_weights.synthetic import (
    MODEL_COMPONENTS,
    QWEN_SPECIAL_TOKENS,
    SYNTHETIC_VARIANTS,
    build_component,
    build_synthetic_pipeline,
    byte_level_tokenizer,
    component_device_map,
    load_tokenizer_and_processor,
    special_token_ids,
    synthetic_component_sizes,
    variant_dir,
)

# Small enough for a 2-step CPU edit in a few seconds, keeping every cross-component constraint:
# transformer head dim = sum(axes_dims_rope); joint_attention_dim = text hidden = vision
# out_hidden; text mrope_section sums to text head_dim / 2; VAE z_dim 16 (in_channels 64 = 4 x 16).
SHRUNK: dict[str, dict[str, Any]] = {
    "transformer": {
        "num_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "axes_dims_rope": [8, 12, 12],
        "joint_attention_dim": 64,
    },
    "text_encoder": {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
    },
    "vae": {"base_dim": 2, "num_res_blocks": 1},
}


@pytest.fixture(scope="module")
def full_sizes() -> dict[str, ComponentSize]:
    return {c.name: c for c in synthetic_component_sizes("2509")}


def params(component: ComponentSize) -> float:
    return component.weight_bytes / 2  # bf16


def test_full_size_transformer_is_20_4b_params_38_gib(full_sizes: dict[str, ComponentSize]) -> None:
    transformer = full_sizes["transformer"]
    assert params(transformer) == pytest.approx(20.43e9, rel=0.002)
    assert transformer.weight_bytes / GiB == pytest.approx(38.05, abs=0.05)


def test_full_size_transformer_units_cover_it_in_forward_order(
    full_sizes: dict[str, ComponentSize],
) -> None:
    units = full_sizes["transformer"].blocks
    assert units is not None
    names = [n for n, _ in units]
    assert names[:5] == ["pos_embed", "time_text_embed", "txt_norm", "img_in", "txt_in"]
    assert names[5:65] == [f"transformer_blocks.{i}" for i in range(60)]
    assert names[65:] == ["norm_out", "proj_out"]
    assert sum(b for _, b in units) == full_sizes["transformer"].weight_bytes
    assert len({b for n, b in units if n.startswith("transformer_blocks.")}) == 1


def test_full_size_text_encoder_and_vae(full_sizes: dict[str, ComponentSize]) -> None:
    assert params(full_sizes["text_encoder"]) == pytest.approx(8.29e9, rel=0.002)
    assert full_sizes["text_encoder"].weight_bytes / GiB == pytest.approx(15.45, abs=0.05)
    assert full_sizes["text_encoder"].blocks is None
    assert params(full_sizes["vae"]) == pytest.approx(0.127e9, rel=0.01)


def test_sizes_scale_with_dtype_bytes() -> None:
    (fp32,) = component_sizes_from_configs(
        variant_dir("2511"), names=("transformer",), dtype_bytes=4
    )
    assert fp32.weight_bytes / GiB == pytest.approx(76.1, abs=0.1)


@pytest.mark.parametrize("variant", SYNTHETIC_VARIANTS)
def test_configs_load_into_the_real_classes(variant: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig

    folder = variant_dir(variant)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert component_class(folder, "transformer").__name__ == "QwenImageTransformer2DModel"
    assert component_class(folder, "vae").__name__ == "AutoencoderKLQwenImage"
    assert component_class(folder, "text_encoder").__name__ == "Qwen2_5_VLForConditionalGeneration"

    config = Qwen2_5_VLConfig.from_pretrained(folder / "text_encoder")
    text: Any = config.text_config
    vision: Any = config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.intermediate_size) == (32, 1280, 3420)
    assert (vision.num_heads, vision.out_hidden_size, vision.patch_size) == (16, 3584, 14)
    assert (vision.spatial_merge_size, vision.window_size) == (2, 112)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    assert not config.tie_word_embeddings

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_image_seq_len == 8192

    vae: Any = build_empty_component(folder, "vae")
    assert 2 ** len(vae.temperal_downsample) == 8 and vae.config.z_dim == 16


def test_only_2511_has_zero_cond_t() -> None:
    configs = {
        v: json.loads((variant_dir(v) / "transformer" / "config.json").read_text())
        for v in SYNTHETIC_VARIANTS
    }
    assert configs["2511"]["zero_cond_t"] is True
    assert not configs["2509"].get("zero_cond_t", False)
    assert build_empty_component(variant_dir("2511"), "transformer").zero_cond_t
    assert {k: v for k, v in configs["2511"].items() if k != "zero_cond_t"} == configs["2509"]


def test_split_device_map_covers_every_full_size_parameter(
    full_sizes: dict[str, ComponentSize],
) -> None:
    from accelerate.utils import check_device_map

    gpus = [GpuMemory(i, "GPU", 40 * GiB, 40 * GiB) for i in range(2)]
    placement = plan_placement(list(full_sizes.values()), gpus, activation_headroom_bytes=2 * GiB)
    assert placement.strategy == "split"
    transformer = build_empty_component(variant_dir("2509"), "transformer")
    check_device_map(transformer, component_device_map(placement, "transformer"))
    assert component_device_map(placement, "vae") == {"": placement.device_map["vae"]}


def test_byte_level_tokenizer_has_the_qwen_special_tokens() -> None:
    tokenizer = byte_level_tokenizer()
    ids = special_token_ids(tokenizer)
    assert set(ids.values()) <= set(range(256, 256 + len(QWEN_SPECIAL_TOKENS)))
    text = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it ünïcode 🎨"
    encoded = tokenizer(text)["input_ids"]
    assert ids["image_token_id"] in encoded and max(encoded) < 152064
    assert tokenizer.decode(encoded) == text


def test_tokenizer_folder_is_used(tmp_path: Path) -> None:
    byte_level_tokenizer().save_pretrained(tmp_path / "tokenizer")
    vision = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    tokenizer, processor = load_tokenizer_and_processor(tmp_path, vision_config=vision)
    assert special_token_ids(tokenizer) == special_token_ids(byte_level_tokenizer())
    assert processor.image_processor.patch_size == 14
    assert processor.image_processor.merge_size == 2


def test_tokenizer_without_special_tokens_is_rejected(tmp_path: Path) -> None:
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    Qwen2TokenizerFast(vocab={"a": 0}, merges=[]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="special tokens"):
        load_tokenizer_and_processor(tmp_path, vision_config={})


def test_random_weights_are_small_normals_with_unit_norms() -> None:
    module = build_component(
        variant_dir("2509"),
        "transformer",
        device_map={"": "cpu"},
        dtype=torch.bfloat16,
        overrides=SHRUNK["transformer"],
    )
    tensors = dict(module.named_parameters())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors.values())
    assert not any(t.requires_grad for t in tensors.values())
    weight = tensors["transformer_blocks.0.img_mlp.net.0.proj.weight"].float()
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(tensors["transformer_blocks.0.attn.norm_q.weight"] == 1)
    assert torch.all(tensors["transformer_blocks.0.img_mlp.net.0.proj.bias"] == 0)


def test_split_map_with_hooks_matches_the_plain_build() -> None:
    """The split path (accelerate hooks per module range) on CPU: same seed, same output."""
    overrides = SHRUNK["transformer"]
    sizes = synthetic_component_sizes("2511", overrides={"transformer": overrides})
    units = [name for name, _ in sizes[0].blocks or []]
    split_map = {name: "cpu" for name in units}
    common: dict[str, Any] = {"dtype": torch.float32, "overrides": overrides, "seed": 3}
    plain = build_component(variant_dir("2511"), "transformer", device_map={"": "cpu"}, **common)
    hooked = build_component(
        variant_dir("2511"), "transformer", device_map=split_map, add_hooks=True, **common
    )
    assert hasattr(hooked, "_hf_hook") and not hasattr(plain, "_hf_hook")
    inputs = {
        "hidden_states": torch.randn(1, 2 * 16, 64),
        "encoder_hidden_states": torch.randn(1, 5, 64),
        "encoder_hidden_states_mask": torch.ones(1, 5),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 4, 4), (1, 4, 4)]],
        "return_dict": False,
    }
    with torch.no_grad():
        expected, actual = plain(**inputs)[0], hooked(**inputs)[0]
    assert expected.shape == (1, 32, 64)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected)


def test_shrunk_pipeline_assembles_and_edits_on_cpu() -> None:
    sizes = synthetic_component_sizes("2511", overrides=SHRUNK)
    placement = plan_placement(sizes, [], activation_headroom_bytes=0)
    pipe: Any = build_synthetic_pipeline(
        "2511",
        placement=placement,
        dtype=torch.float32,
        tokenizer_source=None,
        overrides=SHRUNK,
    )
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    assert pipe.transformer.config.zero_cond_t
    assert pipe.transformer.config.num_layers == 2
    ids = special_token_ids(pipe.tokenizer)
    for field, token_id in ids.items():
        assert getattr(pipe.text_encoder.config, field) == token_id
    assert {m.device.type for m in (pipe.transformer, pipe.text_encoder, pipe.vae)} == {"cpu"}

    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), "uint8"))
    out = pipe(
        image=[reference],
        prompt="make it red",  # no negative prompt: one transformer pass per step keeps it quick
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()


def test_model_components_are_the_sized_ones() -> None:
    assert MODEL_COMPONENTS == ("transformer", "text_encoder", "vae")


def test_each_module_is_handed_on_once_its_weights_exist_with_the_same_values() -> None:
    """`then` (the small-card loader quantizes or moves a layer there) sees every module right
    after its own parameters are made, and the weights equal those of a build without it."""
    seen: list[str] = []

    def then(module: torch.nn.Module, name: str) -> None:
        assert all(p.device.type == "cpu" for p in module.parameters(recurse=False))
        seen.append(name)

    def build(**extra: Any) -> torch.nn.Module:
        return build_component(
            variant_dir("2511"),
            "transformer",
            device_map={"": "cpu"},
            dtype=torch.float32,
            overrides=SHRUNK["transformer"],
            **extra,
        )

    plain, handed = build(), build(then=then)
    assert seen == [name for name, _ in handed.named_modules()]
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), handed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_streamed_text_encoder_is_made_on_its_gpu_then_moved_to_the_cpu() -> None:
    from serve_app.pipeline.placement.planner import GpuMemory
    from serve_app.pipeline.random_weights.synthetic import _staging

    sizes = synthetic_component_sizes("2511", overrides=SHRUNK)
    streamed = [
        ComponentSize(c.name, c.weight_bytes, c.blocks, streamed_bytes=1)
        if c.name == "text_encoder"
        else c
        for c in sizes
    ]
    placement = plan_placement(
        streamed, [GpuMemory(0, "fake", 80 * GiB, 80 * GiB)], activation_headroom_bytes=0
    )
    assert placement.device_map["text_encoder"] == "cpu" and placement.offload_gpu == 0
    device_map, then = _staging(placement, "text_encoder", None)
    assert device_map == {"": 0} and then is not None
    assert _staging(placement, "vae", None) == ({"": 0}, None)
