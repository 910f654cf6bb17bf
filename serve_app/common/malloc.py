"""glibc's malloc, tuned once in each serving process so that multi-MB buffers stay in its heap.

Every edit moves multi-MB buffers through the ingress and the model replica: the decoded upload
(3 MB for 1 MP), the output array, its PNG (up to as large), its base64 and the JSON body (4 MB).
glibc serves each allocation above its mmap threshold with a fresh mmap and returns it with munmap,
and gives freed heap memory above its trim threshold back to the kernel; either way the next
edit's buffers are new pages that the kernel faults in again, a cost that shows in every codec
stage (`python -m bench.overhead`'s codec figures, before and after: docs/gpu.md). With both
thresholds raised the buffers are reused, already faulted in.

Two ways in, for two kinds of process. `keep_large_buffers()` (mallopt) tunes a process that is
already running: the ingress and the model replica call it at start, on any Ray cluster. Serve's
HTTP proxy, which copies every answer's body on its way out, is Ray's process, not ours: glibc
reads `GLIBC_TUNABLES` from the environment when a process starts, so the clusters we start (the
launcher's, the benchmarks') and the container image (deploy/Dockerfile) set `CLUSTER_ENV` for
every process of the cluster. A probe of the proxy alone found it faster with the setting; in a
whole edit it did not show (docs/gpu.md, bench/results/h200-proxy-malloc.json).

The price is memory a process keeps: freed buffers stay in the heap (up to `TRIM_THRESHOLD` at
its top) instead of going back to the kernel, a few edits' worth of buffers per process.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger("ray.serve")

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): above it mallopt refuses. The
# largest buffer of an edit (a 4 MP output's base64 JSON body, ~22 MB) stays below it.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 128 * 1024 * 1024
# The same two settings as glibc reads them at a process's start (deploy/Dockerfile's ENV holds
# this string; tests/deploy checks that they agree).
GLIBC_TUNABLES = (
    f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
)
CLUSTER_ENV = {"GLIBC_TUNABLES": GLIBC_TUNABLES}

_done: bool | None = None


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds in this process, once; False where malloc is not
    glibc's (macOS, musl) or refuses. Safe to call from every deployment's constructor."""
    global _done
    if _done is None:
        _done = _tune()
    return _done


def _tune() -> bool:
    try:
        # The symbols this process already has (its C library among them): no library search,
        # which on Linux would run `ldconfig -p` at every replica's start.
        mallopt = ctypes.CDLL(None).mallopt  # glibc (and uClibc); absent on macOS and musl
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error. The mmap threshold first: setting either one
    # also turns off glibc's dynamic adjustment of both.
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        logger.warning("malloc: could not raise the mmap/trim thresholds; buffers are not kept")
    return ok
