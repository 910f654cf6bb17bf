"""Plain data that crosses the DeploymentHandle between ingress and model.

Only numpy arrays, builtins and dataclasses: no Starlette objects, no torch, so the ingress
stays free of CUDA and Ray serializes images zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EditJob:
    """One validated edit request, ready for the pipeline."""

    request_id: str
    model: str
    images: list[np.ndarray]  # uint8, (H, W, 3), RGB
    prompt: str
    negative_prompt: str | None
    true_cfg_scale: float
    num_inference_steps: int
    width: int
    height: int
    seeds: list[int]  # one per output image; len(seeds) == n
    # Wall-clock (time.time()) deadline; the model stops denoising once it passes.
    deadline: float | None = None
    # Previews to send while denoising (streaming only), 0-3.
    partial_images: int = 0
    # uint8 (H, W) of the first image: 255 where to repaint (OpenAI's transparent pixels).
    mask: np.ndarray | None = None
    # Wall-clock time the ingress forwarded the job (for the queue-wait metric).
    submitted_at: float | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class EditOutput:
    images: list[np.ndarray]  # uint8, (height, width, 3), RGB
    width: int
    height: int
    text_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    input_images: int | None = None  # how many images the edit was given


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress must know about the loaded pipeline to validate requests."""

    served_names: list[str]
    pipeline_class: str
    max_input_images: int
    source: str  # "local", "tiny", "synthetic"
    device_map: dict[str, str] = field(default_factory=dict)
    placement_table: str = ""  # where each component / block range went (the table only)
    # What the speed switches did (quantization, compile, kernels), one sentence each.
    speed_notes: list[str] = field(default_factory=list)
    # "Qwen-Image-Edit", "Qwen-Image-Edit-2509" or "Qwen-Image-Edit-2511".
    variant: str = ""
    # A replica over several ranks: {"gpus", "cfg", "ulysses", "ranks": [{rank, node, node_id, gpus,
    # device, cfg_group, ulysses_rank, ...}]}; {} for one process.
    parallel: dict[str, Any] = field(default_factory=dict)
    # The pipeline's text tokenizer as `tokenizers` JSON (Qwen2.5-VL's, or the tiny model's), so
    # the ingress counts prompt tokens as the model does; None: the engine has none to share.
    tokenizer_json: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PartialImage:
    """A preview decoded from the latents mid-denoising (streamed before the EditOutput)."""

    index: int  # 0-based, as OpenAI's partial_image_index
    image: np.ndarray  # uint8, (height, width, 3), RGB
