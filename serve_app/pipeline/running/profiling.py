"""Per-stage wall times of one pipeline call: prompt encoding, VAE encode, VAE decode.

`StageTimer.install(pipe)` wraps the pipeline's `encode_prompt`, `_encode_vae_image` and
`vae.decode` on the instance. Each wrapper synchronises the devices it used after the call, so the
time is the stage's own (these stages run once or twice per edit, outside the denoising loop, so
the synchronisation costs nothing measurable). Denoising is what remains of the pipeline time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# pipeline attribute path -> stage name
_STAGES = {
    "encode_prompt": "text_encoder",
    "_encode_vae_image": "vae_encode",
    "vae.decode": "vae_decode",
}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


class StageTimer:
    def __init__(self) -> None:
        self._totals: defaultdict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @classmethod
    def install(cls, pipe: Any) -> StageTimer:
        timer = cls()
        for path, stage in _STAGES.items():
            owner_path, _, attr = path.rpartition(".")
            owner = getattr(pipe, owner_path) if owner_path else pipe
            original = getattr(owner, attr, None)
            if original is None:
                continue
            # nn.Module.__setattr__ stores a plain callable as an instance attribute.
            object.__setattr__(owner, attr, timer._wrap(stage, original))
        return timer

    def _wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _synchronize()
                with self._lock:
                    self._totals[stage] += time.perf_counter() - t0

        return timed

    def reset(self) -> None:
        with self._lock:
            self._totals.clear()

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)
