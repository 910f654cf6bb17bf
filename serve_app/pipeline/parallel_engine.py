"""One replica over several GPUs: rank 0 runs in the Serve replica, every other rank in a Ray actor
of the replica's placement group; all ranks load the same pipeline and run every edit in lockstep.

    Serve replica (rank 0, bundle 0)          RankWorker actors (ranks 1..N-1, bundles 1..N-1)
    ParallelEngine.run(job) ── job ref ──▶    RankWorker.run(job)
      EditRunner.run(job)  ◀─ NCCL/gloo ─▶      EditRunner.run(job)   (same steps, collectives)
      returns the images                        returns "ok" / "stopped" / "oom"

Each rank is a process of its own (no shared Python interpreter): the ranks join one
torch.distributed group (rank 0's node address, a free port), load in parallel, compile, and
warm up together. Rank 0's step hook decides whether to go on; `StepSync` tells every rank after
each step, so a cancelled or late edit stops on all ranks at the same step. A rank whose CFG
branch ran out of memory reports it the same way (without Ulysses), so every rank ends that edit
with the out-of-memory error and the replica keeps serving.

A rank that dies makes the replica broken (`EngineBroken`: 503 for the request, failed health
checks, and Serve replaces the replica with its whole placement group; the actors die with it).
So does a rank that ends an edit early (out of memory inside a Ulysses forward, an error) while
rank 0 is still in it: rank 0 would wait in a collective that cannot complete, so the request is
answered at once (`watch_rank0`) instead of after `model.parallel.timeout_s`. A collective that
waits longer than `timeout_s` fails the same way. Rank 0 answers as soon as its own run ends; the
other ranks' ends of an edit are read before the next one starts (`_settle`), so a rank lost after
the answer breaks the replica then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from serve_app.common.config import GenerationConfig, ModelConfig, every_id_runs_true_cfg
from serve_app.common.jobs import EditJob, EditOutput
from serve_app.engine import (
    EditStopped,
    EngineBroken,
    EngineOutOfMemory,
    MemoryRow,
    PartialSink,
    StepHook,
)
from serve_app.pipeline.parallel.plan import ParallelPlan, plan_parallel

logger = logging.getLogger("ray.serve")

# How long rank 0 may take to follow another rank that ended an edit early. Ranks that fail on
# the same tensors (an out-of-memory error of the same step) end within milliseconds of each
# other; that is rank 0's own error, answered as such. Past this, rank 0 is stuck.
EARLY_END_GRACE_S = 5.0


def watch_rank0(
    local: Future[Any],
    followers: Sequence[Any],
    *,
    wait: Callable[[list[Any], float], tuple[list[Any], list[Any]]],
    outcome: Callable[[Any], str],
    grace_s: float = EARLY_END_GRACE_S,
    poll_s: float = 0.2,
) -> str | None:
    """Wait for rank 0's run (`local`) while watching the other ranks' runs (`followers`,
    through `wait` and `outcome`: "ok", "stopped", "oom: ...", "error: ...", "dead: ...").

    Returns None as soon as rank 0 has finished (the other ranks may still be finishing theirs),
    or why it never will: a rank that ended the edit other than "ok" while rank 0 did not follow
    within `grace_s`."""
    pending = list(followers)
    while not local.done():
        if pending:
            done, pending = wait(pending, 0.0)  # a look, without waiting
            for ref in done:
                ended = outcome(ref)
                if ended == "ok":
                    continue
                wait_futures([local], timeout=grace_s)
                if not local.done():
                    return f"a rank ended the edit ({ended[:300]}) while rank 0 was still in it"
        wait_futures([local], timeout=poll_s if pending else None)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _describe_rank(rank: int, plan: ParallelPlan) -> dict[str, Any]:
    import ray

    cfg_index, ulysses_index = plan.coords(rank)
    try:
        gpus = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # outside Ray (tests of one layer)
        gpus = []
    return {
        "rank": rank,
        "node": _node_ip(),
        "node_id": _node_id(),
        "gpus": gpus,
        "device": _device_name(),
        "cfg_group": cfg_index,
        "ulysses_rank": ulysses_index,
        "pid": os.getpid(),
    }


def _node_ip() -> str:
    import ray

    try:
        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def _node_id() -> str:
    """Ray's id of this rank's node: two nodes may share an address (several raylets per host)."""
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _ray_wait(refs: list[Any], timeout_s: float) -> tuple[list[Any], list[Any]]:
    import ray

    done, pending = ray.wait(refs, num_returns=1, timeout=timeout_s)
    return list(done), list(pending)


def _ray_outcome(ref: Any) -> str:
    """A rank's run as `watch_rank0` reads it."""
    import ray
    from ray.exceptions import RayError

    try:
        outcome, error, _ = ray.get(ref)
    except RayError as exc:
        return f"dead: {type(exc).__name__}"
    return outcome if outcome in ("ok", "stopped") else f"{outcome}: {error}"


class _Rank:
    """One rank's process state: the group, then the loaded runner (shared by worker and engine)."""

    def __init__(
        self,
        model: ModelConfig,
        generation: GenerationConfig,
        *,
        plan: ParallelPlan,
        rank: int,
        master: tuple[str, int],
    ) -> None:
        self.model, self.generation, self.plan, self.rank = model, generation, plan, rank
        self.master = master
        self.runner: Any = None

    def start(self) -> dict[str, Any]:
        from serve_app.pipeline.loading.loader import load_runner
        from serve_app.pipeline.parallel.group import init_rank_group
        from serve_app.pipeline.parallel.rank import RankHooks

        t0 = time.perf_counter()
        group = init_rank_group(
            self.plan,
            rank=self.rank,
            master_addr=self.master[0],
            master_port=self.master[1],
            timeout_s=self.model.parallel.timeout_s,
        )
        self.runner = load_runner(self.model, self.generation, rank_hooks=RankHooks(group))
        description = _describe_rank(self.rank, self.plan)
        description["ready_s"] = round(time.perf_counter() - t0, 1)
        return description


class RankWorker:
    """Ranks 1..N-1 (a Ray actor; `max_concurrency=2` so `ping` answers during an edit)."""

    def __init__(
        self,
        model: ModelConfig,
        generation: GenerationConfig,
        *,
        plan: ParallelPlan,
        rank: int,
        master: tuple[str, int],
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self._rank = _Rank(model, generation, plan=plan, rank=rank, master=master)

    def start(self) -> dict[str, Any]:
        return self._rank.start()

    def run(self, job: EditJob) -> tuple[str, str, list[MemoryRow]]:
        """The same edit as rank 0, in lockstep; rank 0 owns the answer. Returns (outcome, error
        text, this rank's memory rows)."""
        outcome, error = "ok", ""
        try:
            self._rank.runner.run(job)
        except EditStopped:
            outcome = "stopped"
        except EngineOutOfMemory as exc:
            outcome, error = "oom", str(exc)
        except Exception as exc:  # the same failure as rank 0's, reported there
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
        rows = self._rank.runner.memory_report()
        return outcome, error, [(f"rank{self._rank.rank}:{gpu}", a, p) for gpu, a, p in rows]

    def ping(self) -> bool:
        return True


class ParallelEngine:
    """The `Engine` of a replica with `model.parallel.gpus` > 1 (rank 0's side)."""

    def __init__(self, model: ModelConfig, generation: GenerationConfig) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._timeout_s = model.parallel.timeout_s
        self.plan = plan_parallel(
            model.parallel.gpus,
            cfg=model.parallel.cfg,
            ulysses=model.parallel.ulysses,
            true_cfg=every_id_runs_true_cfg(model, generation),
        )
        pg = ray.util.get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < self.plan.world_size:
            have = 0 if pg is None else len(pg.bundle_specs)
            raise RuntimeError(
                f"model.parallel.gpus {self.plan.world_size} needs a placement group of"
                f" {self.plan.world_size} bundles for this replica; it has {have}. The builder"
                " (serve_app.app) sets placement_group_bundles: do not override them (or"
                " ray_actor_options.num_gpus) for the model deployment in the Serve config."
            )
        from serve_app.pipeline.loading.sources import fetch_model_files

        fetch_model_files(model)
        master = (_node_ip(), _free_port())
        worker_cls = ray.remote(RankWorker)
        # Named (qwen-rank-<group>-<rank>) so operators and tests can find a replica's ranks; not
        # detached: they die with this replica.
        group_id = uuid.uuid4().hex[:8]
        self._workers: list[Any] = []
        for rank in range(1, self.plan.world_size):
            bundle = pg.bundle_specs[rank]
            self._workers.append(
                worker_cls.options(
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    max_concurrency=2,
                    name=f"qwen-rank-{group_id}-{rank}",
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=rank
                    ),
                ).remote(model, generation, plan=self.plan, rank=rank, master=master)
            )
        logger.info(
            "parallel replica: %s; rank 0 here, %d rank actor(s); group at %s:%d",
            self.plan.describe(), len(self._workers), *master,
        )  # fmt: skip
        self._rank0 = _Rank(model, generation, plan=self.plan, rank=0, master=master)
        self.ranks = self._start([w.start.remote() for w in self._workers])
        self._runner = self._rank0.runner
        self.info = dataclasses.replace(
            self._runner.info,
            parallel={
                "gpus": self.plan.world_size,
                "cfg": self.plan.cfg,
                "ulysses": self.plan.ulysses,
                "ranks": self.ranks,
            },
        )
        self._broken: str | None = None
        self._memory: list[MemoryRow] = []
        self._lock = threading.Lock()
        # The other ranks' runs of the last edit, read before the next one starts (`_settle`).
        self._unsettled: list[Any] = []
        # Rank 0 runs each edit here, so that the calling thread can watch the other ranks.
        self._rank0_thread = ThreadPoolExecutor(1, thread_name_prefix="rank0")

    def _start(self, refs: list[Any]) -> list[dict[str, Any]]:
        """Rank 0 loads on a thread while the others' starts are watched: a rank that fails to
        start fails this replica at once, with its own error."""
        import ray

        with ThreadPoolExecutor(1, thread_name_prefix="rank0-start") as pool:
            local: Future[dict[str, Any]] = pool.submit(self._rank0.start)
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, timeout=0.5)
                for ref in done:
                    ray.get(ref)  # raises the rank's own error
                if local.done():
                    local.result()
            described = [local.result(), *ray.get(refs)]
        for row in described:
            logger.info("rank %(rank)d: node %(node)s (%(node_id).8s), GPUs %(gpus)s (%(device)s),"
                        " cfg group %(cfg_group)d, ulysses rank %(ulysses_rank)d, ready in"
                        " %(ready_s)s s", row)  # fmt: skip
        return described

    def run(
        self,
        job: EditJob,
        *,
        step_hook: StepHook | None = None,
        on_partial: PartialSink | None = None,
    ) -> EditOutput:
        import ray

        with self._lock:
            self._settle()
            if self._broken is not None:
                raise EngineBroken(self._broken)
            job_ref = ray.put(job)
            refs = [w.run.remote(job_ref) for w in self._workers]
            local = self._rank0_thread.submit(
                self._runner.run, job, step_hook=step_hook, on_partial=on_partial
            )
            stuck = watch_rank0(local, refs, wait=_ray_wait, outcome=_ray_outcome)
            if stuck is not None:
                # Rank 0's thread stays blocked until Serve replaces this replica.
                self._break(stuck, None)
            try:
                output = local.result()
            except BaseException as exc:
                self._collect(refs, failed=exc)
                raise
            # Rank 0 owns the answer: the other ranks' ends of this edit (after their own VAE
            # decode, which rank 0 does not wait for) are read before the next edit starts.
            self._unsettled = refs
            return output

    def _settle(self) -> None:
        """Read the last edit's other ranks (caller holds the lock): a rank that died or failed
        after rank 0 answered breaks the replica before the next edit, not during it."""
        refs, self._unsettled = self._unsettled, []
        if refs:
            with contextlib.suppress(EngineBroken):
                self._collect(refs)

    def _collect(self, refs: list[Any], *, failed: BaseException | None = None) -> None:
        """The other ranks' ends of this edit. Ranks fail together on the same input (a bad job,
        an OOM of the same tensors): rank 0's exception then stands and the replica keeps
        serving. A rank that died, a collective that failed, or ranks that no longer agree break
        the replica."""
        import ray
        import torch.distributed as dist
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            results = ray.get(refs, timeout=self._timeout_s)
        except (RayActorError, GetTimeoutError) as exc:
            self._break(f"a rank of this replica failed: {type(exc).__name__}: {exc}", exc)
        self._memory = [row for _, _, rows in results for row in rows]
        if isinstance(failed, dist.DistError):
            self._break(f"a collective failed: {failed}", failed)
        for outcome, error, _ in results:
            if failed is None and outcome != "ok":
                # After rank 0's last collective (e.g. its own VAE decode): the answer stands.
                logger.warning("a rank ended the edit with %s: %s", outcome, error)

    def _break(self, reason: str, cause: BaseException | None) -> None:
        self._broken = reason[:500]
        logger.error("replica broken: %s", self._broken)
        raise EngineBroken(self._broken) from cause

    def memory_report(self) -> list[MemoryRow]:
        """Rank 0's rows now, the other ranks' as of the last edit they were read for."""
        rows = [(f"rank0:{gpu}", a, p) for gpu, a, p in self._runner.memory_report()]
        return rows + self._memory

    def check_health(self) -> None:
        """Every rank answers (a dead actor fails at once; a wedged one within 10 s)."""
        import ray

        if self._broken is not None:
            raise RuntimeError(self._broken)
        ray.get([w.ping.remote() for w in self._workers], timeout=10)
