"""Per-model-id schedulers: a LoRA with a recipe (or its own `scheduler` fields) steps through
its own sigmas; every other id keeps the model folder's scheduler.

Schedulers are stateful (timesteps, step index), so each id gets its own instance, built once at
load; `activate` puts it on the pipelines under the runner's lock, like the LoRA switch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from serve_app.common.config import LoraConfig
from serve_app.common.recipes import SCHEDULER_CLASS

logger = logging.getLogger("ray.serve")


class SchedulerSwitch:
    def __init__(self, pipe: Any, loras: Sequence[LoraConfig]) -> None:
        self._base = pipe.scheduler
        self._by_id: dict[str, Any] = {}
        for spec in loras:
            if (config := spec.scheduler_config) is not None:
                self._by_id[spec.name] = build_scheduler(
                    self._base, config, whole=bool(spec.recipe)
                )
                logger.info("model %s: scheduler %s", spec.name, describe(self._by_id[spec.name]))

    def for_model(self, model_id: str) -> Any:
        return self._by_id.get(model_id, self._base)

    def activate(self, model_id: str, pipes: Sequence[Any]) -> None:
        """Put `model_id`'s scheduler on each of `pipes` (the edit and inpaint pipelines share
        one, as they share the other modules)."""
        scheduler = self.for_model(model_id)
        for pipe in pipes:
            if pipe.scheduler is not scheduler:
                pipe.scheduler = scheduler


def build_scheduler(base: Any, config: dict[str, Any], *, whole: bool) -> Any:
    """A recipe's scheduler from its whole config (`whole`: as the recipe itself builds it, the
    class defaults for fields it does not name), or the model's own with `config` over it."""
    import diffusers

    cls = getattr(diffusers, SCHEDULER_CLASS) if whole else type(base)
    return cls.from_config(config if whole else {**dict(base.config), **config})


def describe(scheduler: Any) -> str:
    """The fields that decide the sigmas, for logs and /ready."""
    keys = ("base_shift", "max_shift", "shift", "shift_terminal", "time_shift_type")
    fields = ", ".join(f"{k}={scheduler.config.get(k)!r}" for k in keys if k in scheduler.config)
    return f"{type(scheduler).__name__}({fields})"
