from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.launch.preflight import (
    Demand,
    client_url,
    demands,
    http_address,
    node_resources,
    port_owner,
    port_taken,
    shortfalls,
)

ROOT = Path(__file__).resolve().parents[2]


def _config(*deployments: dict[str, Any]) -> dict[str, Any]:
    return {"applications": [{"name": "a", "import_path": "x:y", "deployments": list(deployments)}]}


def test_demands_count_replicas_bundles_and_autoscaling() -> None:
    config = _config(
        {"name": "M", "num_replicas": 2, "ray_actor_options": {"num_cpus": 4, "num_gpus": 2}},
        {"name": "I", "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0}},
        {"name": "P", "num_replicas": 1, "ray_actor_options": {"num_gpus": 1},
         "placement_group_bundles": [{"GPU": 1, "CPU": 2}, {"GPU": 1}]},
        {"name": "A", "num_replicas": "auto", "autoscaling_config": {"min_replicas": 3},
         "ray_actor_options": {"num_gpus": 1}},
        {"name": "S", "autoscaling_config": {"min_replicas": 0, "initial_replicas": 2},
         "ray_actor_options": {"num_gpus": 1}},
        {"name": "Z", "autoscaling_config": {"min_replicas": 0}, "ray_actor_options": {"num_gpus": 1}},
        {"name": "D"},  # resources from the code's defaults: not counted
    )  # fmt: skip
    assert demands(config) == [
        Demand("M", 2, 4.0, 2.0),
        Demand("I", 1, 0.5, 0.0),
        Demand("P", 1, 2.0, 2.0),
        Demand("A", 3, 0.0, 1.0),
        Demand("S", 2, 0.0, 1.0),
    ]


def test_demands_of_a_replica_over_ranks_are_its_bundles() -> None:
    config = _config(
        {"name": "M", "num_replicas": 2, "ray_actor_options": {"num_cpus": 4, "num_gpus": 1}},
        {"name": "I", "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0}},
    )
    config["applications"][0]["args"] = {"model": {"parallel": {"gpus": 4, "cpus_per_rank": 2}}}
    assert demands(config) == [Demand("M", 2, 8.0, 4.0), Demand("I", 1, 0.5, 0.0)]
    problems = shortfalls(demands(config), cpus=64, gpus=4)
    assert problems and "asks for 8 GPU(s) (M: 2 replica(s) x 4 GPU)" in problems[0]


def test_shortfalls_name_the_numbers() -> None:
    wanted = [Demand("QwenImageEditModel", 2, 4.0, 2.0), Demand("OpenAIIngress", 1, 1.0, 0.0)]
    problems = shortfalls(wanted, cpus=16, gpus=0)
    assert problems == [
        "the config asks for 4 GPU(s) (QwenImageEditModel: 2 replica(s) x 2 GPU); "
        "this machine has 0."
    ]
    assert shortfalls(wanted, cpus=16, gpus=4) == []
    (cpu_problem,) = shortfalls(wanted, cpus=2, gpus=4)
    assert "9 CPU(s)" in cpu_problem and "this machine has 2" in cpu_problem


def test_fractional_gpus_pack_per_gpu() -> None:
    # Ray puts a fractional replica on one GPU: three 0.6 replicas need three GPUs.
    assert shortfalls([Demand("F", 3, 0.0, 0.6)], cpus=8, gpus=2)
    assert not shortfalls([Demand("F", 3, 0.0, 0.6)], cpus=8, gpus=3)
    assert not shortfalls([Demand("F", 4, 0.0, 0.5)], cpus=8, gpus=2)
    assert not shortfalls([Demand("F", 2, 0.0, 0.5), Demand("W", 1, 0.0, 1.0)], cpus=8, gpus=2)


def test_every_serve_config_in_the_repository_is_understood() -> None:
    configs = [ROOT / "serve_config.yaml", *sorted((ROOT / "deploy").rglob("*.yaml"))]
    serve_configs = [
        (path, doc)
        for path in configs
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and "applications" in doc  # not a Kubernetes manifest
    ]
    assert len(serve_configs) >= 2
    for path, config in serve_configs:
        host, port = http_address(config)
        assert port > 0 and host, path
        stated = [
            d.get("ray_actor_options", {}).get("num_gpus") or 0
            for app in config["applications"]
            for d in app.get("deployments", [])
        ]
        assert (sum(d.gpus for d in demands(config)) > 0) == any(stated), path


def test_http_address_and_client_url() -> None:
    assert http_address({}) == ("0.0.0.0", 8000)
    assert http_address({"http_options": {"host": "127.0.0.1", "port": 9}}) == ("127.0.0.1", 9)
    assert client_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert client_url("::", 80) == "http://127.0.0.1:80"
    assert client_url("::1", 80) == "http://[::1]:80"


def test_port_taken_by_a_listener_only() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert port_taken("127.0.0.1", port)
        assert port_taken("0.0.0.0", port)
        assert port_owner(port) is not None
        assert f"pid {os.getpid()} " in str(port_owner(port))
    assert not port_taken("127.0.0.1", port)


def test_node_resources_is_rays_view_of_this_machine() -> None:
    cpus, gpus = node_resources()
    assert cpus >= 1
    assert gpus == 0  # the CI machine has no GPU


def test_node_resources_follow_rays_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a Ray node started here would advertise, overrides included.
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", '{"CPU": 3, "GPU": 2}')
    assert node_resources() == (3.0, 2.0)
