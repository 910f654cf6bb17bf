"""What one rank adds to an edit: the parallel transformer, the padded prompts, the Ulysses work
size and the per-step stop signal. The runner calls these hooks; with one rank there are none."""

from __future__ import annotations

import logging
from typing import Any

from serve_app.pipeline.parallel.group import RankGroup, StepSync
from serve_app.pipeline.parallel.plan import ParallelPlanError, ulysses_work_size
from serve_app.pipeline.parallel.transformer import (
    CfgSplitTransformer,
    PromptRecorder,
    enable_ulysses,
    skip_text_padding,
)

logger = logging.getLogger("ray.serve")


class RankHooks:
    """Built once per rank process; `prepare` before the speed switches, `wrap` after."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group
        self._sync = StepSync()
        self._recorder = PromptRecorder(multiple=group.plan.ulysses, branch=group.cfg_index)
        self._split: CfgSplitTransformer | None = None

    @property
    def rank(self) -> int:
        return self.group.rank

    def prepare(self, pipe: Any) -> None:
        """Context parallelism on the loaded transformer (before quantization and compile)."""
        heads = int(pipe.transformer.config.num_attention_heads)
        if heads % self.group.plan.ulysses:
            raise ParallelPlanError(
                f"model.parallel.ulysses {self.group.plan.ulysses} must divide the transformer's"
                f" {heads} attention heads"
            )
        enable_ulysses(pipe.transformer, self.group)
        if self.group.plan.ulysses > 1:
            skip_text_padding(pipe.transformer, self._recorder)
        self._recorder.install(pipe)

    def wrap(self, pipe: Any) -> None:
        """The CFG split around the (compiled) transformer."""
        if self.group.plan.cfg > 1:
            self._split = CfgSplitTransformer(
                pipe.transformer, group=self.group, recorder=self._recorder
            )
            pipe.transformer = self._split

    def begin_edit(self, pipe: Any, *, true_cfg: bool) -> None:
        """Before each pipeline call (`pipe`: the pipeline about to run, the inpaint one too;
        `true_cfg`: it will encode a negative prompt and run both branches)."""
        self._recorder.install(pipe)
        # With the CFG split each rank needs only its own branch's text embeddings.
        self._recorder.reset(split=true_cfg and self._split is not None)
        if self._split is not None:
            self._split.reset()

    def work_size(self, width: int, height: int, *, reference_tokens: int) -> tuple[int, int]:
        return ulysses_work_size(
            width, height, extra_tokens=reference_tokens, degree=self.group.plan.ulysses
        )

    def share_stop(self, reason: str | None) -> str | None:
        """After each step: every rank learns the replica's decision (see `StepSync`); "oom"
        when this rank's CFG branch ran out of memory during the step."""
        if self._split is not None and self._split.out_of_memory:
            reason = "oom"
        return self._sync.share(reason)
