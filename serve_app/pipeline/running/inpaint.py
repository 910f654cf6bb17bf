"""Mask edits through diffusers' `QwenImageEditInpaintPipeline`, sharing the loaded modules.

The inpaint pipeline takes one image and a mask (white = repaint), blends the original image's
latents back outside the mask at every step, and always works at about 1 MP of the image's
aspect ratio (it ignores `height`/`width`: `serve_app.common.sizing.inpaint_size`); the runner
resizes its result to the requested size.
Its prompt template is the single-image one of the first Qwen-Image-Edit, whatever the variant.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def inpaint_pipeline(pipe: Any) -> Any:
    """An inpaint pipeline over `pipe`'s own modules: no weights are loaded or copied.

    Not `from_pipe`: it ends with `.to(dtype=float32)`, which would cast the shared bf16
    modules in place (doubling GPU memory) under the running pipeline's feet.
    """
    from diffusers import QwenImageEditInpaintPipeline

    components = {
        name: getattr(pipe, name)
        for name in ("scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer")
    }
    inpaint: Any = QwenImageEditInpaintPipeline(**components)
    # Keeps diffusers' placement bookkeeping (execution device, `.to` guards) as on `pipe`.
    if getattr(pipe, "hf_device_map", None) is not None:
        inpaint.hf_device_map = pipe.hf_device_map
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def mask_image(mask: np.ndarray) -> Any:
    """The job's (H, W) uint8 mask (255 = repaint) as the "L" image diffusers binarizes."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
