"""Which Qwen-Image-Edit release a model folder (or a loaded pipeline) is.

The three releases differ in what diffusers reads from their config, not in file layout:

- Qwen-Image-Edit: `QwenImageEditPipeline`, one input image, the image inline in the prompt
  template;
- Qwen-Image-Edit-2509: `QwenImageEditPlusPipeline`, several input images ("Picture N:");
- Qwen-Image-Edit-2511: the Plus pipeline with `zero_cond_t: true` in the transformer config
  (the reference-image tokens get timestep 0).

So the variant is named from `model_index.json` `_class_name` plus the transformer config, and
serving it correctly is a matter of instantiating that class from that folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EDIT = "Qwen-Image-Edit"
EDIT_2509 = "Qwen-Image-Edit-2509"
EDIT_2511 = "Qwen-Image-Edit-2511"

_EDIT_CLASS = "QwenImageEditPipeline"
_PLUS_CLASS = "QwenImageEditPlusPipeline"


@dataclass(frozen=True)
class Variant:
    name: str
    pipeline_class: str
    # None: several, capped by model.max_input_images.
    max_input_images: int | None
    zero_cond_t: bool


def variant_from_config(class_name: str, transformer_config: dict[str, Any]) -> Variant:
    zero_cond_t = bool(transformer_config.get("zero_cond_t", False))
    if class_name == _EDIT_CLASS:
        # No release pairs the single-image pipeline with zero_cond_t; report it as it is.
        return Variant(EDIT, class_name, 1, zero_cond_t)
    if class_name == _PLUS_CLASS:
        return Variant(EDIT_2511 if zero_cond_t else EDIT_2509, class_name, None, zero_cond_t)
    raise ValueError(
        f"unsupported pipeline class {class_name!r}; supported: {_EDIT_CLASS}, {_PLUS_CLASS}"
    )


def detect_variant(model_dir: str | Path) -> Variant:
    """The variant of a diffusers folder, from its config files alone (no weights read)."""
    root = Path(model_dir)
    index = json.loads((root / "model_index.json").read_text())
    transformer_config_path = root / "transformer" / "config.json"
    transformer_config = (
        json.loads(transformer_config_path.read_text()) if transformer_config_path.is_file() else {}
    )
    return variant_from_config(str(index["_class_name"]), transformer_config)


def variant_of(pipe: Any) -> Variant:
    """The variant of a loaded pipeline (what will actually run)."""
    transformer = getattr(pipe, "transformer", None)
    config = dict(getattr(transformer, "config", None) or {})
    return variant_from_config(type(pipe).__name__, config)
