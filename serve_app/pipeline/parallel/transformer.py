"""The pipeline's transformer, parallel over the replica's ranks.

- `enable_ulysses`: diffusers' own context parallelism (`ContextParallelConfig(ulysses_degree=U)`
  on the ("ring", "ulysses") part of the mesh): every attention exchanges heads for tokens with an
  all-to-all, so each rank holds 1/U of the tokens. diffusers splits the text and the image streams
  evenly, so both must divide by U: `PromptRecorder` pads the text stream at its end and the
  runner denoises at a size whose image tokens divide (`plan.ulysses_work_size`). The padded
  tokens are left out of every attention: with the native backend by `TailPaddedAttnProcessor`
  (`attention.py`: no mask, the padded keys cut off after the all-to-all; `skip_text_padding`
  turns the mask into its `key_padding`), otherwise by the transformer's own
  `encoder_hidden_states_mask`. Either way the result is unchanged.
- `CfgSplitTransformer`: true CFG runs each step as two transformer calls ("cond", then "uncond")
  with the same latents. With CFG degree 2, CFG group 0 computes the conditional pass and group 1
  the unconditional one at the same time, during the "cond" call; one all-gather over the "cfg"
  mesh dimension gives every rank both results, and the "uncond" call returns the second. Group 1
  knows the negative prompt's embeddings from the start: `PromptRecorder` records what the
  pipeline's `encode_prompt` returned (the prompt first, then the negative prompt).
  Each group needs only its own branch's text embeddings: with `split` (true CFG) the recorder
  encodes the prompt on group 0 and the negative prompt on group 1 only, and hands the pipeline a
  placeholder for the other (never computed with: `CfgSplitTransformer` swaps it out, and refuses
  to run a forward on one). One text-encoder pass on each rank instead of two.
  The branches differ in size (the prompt has more text tokens than the negative one), so one group
  can run out of memory alone. Without Ulysses no collective runs inside the forward, so that rank
  still joins the all-gather (with zeros) and reports "oom" at the step's end (`StepSync`): every
  rank then ends the edit with the same out-of-memory error and the replica keeps serving, instead
  of the others waiting in the all-gather for a rank that left.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from serve_app.pipeline.parallel.attention import (
    install_tail_padding,
    padding_marker,
    uses_native_attention,
)
from serve_app.pipeline.parallel.group import RankGroup, one_device_per_rank
from serve_app.pipeline.parallel.plan import padded_length

logger = logging.getLogger("ray.serve")

# The transformer call's arguments that differ between the CFG branches.
_BRANCH_KEYS = ("encoder_hidden_states", "encoder_hidden_states_mask")


def enable_ulysses(transformer: Any, group: RankGroup) -> None:
    """diffusers' Ulysses context parallelism over `group`'s ("ring", "ulysses") mesh."""
    if group.plan.ulysses <= 1:
        return
    from diffusers import ContextParallelConfig

    install_tail_padding(transformer)  # first: enable_parallelism configures the processors
    config = ContextParallelConfig(ulysses_degree=group.plan.ulysses, mesh=group.ulysses_mesh)
    with one_device_per_rank():
        transformer.enable_parallelism(config=config)


def skip_text_padding(transformer: Any, recorder: PromptRecorder) -> None:
    """A forward pre-hook on `transformer`: where the text mask it is given only hides the end
    padding `recorder` added, and the attention is native, the call gets `key_padding` instead
    of the mask (`attention.py`), so no attention is masked."""
    native: list[bool] = []  # known at the first forward, after the speed switches

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        mask = kwargs.get("encoder_hidden_states_mask")
        pad = recorder.tail_padding(mask)
        # The padding must lie in the last rank's share of the text: then, after the all-to-all,
        # it ends the sequence. (Only a text shorter than U x (U - 1) tokens has more.)
        if not pad or mask is None or pad > mask.shape[1] // recorder.multiple:
            return None
        if not native:
            native.append(uses_native_attention(module))
        if not native[0]:
            return None
        extra = dict(kwargs.get("attention_kwargs") or {})
        extra["key_padding"] = padding_marker(pad, mask.device)
        return args, {**kwargs, "encoder_hidden_states_mask": None, "attention_kwargs": extra}

    transformer.register_forward_pre_hook(hook, with_kwargs=True)


BlankPrompt = Callable[[Any, tuple[Any, ...], dict[str, Any]], torch.Tensor]


def blank_prompt(pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A one-token stand-in for the embeddings `pipe.encode_prompt(*args, **kwargs)` would
    return: their batch, width, dtype and device (the pipeline reads the dtype)."""
    prompt = kwargs.get("prompt")
    batch = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
    batch *= int(kwargs.get("num_images_per_prompt") or 1)
    width = int(pipe.transformer.config.joint_attention_dim)
    device = kwargs.get("device") or pipe._execution_device
    return torch.zeros(batch, 1, width, dtype=pipe.text_encoder.dtype, device=device)


class PromptRecorder:
    """Wraps a pipeline's `encode_prompt`: pads what it returns to a multiple of the Ulysses degree
    (masked tokens) and keeps it, so the CFG split knows both branches' embeddings. With `split`
    (see `reset`) it encodes only this rank's branch (`branch`: 0 the prompt, 1 the negative)."""

    def __init__(
        self, *, multiple: int, branch: int = 0, blank: BlankPrompt = blank_prompt
    ) -> None:
        self.multiple = multiple
        self.branch = branch
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # id(a padded mask) -> how many padded tokens end it (masks of this edit, kept in calls)
        self._tail_pads: dict[int, int] = {}
        self.placeholders: list[torch.Tensor] = []  # what this rank did not encode, this edit
        self._split = False
        self._blank = blank
        self._pipes: list[Any] = []  # installed on (the main pipeline, the inpaint one)

    def install(self, pipe: Any) -> None:
        if any(p is pipe for p in self._pipes):
            return
        self._pipes.append(pipe)
        original: Callable[..., Any] = pipe.encode_prompt

        def encode_prompt(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
            index = len(self.calls)  # 0: the prompt, 1: the negative prompt
            mask: torch.Tensor | None
            skip = self._split and index < 2 and index != self.branch
            if skip:
                embeds, mask = self._blank(pipe, args, kwargs), None
            else:
                embeds, mask = original(*args, **kwargs)
            unpadded, unmasked = embeds.shape[1], mask is None
            embeds, mask = pad_text(embeds, mask, multiple=self.multiple)
            if unmasked and mask is not None:  # only the padding is masked: it ends the text
                self._tail_pads[id(mask)] = embeds.shape[1] - unpadded
            if skip:
                self.placeholders.append(embeds)  # as padded: what the pipeline passes on
            self.calls.append((embeds, mask))
            return embeds, mask

        pipe.encode_prompt = encode_prompt

    def reset(self, *, split: bool = False) -> None:
        """Before each edit. `split`: the edit runs true CFG (the pipeline will encode the prompt,
        then the negative prompt), so this rank encodes its own branch's only."""
        self.calls.clear()
        self.placeholders.clear()
        self._tail_pads.clear()
        self._split = split

    def check_real(self, embeds: Any) -> None:
        """Refuse to compute with a placeholder (a wrong `split` would otherwise give a wrong
        image silently)."""
        if self.placeholders and any(embeds is p for p in self.placeholders):
            raise RuntimeError(
                "internal error: a CFG branch ran on the placeholder of a prompt this rank did"
                " not encode (the edit's true CFG was mispredicted)"
            )

    def tail_padding(self, mask: torch.Tensor | None) -> int:
        """How many padded tokens end the text that `mask` (one this recorder returned this edit)
        hides, where it hides nothing else; 0 otherwise."""
        return 0 if mask is None else self._tail_pads.get(id(mask), 0)

    @property
    def negative(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The negative prompt's (embeddings, mask), once the pipeline has encoded it."""
        return self.calls[1] if len(self.calls) >= 2 else None


def pad_text(
    embeds: torch.Tensor, mask: torch.Tensor | None, *, multiple: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings padded with zero tokens to a multiple of `multiple`, and the mask that
    hides them (None, as the pipelines pass it, when nothing is padded and nothing masked)."""
    batch, length = embeds.shape[:2]
    target = padded_length(length, multiple)
    if target == length:
        return embeds, mask
    pad = target - length
    embeds = torch.cat([embeds, embeds.new_zeros(batch, pad, *embeds.shape[2:])], dim=1)
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    mask = torch.cat([mask, mask.new_zeros(batch, pad)], dim=1)
    return embeds, mask


class CfgSplitTransformer(nn.Module):
    """`pipe.transformer` with the two CFG branches on two rank groups (see the module docstring).
    Edits without true CFG (one call per step) run the conditional pass on every group."""

    def __init__(self, inner: Any, *, group: RankGroup, recorder: PromptRecorder) -> None:
        super().__init__()
        if group.plan.cfg != 2:
            raise ValueError(f"the CFG split needs a CFG degree of 2, not {group.plan.cfg}")
        self.inner = inner
        self._group = group
        self._recorder = recorder
        self._context: str | None = None
        self._uncond: tuple[torch.Tensor, Any] | None = None  # (result, the negative embeddings)
        self.split_steps = 0  # CFG steps computed split (both branches at once)
        self.out_of_memory = False  # this rank's forward ran out of memory in the current edit
        self._out_dtype: torch.dtype | None = None

    # What the pipelines read off their transformer.
    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def reset(self) -> None:
        """Forget the last edit's state (before each pipeline call)."""
        self._uncond = None
        self.out_of_memory = False

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        previous, self._context = self._context, name
        try:
            with self.inner.cache_context(name):
                yield
        finally:
            self._context = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        negative = self._recorder.negative
        if self._context == "uncond" and self._uncond is not None:
            result, embeds = self._uncond
            self._uncond = None
            if kwargs.get("encoder_hidden_states") is embeds:
                return (result,) if not kwargs.get("return_dict", True) else _output(result)
        if self._context != "cond" or negative is None or args:
            if args:
                return self.inner(*args, **kwargs)
            self._recorder.check_real(kwargs.get("encoder_hidden_states"))
            sample = self._inner_sample(kwargs)
            return (sample,) if not kwargs.get("return_dict", True) else _output(sample)
        branch = dict(kwargs)
        if self._group.cfg_index == 1:
            branch.update(zip(_BRANCH_KEYS, negative, strict=True))
        self._recorder.check_real(branch.get("encoder_hidden_states"))
        mine = self._inner_sample(branch).contiguous()
        both = [torch.empty_like(mine) for _ in range(self._group.plan.cfg)]
        dist.all_gather(both, mine, group=self._group.cfg_group)
        self._uncond = (both[1], negative[0])
        self.split_steps += 1
        cond = both[0]
        return (cond,) if not kwargs.get("return_dict", True) else _output(cond)

    def _inner_sample(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The inner transformer's output sample; when this rank runs out of memory (and no
        collective runs inside the forward, i.e. no Ulysses), zeros of the same shape instead and
        `out_of_memory` set: the step's end tells every rank (see the module docstring)."""
        call = {**kwargs, "return_dict": False}
        if self._group.plan.ulysses > 1:
            return self.inner(**call)[0]  # its peers wait inside the forward: cannot be covered
        try:
            sample: torch.Tensor = self.inner(**call)[0]
        except torch.OutOfMemoryError as exc:
            logger.warning("this rank ran out of memory in its CFG branch: %s", str(exc)[:200])
            self.out_of_memory = True
        else:
            self._out_dtype = sample.dtype
            return sample
        # Past the except block the failed forward's activations are released; the runner frees
        # the cache when every rank ends the edit at this step's end. The pipelines' transformer
        # maps latent tokens to latent tokens: same shape out.
        hidden = kwargs["hidden_states"]
        return torch.zeros(
            hidden.shape, dtype=self._out_dtype or hidden.dtype, device=hidden.device
        )


def _output(sample: torch.Tensor) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
