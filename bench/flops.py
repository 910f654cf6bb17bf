"""FLOPs of one Qwen-Image transformer forward, and the token counts of an edit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# One 16x16-pixel patch per image token (8x VAE, 2x2 packing).
PIXELS_PER_TOKEN = 256
# The Plus pipeline resizes each reference to ~1 MP for the VAE and ~384x384 for the text encoder.
VAE_REFERENCE_PIXELS = 1024 * 1024
CONDITION_IMAGE_PIXELS = 384 * 384


def transformer_flops(config: Mapping[str, Any], *, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward over `image_tokens` (target + references)
    and `text_tokens`.

    Per dual-stream block, with S = image + text tokens and D = heads x head_dim: Q/K/V projections
    6·S·D², attention output projections 2·S·D², the 4x-wide MLPs 16·S·D² (each stream has its
    own weights, so token counts add), attention scores and weighted sum 4·S²·D. Plus the input
    projections (img_in, txt_in) and proj_out; the per-block modulation linears act on one
    timestep embedding and are left out (< 0.01 %).
    """
    d = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
    layers = int(config.get("num_layers", 60))
    in_channels = int(config.get("in_channels", 64))
    joint = int(config.get("joint_attention_dim", 3584))
    patch = int(config.get("patch_size", 2))
    out = patch * patch * int(config.get("out_channels") or in_channels // 4)
    s = image_tokens + text_tokens
    per_block = 24 * s * d * d + 4 * s * s * d
    io = 2 * image_tokens * in_channels * d + 2 * text_tokens * joint * d
    io += 2 * image_tokens * d * out
    return float(layers * per_block + io)


def image_tokens(width: int, height: int, *, references: int = 1) -> int:
    """Target tokens plus ~1 MP per reference (what the Plus pipeline feeds the transformer)."""
    return (width * height + references * VAE_REFERENCE_PIXELS) // PIXELS_PER_TOKEN


def prompt_tokens(processor: Any, prompt: str, *, references: int = 1, side: int = 384) -> int:
    """Text tokens the Plus pipeline gives the transformer for `prompt`: the chat template with one
    "Picture N:" slot per reference (each ~384x384 for the vision tower), minus the 64 template
    tokens the pipeline drops. `processor` is the pipeline's Qwen2VLProcessor."""
    from PIL import Image

    template = _template()
    images = [Image.new("RGB", (side, side)) for _ in range(references)]
    slots = "".join(
        f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(references)
    )
    inputs = processor(text=[template.format(slots + prompt)], images=images, return_tensors="pt")
    return int(inputs["input_ids"].shape[1]) - 64


def _template() -> str:
    """The Plus pipeline's prompt template (set in its __init__, so read it off an instance made
    without components)."""
    from diffusers import QwenImageEditPlusPipeline

    pipe: Any = QwenImageEditPlusPipeline.__new__(QwenImageEditPlusPipeline)
    QwenImageEditPlusPipeline.__init__(
        pipe, scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
        transformer=None,
    )  # fmt: skip
    return str(pipe.prompt_template_encode)
