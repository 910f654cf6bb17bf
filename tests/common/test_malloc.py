"""keep_large_buffers: after it, multi-MB buffers come from malloc's heap instead of fresh mmaps.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone, and the
default case needs a process where nothing has tuned malloc yet.
"""

from __future__ import annotations

import ctypes
import json
import platform
import subprocess
import sys

import pytest

from serve_app.common import malloc

# In a child: allocate and free 4 MB buffers the way an edit does, and report how many bytes
# malloc still holds in mmapped chunks while one is alive (mallinfo2's hblkhd), then whether the
# buffer after the first came back at the same address (reused, its pages already faulted in).
_PROBE = r"""
import ctypes, json, sys
from serve_app.common.malloc import keep_large_buffers
tuned = keep_large_buffers() if sys.argv[1] == "tuned" else None

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 4 * 1024 * 1024
before = libc.mallinfo2().hblkhd
first = libc.malloc(size)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(first)
addresses = []
for _ in range(3):
    p = libc.malloc(size)
    addresses.append(p)
    libc.free(p)
print(json.dumps({"tuned": tuned, "mmapped": mmapped, "reused": len(set(addresses)) == 1}))
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt and mallinfo2 are glibc's; elsewhere keep_large_buffers() returns False",
)


def probe(mode: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@glibc
def test_default_malloc_maps_each_large_buffer() -> None:
    # What the setting is for: by default a 4 MB buffer is a fresh mmap (so this test can fail
    # if glibc's defaults change, and the other one then proves nothing).
    result = probe("default")
    assert result["mmapped"] >= 4 * 1024 * 1024


@glibc
def test_kept_buffers_come_from_the_heap_and_are_reused() -> None:
    result = probe("tuned")
    assert result == {"tuned": True, "mmapped": 0, "reused": True}


def test_without_mallopt_it_reports_false(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: str | None) -> object:
        raise OSError("no C library here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert malloc._tune() is False


def test_it_tunes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def tune() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(malloc, "_done", None)
    monkeypatch.setattr(malloc, "_tune", tune)
    assert malloc.keep_large_buffers() and malloc.keep_large_buffers()
    assert calls == [1]
