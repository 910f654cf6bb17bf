"""The ranks' torch.distributed group: init, the (cfg, ring, ulysses) device mesh, and the per-step
stop signal.

One process per rank. CUDA tensors go over NCCL, CPU tensors over gloo ("cpu:gloo,cuda:nccl"): the
per-step stop signal and diffusers' size exchanges are small CPU messages that must not wait on
the GPU stream. On CPU-only replicas (tests) everything is gloo.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from serve_app.pipeline.parallel.plan import ParallelPlan

logger = logging.getLogger("ray.serve")

# Stop codes of the per-step broadcast; index 0 means "go on".
# The highest code any rank sends wins: "oom" is a rank's own report (see StepSync).
STOP_REASONS: tuple[str | None, ...] = (None, "cancelled", "deadline", "failed", "oom")


@dataclass
class RankGroup:
    """This process's place in the replica's ranks."""

    plan: ParallelPlan
    rank: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, dims ("cfg", "ring", "ulysses")

    @property
    def cfg_index(self) -> int:
        return self.plan.coords(self.rank)[0]

    @property
    def cfg_group(self) -> Any:
        """The ranks holding the same sequence shard of the other CFG branch (size plan.cfg)."""
        return self.mesh.get_group("cfg")

    @property
    def ulysses_mesh(self) -> Any:
        return self.mesh["ring", "ulysses"]


def init_rank_group(
    plan: ParallelPlan,
    *,
    rank: int,
    master_addr: str,
    master_port: int,
    timeout_s: float,
) -> RankGroup:
    """Join the replica's group (blocks until every rank has joined) and build the mesh."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(0)  # each rank sees exactly its own GPU (Ray sets the mask)
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    dist.init_process_group(
        backend="cpu:gloo,cuda:nccl" if on_gpu else "cpu:gloo",
        init_method=f"tcp://{_host(master_addr)}:{master_port}",
        rank=rank,
        world_size=plan.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if on_gpu else None,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device.type,
        (plan.cfg, 1, plan.ulysses),
        mesh_dim_names=("cfg", "ring", "ulysses"),
    )
    logger.info(
        "rank %d/%d joined (%s, %s): cfg group %d",
        rank, plan.world_size, plan.describe(), device, plan.coords(rank)[0],
    )  # fmt: skip
    return RankGroup(plan=plan, rank=rank, device=device, mesh=mesh)


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def leave_rank_group() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


class StepSync:
    """Every rank's stop decision after each denoising step, combined (the highest code wins), so
    that all ranks stop at the same step: a rank that stopped alone would leave the others waiting
    in the next collective. Rank 0 decides cancellations and deadlines; any rank may report that
    it ran out of memory ("oom", see `CfgSplitTransformer`). A CPU tensor, so it travels over gloo
    without waiting for the GPU."""

    def __init__(self) -> None:
        self._flag = torch.zeros(1, dtype=torch.int64)

    def share(self, reason: str | None = None) -> str | None:
        """This rank's `reason` (None: go on) in, the replica's decision out."""
        self._flag[0] = STOP_REASONS.index(reason if reason in STOP_REASONS else "failed")
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return STOP_REASONS[int(self._flag[0])]


@contextlib.contextmanager
def one_device_per_rank() -> Iterator[None]:
    """diffusers 0.42's `enable_parallelism` picks `rank % torch.accelerator.device_count()` as the
    device, which divides by zero on a CPU-only host; every rank has one device here (its own GPU,
    or the CPU), so say so while it runs."""
    if torch.cuda.is_available():
        yield
        return
    from unittest import mock

    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        yield
