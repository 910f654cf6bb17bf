"""A Ray cluster of a head and worker raylets on this machine, driven over stdin: for
test_cluster, which runs it as a process of its own (the test session's process holds its own Ray
instance already), as tests.integration.two_nodes does.

    python -m tests.integration.cluster_nodes SPEC_JSON

SPEC: `{"port": the head proxy's port, "redis": "host:port" or null, "nodes": [{"name",
"num_cpus", "resources", "env"}...]}`, the first node the head. Each node gets its own `env`
(its raylet's, so every process on it: HOME, TMPDIR, and for a worker its proxy's port,
RAY_SERVE_WORKER_PROXY_HTTP_PORT), so that nodes see different files as machines would. With
`redis`, the GCS keeps its state there (fault tolerance: RAY_REDIS_ADDRESS), so it can be killed
and started again.

The process prints `{"ready": true}` once Serve runs, then answers each JSON command line with
one JSON line: `deploy` (a Serve config's applications, applied declaratively), `status`,
`actors`, `kill_actor`, `remove_node`, `kill_gcs`, `start_gcs`. It shuts everything down when stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

# A small object store per node (the default takes 30 % of the machine's memory each).
OBJECT_STORE_BYTES = 200 * 1024**2


def _node_args(node: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_cpus": node.get("num_cpus", 1),
        "resources": node.get("resources") or {},
        "object_store_memory": OBJECT_STORE_BYTES,
        "env_vars": node.get("env") or {},
    }


def _name(state: Any) -> str:
    # Serve's status enums: str() of a (str, Enum) is "Class.MEMBER"; the value is the name.
    return str(getattr(state, "value", state))


class Driver:
    def __init__(self, spec: dict[str, Any]) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        if spec.get("redis"):
            os.environ["RAY_REDIS_ADDRESS"] = spec["redis"]
            # The raylets wait this long for a restarted GCS (the default: 60 s).
            os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "60")
        head, *workers = spec["nodes"]
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**_node_args(head), "include_dashboard": False},
        )
        self.nodes = {head["name"]: self.cluster.head_node}
        for worker in workers:
            self.nodes[worker["name"]] = self.cluster.add_node(**_node_args(worker))
        ray.init(address=self.cluster.address, log_to_driver=False)
        serve.start(
            proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": spec["port"]}
        )

    def deploy(self, applications: list[dict[str, Any]]) -> dict[str, Any]:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = ServeDeploySchema.model_validate({"applications": applications})
        _get_global_client().deploy_apps(config)
        return {}

    def status(self, app: str) -> dict[str, Any]:
        from ray import serve

        status = serve.status().applications.get(app)
        if status is None:
            return {"status": None, "deployments": {}}
        return {
            "status": _name(status.status),
            "deployments": {
                name: {
                    "status": _name(d.status),
                    "running": sum(
                        n for state, n in d.replica_states.items() if "RUNNING" in str(state)
                    ),
                    "replicas": sum(d.replica_states.values()),
                }
                for name, d in status.deployments.items()
            },
        }

    def actors(self, name_part: str) -> dict[str, Any]:
        import ray

        named = ray.util.list_named_actors(all_namespaces=True)
        return {"names": sorted(a["name"] for a in named if name_part in a["name"])}

    def kill_actor(self, name_part: str, busy: bool = False) -> dict[str, Any]:
        """Kills the first actor whose name holds `name_part`; with `busy`, the first Serve
        replica among them that holds a request (`killed` None when none does)."""
        import ray

        named = ray.util.list_named_actors(all_namespaces=True)
        actors = sorted((a for a in named if name_part in a["name"]), key=lambda a: a["name"])
        for entry in actors:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            ongoing = ray.get(actor.get_num_ongoing_requests.remote(), timeout=10) if busy else 0
            if busy and ongoing < 1:
                continue
            ray.kill(actor, no_restart=True)
            return {"killed": entry["name"], "ongoing": ongoing}
        assert busy, f"no actor named like {name_part}"
        return {"killed": None}

    def remove_node(self, name: str) -> dict[str, Any]:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)
        return {}

    def kill_gcs(self) -> dict[str, Any]:
        self.cluster.head_node.kill_gcs_server()
        return {}

    def start_gcs(self) -> dict[str, Any]:
        self.cluster.head_node.start_gcs_server()
        return {}

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


def main(spec: dict[str, Any]) -> None:
    try:
        driver = Driver(spec)
    except Exception:
        print(json.dumps({"ready": False, "error": traceback.format_exc()[-3000:]}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            started = time.monotonic()
            try:
                answer = getattr(driver, op)(**command)
            except Exception:
                answer = {"error": traceback.format_exc()[-3000:]}
            answer["took_s"] = round(time.monotonic() - started, 3)
            print(json.dumps(answer), flush=True)
    finally:
        driver.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
