from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from serve_app.launch.loopback import bind_grpc_to_node_ip, node_ip_address


@pytest.mark.parametrize(
    "address,expected",
    [
        ("[::]:0", "127.0.0.1:0"),
        ("0.0.0.0:9000", "127.0.0.1:9000"),
        (":9000", "127.0.0.1:9000"),
        ("10.0.0.5:9000", "10.0.0.5:9000"),  # an explicit address is kept
        ("[::1]:9000", "[::1]:9000"),
    ],
)
def test_wildcard_hosts_become_the_node_ip(address: str, expected: str) -> None:
    assert node_ip_address(address, "127.0.0.1") == expected


def test_ipv6_node_ip_is_bracketed() -> None:
    assert node_ip_address("[::]:7", "fd00::1") == "[fd00::1]:7"


def test_hook_makes_serves_grpc_helper_bind_the_node_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray._common import tls_utils
    from ray.serve._private import replica

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(tls_utils, "add_port_to_grpc_server", tls_utils.add_port_to_grpc_server)
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    bind_grpc_to_node_ip()
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    try:
        # What Serve's replica calls (ray/serve/_private/replica.py), through its own reference.
        port = replica.add_port_to_grpc_server(server, "[::]:0")
        assert port > 0
        server.start()
        listening = [
            c.laddr
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listening and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listening)
    finally:
        server.stop(None)
