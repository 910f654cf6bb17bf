"""The engine contract: what the model deployment needs of whatever runs the edits.

Plain data in and out (`EditJob` in; `PartialImage`s while denoising, then the `EditOutput`), no
torch here: the model deployment depends on this module only, and `app.build_engine` picks the
implementation (today `serve_app.pipeline`, one diffusers pipeline in the replica's process).

An engine runs one edit at a time on the calling thread. After every denoising step it calls the
step hook with (steps done, total); a returned reason ("cancelled", "deadline") makes it stop at
once with `EditStopped(reason)`: that is how cancellation and deadlines reach it. It reports
failures with the exceptions below, or an `APIError` (e.g. a 400) for a job it cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from serve_app.common.config import GenerationConfig, ModelConfig
from serve_app.common.jobs import EditJob, EditOutput, ModelInfo, PartialImage

# (steps done, total steps) -> a reason to stop, or None to go on.
StepHook = Callable[[int, int], str | None]
# Receives each preview (streaming edits with partial_images > 0), in index order.
PartialSink = Callable[[PartialImage], None]
# (GPU, bytes allocated now, peak bytes allocated) per GPU the engine uses.
MemoryRow = tuple[str, int, int]


class Engine(Protocol):
    info: ModelInfo

    def run(
        self,
        job: EditJob,
        *,
        step_hook: StepHook | None = None,
        on_partial: PartialSink | None = None,
    ) -> EditOutput: ...

    def memory_report(self) -> list[MemoryRow]: ...

    def check_health(self) -> None:
        """Raise if the engine can no longer serve (e.g. a rank of a parallel replica died)."""
        ...


# Builds the engine a config asks for (called once, in the model replica).
EngineFactory = Callable[[ModelConfig, GenerationConfig], Engine]


class EditStopped(Exception):
    """The step hook asked to stop (`reason`: "cancelled" or "deadline"); the engine is usable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EngineOutOfMemory(Exception):
    """The accelerator ran out of memory for this edit; memory was freed, the engine is usable."""


class EngineBroken(Exception):
    """An unrecoverable device error (e.g. a CUDA fault): the replica must be replaced."""
