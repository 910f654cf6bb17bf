"""One replica whose two ranks sit on two Ray nodes (`placement_strategy: STRICT_SPREAD`), on CPU:
a Ray cluster of two raylets on this machine (tests.integration.two_nodes, a process of its own).
The ranks find each other through rank 0's node address and port, the edit crosses the nodes'
object stores, and the pixels are the single-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.fixtures import free_port, random_image
from tests.integration.conftest import Server
from tests.integration.test_parallel import (
    _args,
    _edit,
    _single_process_image,
    _streamed_event_types,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, Any]]]:
    args = _args(
        tmp_path_factory.mktemp("spread"),
        parallel={"gpus": 2, "placement_strategy": "STRICT_SPREAD"},
    )
    port = free_port()
    log = tmp_path_factory.mktemp("two-nodes") / "cluster.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.two_nodes", str(port), json.dumps(args)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()  # "ready", "failed: ...", or "" if it died
            if line != "ready":
                pytest.fail(f"two-node cluster: {line or 'exited'}; {log.read_text()[-3000:]}")
            yield Server(url=f"http://127.0.0.1:{port}"), args
        finally:
            if proc.stdin is not None:
                proc.stdin.close()  # the cluster process shuts Serve and both nodes down
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_ranks_on_two_nodes_give_the_single_process_pixels(
    spread: tuple[Server, dict[str, Any]],
) -> None:
    server, args = spread
    ranks = httpx.get(f"{server.url}/ready", timeout=10).json()["parallel"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["node_id"] for r in ranks)
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # STRICT_SPREAD: one rank per node

    reference = random_image(48, 40, seed=6)
    got = _edit(server, reference, "make the sky purple")
    want = _single_process_image(args, reference, "make the sky purple")
    assert got.shape == want.shape
    assert int(np.abs(got.astype(int) - want.astype(int)).max()) <= 1


def test_streaming_over_two_nodes(spread: tuple[Server, dict[str, Any]]) -> None:
    want = ["image_edit.partial_image", "image_edit.completed"]
    assert _streamed_event_types(spread[0]) == want
