"""GPU tests: skipped (with a reason) where torch sees no CUDA GPU, 2-GPU tests where it sees one.

Run them on a GPU machine with the project installed: `python -m pytest tests/gpu -v -s -rA`
(docs/gpu.md, "GPU tests").
"""

from __future__ import annotations

import os

import pytest

# The multi-GPU tests are written for two GPUs (placements, memory caps, Ray's GPU count): on a
# bigger host they use the first two unless CUDA_VISIBLE_DEVICES says otherwise. Set before torch
# or Ray look at the GPUs; Ray's workers inherit it.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0,1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    count = _gpu_count()
    no_gpu = pytest.mark.skip(reason="needs CUDA GPUs (docs/gpu.md: on a GPU machine)")
    for item in items:
        if "tests/gpu/" not in item.nodeid.replace("\\", "/"):
            continue
        if count == 0:
            item.add_marker(no_gpu)
            continue
        marker = item.get_closest_marker("gpus")
        need = int(marker.args[0]) if marker else 1
        if count < need:
            item.add_marker(
                pytest.mark.skip(reason=f"needs {need} CUDA GPUs, this machine has {count}")
            )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpus(n): needs at least n CUDA GPUs")
