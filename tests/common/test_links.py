from __future__ import annotations

from serve_app.common.config import HttpConfig, StorageConfig
from serve_app.common.links import host_header_warning


def test_a_host_header_warning_only_when_any_host_makes_links() -> None:
    assert host_header_warning(StorageConfig(), HttpConfig()) is None
    any_host = HttpConfig(allowed_hosts=["*"])
    assert "public_base_url" in (host_header_warning(StorageConfig(), any_host) or "")
    pinned = StorageConfig(public_base_url="https://images.example.com")
    assert host_header_warning(pinned, any_host) is None
