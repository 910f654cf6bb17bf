"""The parallel plan (CFG x Ulysses) and the Ulysses work size: pure arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_app.pipeline.parallel.plan import (
    ParallelPlan,
    ParallelPlanError,
    padded_length,
    plan_parallel,
    ulysses_work_size,
)


@pytest.mark.parametrize(
    ("gpus", "cfg", "ulysses", "expected"),
    [
        (1, "auto", "auto", ParallelPlan(1, 1)),
        (2, "auto", "auto", ParallelPlan(2, 1)),
        (4, "auto", "auto", ParallelPlan(2, 2)),
        (8, "auto", "auto", ParallelPlan(2, 4)),
        (3, "auto", "auto", ParallelPlan(1, 3)),
        (2, 1, "auto", ParallelPlan(1, 2)),
        (4, "auto", 4, ParallelPlan(1, 4)),
        (8, 2, "auto", ParallelPlan(2, 4)),
    ],
)
def test_auto_puts_cfg_first(
    gpus: int, cfg: object, ulysses: object, expected: ParallelPlan
) -> None:
    plan = plan_parallel(gpus, cfg=cfg, ulysses=ulysses)  # type: ignore[arg-type]
    assert plan == expected
    assert plan.world_size == gpus


@pytest.mark.parametrize(
    ("gpus", "cfg", "ulysses", "expected"),
    [
        (2, "auto", "auto", ParallelPlan(1, 2)),  # every rank on the one pass of each step
        (8, "auto", "auto", ParallelPlan(1, 8)),
        (4, "auto", 2, ParallelPlan(2, 2)),  # an explicit half asks for the CFG split
        (4, 2, "auto", ParallelPlan(2, 2)),
    ],
)
def test_auto_runs_ulysses_over_every_rank_when_an_id_runs_without_true_cfg(
    gpus: int, cfg: object, ulysses: object, expected: ParallelPlan
) -> None:
    assert plan_parallel(gpus, cfg=cfg, ulysses=ulysses, true_cfg=False) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gpus", "kwargs", "message"),
    [
        (4, {"cfg": 2, "ulysses": 4}, "must equal the GPU count"),
        (3, {"cfg": 2}, "does not divide"),
        (2, {"cfg": 3}, "must be 1 or 2"),
        (0, {}, ">= 1"),
        (4, {"cfg": 1, "heads": 6}, "attention heads"),
    ],
)
def test_impossible_shapes_are_refused(gpus: int, kwargs: dict, message: str) -> None:
    with pytest.raises(ParallelPlanError, match=message):
        plan_parallel(gpus, **kwargs)


def test_coords_lay_cfg_groups_out_in_blocks() -> None:
    plan = ParallelPlan(cfg=2, ulysses=4)
    assert [plan.coords(r) for r in range(8)] == [(c, u) for c in range(2) for u in range(4)]
    assert plan.describe() == "CFG 2 x Ulysses 4 over 8 rank(s)"


@given(st.integers(1, 5000), st.integers(1, 8))
def test_padded_length_is_the_next_multiple(length: int, multiple: int) -> None:
    padded = padded_length(length, multiple)
    assert padded % multiple == 0
    assert length <= padded < length + multiple


@given(
    st.integers(16, 128).map(lambda n: n * 16),
    st.integers(16, 128).map(lambda n: n * 16),
    st.integers(0, 3).map(lambda k: 4 * k * 1024),
    st.sampled_from([1, 2, 4, 8]),
)
def test_work_size_splits_evenly_and_stays_close(
    width: int, height: int, extra: int, degree: int
) -> None:
    w, h = ulysses_work_size(width, height, extra_tokens=extra, degree=degree)
    assert w % 16 == 0 and h % 16 == 0
    assert ((w // 16) * (h // 16) + extra) % degree == 0
    assert abs(w - width) <= 4 * 16 and abs(h - height) <= 4 * 16
    if ((width // 16) * (height // 16) + extra) % degree == 0:
        assert (w, h) == (width, height)  # already even: unchanged


def test_work_size_keeps_the_aspect_ratio_when_it_can() -> None:
    # 63 x 63 patches (odd) over 2 ranks: 62 x 62 keeps the square, rather than 63 x 64.
    assert ulysses_work_size(1008, 1008, extra_tokens=4096, degree=2) == (992, 992)
