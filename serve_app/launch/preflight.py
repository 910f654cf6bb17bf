"""Checks the launcher runs before it starts Ray: is the port free, do the replicas fit?

Both failures are otherwise silent or late: a taken port makes Serve's proxy fail after Ray is
up, and a replica that asks for more GPUs (or CPUs) than the machine has waits forever as
PENDING. Here they are reported in about a second, with the numbers.
"""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Serve's defaults (ray.serve.schema.HTTPOptionsSchema) for a config without http_options.
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
_ALL_INTERFACES = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Demand:
    """What one deployment asks for at start: replicas x (CPUs, GPUs) per replica."""

    name: str
    replicas: int
    cpus: float  # per replica; 0 when the config leaves it to the code's defaults
    gpus: float  # per replica, summed over placement_group_bundles when those are set

    def describe(self, resource: str) -> str:
        per = self.gpus if resource == "GPU" else self.cpus
        return f"{self.name}: {self.replicas} replica(s) x {_num(per)} {resource}"


def http_address(config: Mapping[str, Any]) -> tuple[str, int]:
    http = config.get("http_options") or {}
    return str(http.get("host", DEFAULT_HOST)), int(http.get("port", DEFAULT_PORT))


def client_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a server bound to host:port."""
    if host in _ALL_INTERFACES:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def port_taken(host: str, port: int) -> bool:
    """Whether a listening socket already holds host:port (as Serve's proxy would bind it).

    SO_REUSEADDR, as uvicorn sets it: connections in TIME_WAIT from a server that just stopped
    do not count, a listener (on this address or on all interfaces) does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_owner(port: int) -> str | None:
    """'pid 123 (command line)' of the process listening on `port`, when this user may see it."""
    import psutil

    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.Error:
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return None
            try:
                cmdline = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                cmdline = "?"
            return f"pid {conn.pid} ({cmdline[:120]})"
    return None


def demands(config: Mapping[str, Any]) -> list[Demand]:
    """Replicas x resources each deployment of a Serve config file asks for when it starts.

    Only what the file states: a deployment the file does not list, or lists without
    ray_actor_options, keeps the code's defaults (serve_app/app.py asks for no GPU). One
    exception: with `args.model.parallel.gpus` N > 1 the builder makes the GPU deployment's
    replica a placement group of N bundles (one rank each) unless the file lists its own.
    """
    out = []
    for app in config.get("applications") or []:
        parallel = ((app.get("args") or {}).get("model") or {}).get("parallel") or {}
        ranks = int(parallel.get("gpus") or 1)
        for dep in app.get("deployments") or []:
            replicas = _start_replicas(dep)
            actor = dep.get("ray_actor_options") or {}
            bundles = dep.get("placement_group_bundles") or []
            gpus = float(actor.get("num_gpus") or 0)
            cpus = float(actor.get("num_cpus") or 0)
            if bundles:
                gpus = sum(float(b.get("GPU", 0)) for b in bundles)
                cpus = sum(float(b.get("CPU", 0)) for b in bundles)
            elif ranks > 1 and gpus:
                gpus, cpus = ranks * gpus, ranks * float(parallel.get("cpus_per_rank") or cpus)
            if replicas and (gpus or cpus):
                out.append(Demand(str(dep.get("name")), replicas, cpus, gpus))
    return out


def _start_replicas(dep: Mapping[str, Any]) -> int:
    auto = dep.get("autoscaling_config")
    if dep.get("num_replicas") == "auto" or auto:
        auto = auto or {}
        # Serve starts an autoscaling deployment at initial_replicas, else min_replicas (1).
        start = auto.get("initial_replicas")
        return int(start if start is not None else auto.get("min_replicas", 1))
    return int(dep.get("num_replicas") or 1)


def shortfalls(wanted: Iterable[Demand], *, cpus: float, gpus: float) -> list[str]:
    """One line per resource the replicas cannot all get on a node with `cpus` and `gpus`."""
    wanted = list(wanted)
    problems = []
    need_gpus = _gpus_needed(wanted)
    if need_gpus > gpus:
        parts = ", ".join(d.describe("GPU") for d in wanted if d.gpus)
        problems.append(
            f"the config asks for {_num(need_gpus)} GPU(s) ({parts}); this machine has"
            f" {_num(gpus)}."
        )
    need_cpus = sum(d.replicas * d.cpus for d in wanted)
    if need_cpus > cpus:
        parts = ", ".join(d.describe("CPU") for d in wanted if d.cpus)
        problems.append(
            f"the config asks for {_num(need_cpus)} CPU(s) ({parts}); this machine has"
            f" {_num(cpus)}."
        )
    return problems


def _gpus_needed(wanted: list[Demand]) -> float:
    """Whole GPUs for the whole-GPU replicas, plus what the fractional ones pack into.

    Ray places a replica asking for less than one GPU on a single GPU, so three replicas of
    0.6 need three GPUs, not 1.8; first-fit decreasing is what that packing costs here.
    """
    whole = sum(d.replicas * d.gpus for d in wanted if d.gpus >= 1)
    fractions = sorted((d.gpus for d in wanted for _ in range(d.replicas) if 0 < d.gpus < 1),
                       reverse=True)  # fmt: skip
    free: list[float] = []
    for part in fractions:
        for i, room in enumerate(free):
            if room >= part - 1e-9:
                free[i] = room - part
                break
        else:
            free.append(1.0 - part)
    return whole + len(free)


def node_resources() -> tuple[float, float]:
    """(CPUs, GPUs) a local Ray node started here would advertise.

    Ray's own resolution (CUDA_VISIBLE_DEVICES, NVML, cgroup CPU limits, RAY_OVERRIDE_RESOURCES),
    so the numbers are the ones its scheduler will use. It is a private Ray API: the launcher's
    tests call it, so a Ray upgrade that moves it fails CI rather than a user's start.
    """
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    spec = ResourceAndLabelSpec().resolve(is_head=True, node_ip_address="127.0.0.1")
    return float(spec.num_cpus or 0), float(spec.num_gpus or 0)


def _num(value: float) -> str:
    return str(int(value)) if math.isclose(value, round(value)) else f"{value:g}"
