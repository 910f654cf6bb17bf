"""Keep every Ray worker's gRPC server on the node IP, never on all interfaces.

The launcher starts its local cluster with 127.0.0.1 as the node IP, and Ray's own daemons then
listen on loopback only. One server does not follow: Ray Serve 2.60 starts an inter-deployment
gRPC server in every replica on `[::]:0` (all interfaces, no setting; ray-project/ray#64544).
Reachable from the network, it would take handle calls straight to the model replica, past the
ingress and its API keys.

`bind_grpc_to_node_ip` is a Ray `worker_process_setup_hook` (runtime_env), set by the launcher
only for the cluster it starts: in each worker it makes the gRPC helper Serve binds with put the
node IP where the wildcard address was. tests/launch checks every listening socket of a
`make run` session, so a Ray upgrade that binds elsewhere fails there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

HOOK = f"{__name__}.bind_grpc_to_node_ip"
_WILDCARDS = ("[::]", "0.0.0.0", "")


def node_ip_address(address: str, node_ip: str) -> str:
    """`address` (host:port) with a wildcard host replaced by `node_ip`."""
    host, sep, port = address.rpartition(":")
    if not sep or host not in _WILDCARDS:
        return address
    return f"[{node_ip}]:{port}" if ":" in node_ip else f"{node_ip}:{port}"


def bind_grpc_to_node_ip() -> None:
    import ray
    from ray._common import tls_utils

    node_ip = ray.util.get_node_ip_address()
    original: Callable[[Any, str], int] = tls_utils.add_port_to_grpc_server

    def add_port_to_grpc_server(server: Any, address: str) -> int:
        return original(server, node_ip_address(address, node_ip))

    # Modules that imported the helper by name before this hook ran keep their own reference.
    for module in (tls_utils, sys.modules.get("ray.serve._private.replica")):
        if module is not None and hasattr(module, "add_port_to_grpc_server"):
            setattr(module, "add_port_to_grpc_server", add_port_to_grpc_server)  # noqa: B010
