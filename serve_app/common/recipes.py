"""Published sampling recipes for step-distilled LoRAs: scheduler config, steps and CFG.

A distilled LoRA is trained for one sampler: its few sigmas only land where the distillation put
them when the scheduler is the one it was distilled with. A `model.loras` entry names a recipe
(`recipe: lightning-4`) and gets all three; any field can still be overridden in the entry
(`scheduler`, `default_steps`, `default_true_cfg_scale`).

Pure data (no diffusers): the ingress shows it in /v1/models, the replica builds the scheduler
from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

RecipeName = Literal["lightning-4", "lightning-8"]

# Qwen-Image-Lightning's scheduler (ModelTC/Qwen-Image-Lightning, generate_with_diffusers.py):
# FlowMatchEulerDiscreteScheduler with a fixed shift of 3 ("we use shift=3 in distillation":
# base_shift = max_shift = log 3 with exponential time shifting gives mu = log 3 at every image
# size) and no terminal shift. Fields the recipe does not name take the class defaults, as in the
# recipe's own `from_config` call.
LIGHTNING_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: int
    # 1.0: no true CFG (one transformer pass per step), as the distilled LoRAs are trained.
    true_cfg_scale: float
    scheduler: dict[str, Any] = field(default_factory=dict)
    source: str = ""


_LIGHTNING_SOURCE = "lightx2v Qwen-Image-Lightning (ModelTC/Qwen-Image-Lightning)"

RECIPES: dict[str, Recipe] = {
    "lightning-4": Recipe("lightning-4", 4, 1.0, LIGHTNING_SCHEDULER, _LIGHTNING_SOURCE),
    "lightning-8": Recipe("lightning-8", 8, 1.0, LIGHTNING_SCHEDULER, _LIGHTNING_SOURCE),
}
