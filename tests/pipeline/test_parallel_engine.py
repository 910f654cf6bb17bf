"""`watch_rank0`: rank 0's run watched against the other ranks' (no Ray: fake refs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from serve_app.pipeline.parallel_engine import watch_rank0


class Followers:
    """Fake rank runs: each ref ends when its event is set, with the given outcome."""

    def __init__(self, **outcomes: str) -> None:
        self.outcomes = outcomes
        self.ended = {name: threading.Event() for name in outcomes}

    def wait(self, pending: list[str], timeout_s: float) -> tuple[list[str], list[str]]:
        deadline = time.monotonic() + timeout_s
        while True:
            done = [ref for ref in pending if self.ended[ref].is_set()]
            if done:
                return done[:1], [ref for ref in pending if ref != done[0]]
            if time.monotonic() >= deadline:
                return [], pending
            time.sleep(0.01)

    def outcome(self, ref: str) -> str:
        return self.outcomes[ref]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        yield executor


def _rank0(
    pool: ThreadPoolExecutor, release: threading.Event, *, fail: bool = False
) -> Future[Any]:
    def run() -> str:
        release.wait(10)
        if fail:
            raise MemoryError("rank 0 out of memory too")
        return "images"

    return pool.submit(run)


def test_rank0_finishing_first_ends_the_watch(pool: ThreadPoolExecutor) -> None:
    followers = Followers(r1="ok")
    release = threading.Event()
    local = _rank0(pool, release)
    release.set()
    assert watch_rank0(local, ["r1"], wait=followers.wait, outcome=followers.outcome) is None


def test_rank0_finishing_ends_the_watch_without_waiting_for_the_others(
    pool: ThreadPoolExecutor,
) -> None:
    # The other ranks still decode their (unused) images: rank 0 answers without them.
    followers = Followers(r1="ok")
    release = threading.Event()
    local = _rank0(pool, release)
    threading.Timer(0.05, release.set).start()
    t0 = time.monotonic()
    assert (
        watch_rank0(local, ["r1"], wait=followers.wait, outcome=followers.outcome, poll_s=5.0)
        is None
    )
    assert time.monotonic() - t0 < 1.0


def test_a_rank_ending_early_while_rank0_is_stuck_is_reported_within_the_grace(
    pool: ThreadPoolExecutor,
) -> None:
    followers = Followers(r1="ok", r2="oom: CUDA out of memory")
    release = threading.Event()  # never set: rank 0 waits in a collective forever
    local = _rank0(pool, release)
    followers.ended["r2"].set()
    t0 = time.monotonic()
    reason = watch_rank0(
        local, ["r1", "r2"], wait=followers.wait, outcome=followers.outcome, grace_s=0.3
    )
    assert reason is not None and "oom: CUDA out of memory" in reason
    assert 0.3 <= time.monotonic() - t0 < 3
    release.set()


def test_ranks_failing_together_leave_rank0s_own_error(pool: ThreadPoolExecutor) -> None:
    """The same out-of-memory step on every rank: rank 0 follows within the grace."""
    followers = Followers(r1="oom: CUDA out of memory")
    release = threading.Event()
    local = _rank0(pool, release, fail=True)
    followers.ended["r1"].set()
    threading.Timer(0.1, release.set).start()
    assert watch_rank0(local, ["r1"], wait=followers.wait, outcome=followers.outcome) is None
    with pytest.raises(MemoryError):
        local.result()


def test_ranks_that_finished_ok_first_are_no_reason_to_stop(pool: ThreadPoolExecutor) -> None:
    followers = Followers(r1="ok")
    release = threading.Event()
    local = _rank0(pool, release)
    followers.ended["r1"].set()  # e.g. rank 0 still decodes the image alone
    threading.Timer(0.3, release.set).start()
    assert (
        watch_rank0(local, ["r1"], wait=followers.wait, outcome=followers.outcome, grace_s=0.05)
        is None
    )
    assert local.result() == "images"
