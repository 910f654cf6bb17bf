"""Streaming previews: which steps get one, and how a preview is decoded from the latents."""

from __future__ import annotations

from typing import Any

import numpy as np


def preview_steps(total_steps: int, count: int) -> list[int]:
    """0-based step indices after which a preview is sent: up to `count`, evenly spaced.

    The last step never gets one (the final image follows it), so short runs send fewer
    previews than asked, as OpenAI allows ("the final image may be sent before the full
    number of partial images").
    """
    if count <= 0 or total_steps <= 1:
        return []
    steps = {round(total_steps * (i + 1) / (count + 1)) - 1 for i in range(count)}
    return sorted(s for s in steps if 0 <= s < total_steps - 1)


def decode_preview(pipe: Any, latents: Any, *, width: int, height: int) -> np.ndarray:
    """Decode the first image of the packed `latents` with the pipeline's VAE, as its
    final decode does, into uint8 (height, width, 3). Mid-run latents still carry noise:
    the preview shows the composition forming, which is all a preview promises."""
    import torch

    vae = pipe.vae
    # (B, tokens, C*4) -> (1, C, 1, H/8, W/8): only the first image, for speed.
    unpacked = pipe._unpack_latents(latents[:1], height, width, pipe.vae_scale_factor)
    unpacked = unpacked.to(device=vae.device, dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(unpacked)
    std = torch.tensor(vae.config.latents_std).view(shape).to(unpacked)
    decoded = vae.decode(unpacked * std + mean, return_dict=False)[0][:, :, 0]
    frame = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    return np.ascontiguousarray((frame * 255.0).round().clip(0, 255).astype(np.uint8))
