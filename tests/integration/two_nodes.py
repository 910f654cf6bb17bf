"""A Ray cluster of two nodes on this machine, serving one application: for
test_parallel_nodes, which runs it as a process of its own (the test session's process holds its
own Ray instance already).

    python -m tests.integration.two_nodes PORT ARGS_JSON

Ray's own multi-node test utility (`ray.cluster_utils.Cluster`) starts two raylets, each with its
own object store and its own CPUs, as two machines of one cluster would be; Serve then deploys
`serve_app.app:build_app` with ARGS_JSON at http://127.0.0.1:PORT/. The process prints one line,
`ready`, once /ready answers 200 (or `failed: ...`), and serves until its stdin closes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tests.integration.conftest import _get

# Each node: its CPUs for the replicas of one application, and a small object store (the
# default takes 30 % of the machine's memory per node).
NODE: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 300 * 1024**2}


def serve_on_two_nodes(port: int, args: dict[str, Any], *, timeout_s: float = 300.0) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.app import build_app

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        # One HTTP proxy, on the head: the two nodes share this machine's ports.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="nodes", route_prefix="/", blocking=False)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
        while _get(f"{url}/ready")[0] != 200:
            if time.monotonic() > deadline:
                print(f"failed: /ready not 200 in {timeout_s:.0f} s", flush=True)
                return
            time.sleep(0.5)
        print("ready", flush=True)
        sys.stdin.read()  # until the test closes it
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    serve_on_two_nodes(int(sys.argv[1]), json.loads(sys.argv[2]))
