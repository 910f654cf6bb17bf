"""LoRA adapters: loaded once at start, switched per request without reloading the pipeline.

Each configured LoRA becomes its own model id. All adapters stay resident in the transformer
(peft layers); a request for a LoRA activates that adapter alone at its configured scale, a
request for the base model turns LoRA off. Callers hold the runner's lock, since switching
mutates the shared transformer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve_app.common.config import LoraConfig

logger = logging.getLogger("ray.serve")

_UNKNOWN = "\x00unknown"  # never a valid model id (config names are user strings)


def _source(spec: LoraConfig) -> tuple[str, str | None]:
    """(folder, weight file name) for diffusers' loader; a file path is split into the two."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        return str(path.parent), spec.weight_name or path.name
    if path.is_dir():
        return str(path), spec.weight_name
    raise FileNotFoundError(f"LoRA {spec.name!r}: {spec.path} is neither a file nor a folder")


def load_adapters(pipe: Any, loras: Sequence[LoraConfig]) -> None:
    """Load every LoRA into the pipeline's transformer under its name; none is active after."""
    for spec in loras:
        folder, weight_name = _source(spec)
        pipe.load_lora_weights(
            folder, weight_name=weight_name, adapter_name=spec.name, local_files_only=True
        )
        logger.info("loaded LoRA %s from %s (scale %.2f)", spec.name, spec.path, spec.scale)
    if loras:
        # load_lora_weights activates the adapter just loaded; the base model is the default.
        pipe.disable_lora()


class AdapterSwitch:
    """Tracks the active adapter so repeated requests for the same model cost nothing."""

    def __init__(self, pipe: Any, loras: Sequence[LoraConfig]) -> None:
        self._pipe = pipe
        self._by_name = {spec.name: spec for spec in loras}
        # None: the base model; _UNKNOWN: a switch failed half-way, so redo the next one.
        self._active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def activate(self, model_id: str) -> None:
        """Make `model_id`'s adapter the only active one, or none for the base model."""
        if not self._by_name:
            return
        spec = self._by_name.get(model_id)
        wanted = spec.name if spec is not None else None
        if wanted == self._active:
            return
        self._active = _UNKNOWN
        # The transformer holds the adapters (the only LoRA-loadable module of these pipelines).
        # Switched on the model itself: a parallel replica wraps it (`inner`), and the
        # pipeline-level calls skip anything that is not a diffusers model.
        transformer = getattr(self._pipe.transformer, "inner", self._pipe.transformer)
        if spec is None:
            transformer.disable_lora()
        else:
            # disable_lora() leaves the layers off until enable_lora(): set_adapters alone
            # would pick the adapter but keep it disabled.
            transformer.enable_lora()
            transformer.set_adapters([spec.name], [spec.scale])
        self._active = wanted
