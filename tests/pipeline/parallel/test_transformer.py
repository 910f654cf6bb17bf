"""CFG split and Ulysses over 2 and 4 CPU ranks (gloo): each parallel shape's transformer output
matches one process's within float32 rounding, for text lengths that do not divide the degree."""

from __future__ import annotations

import functools
import socket
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from serve_app.pipeline.parallel.plan import ParallelPlan

# Each test spawns 2 or 4 gloo ranks (a fresh interpreter each, importing torch and diffusers):
# the slower suite, `make test-integration`.
pytestmark = pytest.mark.multiprocess

# A small transformer with 4 heads, so Ulysses 2 and 4 each get whole heads.
CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2,
    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}  # fmt: skip
SIDE = 4  # latent patches per side: 16 target + 16 reference tokens


def _transformer() -> Any:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**CONFIG).eval()


def _inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 2 * SIDE * SIDE, 16, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, SIDE, SIDE), (1, SIDE, SIDE)]],
        "prompt": torch.randn(1, 7, 32, generator=g),  # 7 and 5: not multiples of 2 or 4
        "negative": torch.randn(1, 5, 32, generator=g),
    }


def _step(transformer: Any, inputs: dict[str, Any], encode: Any) -> tuple[Any, Any]:
    """What the pipelines do in one true-CFG step: encode both prompts, then call the transformer
    in "cond" and "uncond" cache contexts."""
    prompt, prompt_mask = encode(inputs["prompt"])
    negative, negative_mask = encode(inputs["negative"])
    common = {k: inputs[k] for k in ("hidden_states", "timestep", "img_shapes")}
    with torch.inference_mode():
        with transformer.cache_context("cond"):
            cond = transformer(
                **common, encoder_hidden_states=prompt, encoder_hidden_states_mask=prompt_mask,
                return_dict=False,
            )[0]  # fmt: skip
        with transformer.cache_context("uncond"):
            uncond = transformer(
                **common, encoder_hidden_states=negative,
                encoder_hidden_states_mask=negative_mask, return_dict=False,
            )[0]  # fmt: skip
    return cond, uncond


def _tail(length: int, degree: int) -> bool:
    """Whether a text of `length` tokens, padded for Ulysses `degree`, has its padding in the
    last rank's share (the case the attention takes without a mask)."""
    pad = -length % degree
    return 0 < pad <= (length + pad) // degree


def _blank(pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return torch.full((1, 1, 32), float("nan"))  # NaN: any use of it would show in the output


def _rank_main(
    rank: int,
    plan: ParallelPlan,
    port: int,
    results: Any,
    *,
    split: bool = False,
    skip_padding: bool = False,
) -> None:
    """One true-CFG step on this rank; puts (rank, cond, uncond, split steps, prompts encoded,
    attentions run without the padded keys). `split`: each CFG group encodes only its own
    branch's prompt; `skip_padding`: the runner's pre-hook turns the text mask into key_padding."""
    from serve_app.pipeline.parallel import attention
    from serve_app.pipeline.parallel.group import init_rank_group, leave_rank_group
    from serve_app.pipeline.parallel.transformer import (
        CfgSplitTransformer,
        PromptRecorder,
        enable_ulysses,
        skip_text_padding,
    )

    tail_calls: list[int] = []
    op = attention.tail_padded_attention_op

    def counted(*args: Any, **kwargs: Any) -> Any:
        tail_calls.append(1)
        return op(*args, **kwargs)

    attention.tail_padded_attention_op = counted  # type: ignore[assignment]

    group = init_rank_group(plan, rank=rank, master_addr="127.0.0.1", master_port=port,
                            timeout_s=60)  # fmt: skip
    try:
        inner = _transformer()
        enable_ulysses(inner, group)
        recorder = PromptRecorder(multiple=plan.ulysses, branch=group.cfg_index, blank=_blank)
        recorder.reset(split=split)
        if skip_padding:
            skip_text_padding(inner, recorder)
        transformer = (
            CfgSplitTransformer(inner, group=group, recorder=recorder) if plan.cfg > 1 else inner
        )
        encoded: list[int] = []

        class Pipe:
            def encode_prompt(self, embeds: Any) -> tuple[Any, None]:
                encoded.append(embeds.shape[1])
                return embeds, None

        pipe = Pipe()
        recorder.install(pipe)
        cond, uncond = _step(transformer, _inputs(), pipe.encode_prompt)
        results.put(
            (
                rank,
                cond.numpy().copy(),
                uncond.numpy().copy(),
                getattr(transformer, "split_steps", 0),
                encoded,
                len(tail_calls),
            )
        )
    finally:
        leave_rank_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_ranks(target: Any, plan: ParallelPlan) -> list[Any]:
    """`target(rank, plan, port, results)` in one spawned process per rank; what they put in
    `results`, by rank. Every process must exit cleanly."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=target, args=(r, plan, port, results)) for r in range(plan.world_size)
    ]
    for p in procs:
        p.start()
    try:
        got = sorted((results.get(timeout=180) for _ in procs), key=lambda item: item[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * plan.world_size
    return got


@pytest.mark.parametrize(
    ("plan", "skip_padding"),
    [(ParallelPlan(cfg=2, ulysses=1), False), (ParallelPlan(cfg=1, ulysses=2), False),
     (ParallelPlan(cfg=2, ulysses=2), False), (ParallelPlan(cfg=1, ulysses=4), False),
     (ParallelPlan(cfg=1, ulysses=2), True), (ParallelPlan(cfg=2, ulysses=2), True),
     (ParallelPlan(cfg=1, ulysses=4), True)],
    ids=lambda v: f"cfg{v.cfg}-ulysses{v.ulysses}" if isinstance(v, ParallelPlan)
    else ("padded-keys-left-out" if v else "masked"),
)  # fmt: skip
def test_parallel_shapes_match_one_process(plan: ParallelPlan, skip_padding: bool) -> None:
    inputs = _inputs()
    ref_cond, ref_uncond = _step(_transformer(), inputs, lambda e: (e, None))
    got = _run_ranks(functools.partial(_rank_main, skip_padding=skip_padding), plan)
    for rank, cond, uncond, split_steps, encoded, tail_calls in got:
        assert split_steps == (1 if plan.cfg == 2 else 0)
        assert encoded == [7, 5]  # without `split` every rank encodes both prompts
        # 2 blocks x this rank's forwards whose padding fits the last rank's share of the text
        # (U 4: the negative prompt's 3 of 8 do not; it keeps the mask)
        lengths = [[7], [5]][plan.coords(rank)[0]] if plan.cfg == 2 else [7, 5]
        expected = 2 * sum(_tail(n, plan.ulysses) for n in lengths) if skip_padding else 0
        assert tail_calls == expected
        for out, ref in ((cond, ref_cond), (uncond, ref_uncond)):
            assert out.shape == tuple(ref.shape)
            got_t = torch.from_numpy(out)
            assert float((got_t - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize(
    "plan", [ParallelPlan(cfg=2, ulysses=1), ParallelPlan(cfg=2, ulysses=2)],
    ids=lambda p: f"cfg{p.cfg}-ulysses{p.ulysses}",
)  # fmt: skip
def test_each_cfg_group_encodes_only_its_own_prompt(plan: ParallelPlan) -> None:
    inputs = _inputs()
    ref_cond, ref_uncond = _step(_transformer(), inputs, lambda e: (e, None))
    # As the ranks run it: the padded keys left out where there is Ulysses.
    got = _run_ranks(functools.partial(_rank_main, split=True, skip_padding=True), plan)
    for rank, cond, uncond, _split_steps, encoded, tail_calls in got:
        assert tail_calls == (2 if plan.ulysses > 1 else 0)  # 7 and 5 pad by 1 for U 2
        # The prompt (7 tokens) on CFG group 0, the negative prompt (5) on group 1.
        assert encoded == ([7] if plan.coords(rank)[0] == 0 else [5])
        for out, ref in ((cond, ref_cond), (uncond, ref_uncond)):
            got_t = torch.from_numpy(out)
            assert float((got_t - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("multiple", [1, 2])  # 2: the stand-in is padded for Ulysses 2
def test_a_forward_on_a_placeholder_is_refused(multiple: int) -> None:
    """A mispredicted split (no negative prompt after all) must fail, not use the stand-in."""
    from serve_app.pipeline.parallel.transformer import CfgSplitTransformer, PromptRecorder

    recorder = PromptRecorder(multiple=multiple, branch=1, blank=_blank)
    recorder.reset(split=True)

    class Pipe:
        def encode_prompt(self, embeds: Any) -> tuple[Any, None]:
            raise AssertionError("group 1 must not encode the prompt")

    pipe = Pipe()
    recorder.install(pipe)
    placeholder, _ = pipe.encode_prompt(torch.zeros(1, 7, 32))
    assert placeholder.shape == (1, multiple, 32)
    # No negative prompt followed: the transformer gets the placeholder as its only prompt.
    group = SimpleNamespace(plan=ParallelPlan(cfg=2, ulysses=1), cfg_index=1)
    transformer = CfgSplitTransformer(_transformer(), group=group, recorder=recorder)
    common = {
        k: v for k, v in _inputs().items() if k in ("hidden_states", "timestep", "img_shapes")
    }
    with torch.inference_mode(), transformer.cache_context("cond"):
        with pytest.raises(RuntimeError, match="placeholder"):
            transformer(**common, encoder_hidden_states=placeholder, return_dict=False)
        real = torch.zeros(1, 3, 32)  # anything the rank encoded passes
        assert transformer(**common, encoder_hidden_states=real, return_dict=False)[0].shape == (
            common["hidden_states"].shape
        )


def _oom_rank_main(rank: int, plan: ParallelPlan, port: int, results: Any) -> None:
    """Rank 1's transformer runs out of memory in its (unconditional) branch; rank 0's does not."""
    from serve_app.pipeline.parallel.group import StepSync, init_rank_group, leave_rank_group
    from serve_app.pipeline.parallel.transformer import CfgSplitTransformer, PromptRecorder

    group = init_rank_group(plan, rank=rank, master_addr="127.0.0.1", master_port=port,
                            timeout_s=60)  # fmt: skip
    try:
        inner = _transformer()
        if rank == 1:

            def out_of_memory(*args: Any, **kwargs: Any) -> Any:
                raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

            inner.forward = out_of_memory
        recorder = PromptRecorder(multiple=1)
        transformer = CfgSplitTransformer(inner, group=group, recorder=recorder)

        class Pipe:
            def encode_prompt(self, embeds: Any) -> tuple[Any, None]:
                return embeds, None

        pipe = Pipe()
        recorder.install(pipe)
        cond, _ = _step(transformer, _inputs(), pipe.encode_prompt)  # returns on both ranks
        failed = transformer.out_of_memory
        decision = StepSync().share("oom" if failed else None)
        transformer.reset()
        results.put((rank, failed, transformer.out_of_memory, decision, tuple(cond.shape)))
    finally:
        leave_rank_group()


def test_a_branch_out_of_memory_on_one_rank_ends_the_step_on_both() -> None:
    # Without the zeros and the shared "oom", rank 0 would wait in the all-gather for ever.
    got = _run_ranks(_oom_rank_main, ParallelPlan(cfg=2, ulysses=1))
    shape = (1, 2 * SIDE * SIDE, 16)
    # Only rank 1 ran out; both learn "oom" at the step's end; reset clears it for the next edit.
    assert got == [(0, False, False, "oom", shape), (1, True, False, "oom", shape)]
