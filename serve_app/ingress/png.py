"""A fast PNG writer for the default output: uint8 arrays in, standard PNG bytes out.

Pillow spends most of a 1 MP PNG encode choosing a filter per row (it tries all five), and the
encode is on every edit's critical path. Here every row gets the Up filter (one numpy subtraction),
and the filtered rows are deflated by ISA-L (the `isal` package: Intel's SIMD deflate) at level 1.
On noise, photo-like and smooth 1 MP images it is several times faster than zlib's run-length
strategy (what this writer used before), at the same size or smaller (`python -m bench.overhead`;
docs/gpu.md has the figures). The rows are cut into bands deflated on parallel threads (ISA-L drops
the GIL) and joined into one zlib stream, as pigz does: every band but the last ends on a byte
boundary with a sync flush, and each band has its own compressor, so no match reaches back into an
earlier band. ISA-L's SIMD checksums (Adler-32, CRC-32) finish the file.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from isal import isal_zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: gray, RGB, RGBA
_UP_FILTER = 2
# Bands smaller than this are not worth a thread hand-off.
_MIN_BAND_BYTES = 256 * 1024
_MAX_THREADS = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on (containers)
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, cpus))


def _executor() -> ThreadPoolExecutor:
    """One pool per process, made on first use (requests encode from several threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="png-deflate")
        return _pool


def _chunk(kind: bytes, *parts: bytes) -> list[bytes]:
    """A PNG chunk as parts to join (the IDAT data is joined only once, into the file)."""
    crc = isal_zlib.crc32(kind)
    for part in parts:
        crc = isal_zlib.crc32(part, crc)
    length = sum(len(p) for p in parts)
    return [struct.pack(">I", length), kind, *parts, struct.pack(">I", crc)]


def _up_filtered(array: np.ndarray) -> np.ndarray:
    """(H, 1 + W*C) rows, each the Up filter's type byte then row - previous row (mod 256)."""
    height = array.shape[0]
    rows = array.reshape(height, -1)
    out = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = _UP_FILTER
    out[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])
    return out


def _deflate_band(band: np.ndarray, *, last: bool) -> bytes:
    # Raw deflate (no zlib header): the bands are joined under one header and checksum.
    # (ISA-L's level 0 is no faster on noise and writes more than it reads.)
    compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15, 8)
    body = compressor.compress(band.data)
    return body + compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)


def _zlib_stream(filtered: np.ndarray) -> list[bytes]:
    """The zlib stream of `filtered` (header, deflate bands, Adler-32), as parts to join."""
    bands = max(1, min(_threads(), filtered.nbytes // _MIN_BAND_BYTES))
    rows_per_band = -(-filtered.shape[0] // bands)
    slices = [filtered[i : i + rows_per_band] for i in range(0, filtered.shape[0], rows_per_band)]
    if len(slices) == 1:
        deflated = [_deflate_band(slices[0], last=True)]
        checksum = isal_zlib.adler32(filtered.data)
    else:
        futures = [
            _executor().submit(_deflate_band, band, last=i == len(slices) - 1)
            for i, band in enumerate(slices)
        ]
        checksum = isal_zlib.adler32(filtered.data)  # while the bands deflate
        deflated = [f.result() for f in futures]
    # 0x78 0x01: deflate with a 32 KiB window, fastest-level hint; (0x7801 % 31 == 0).
    return [b"\x78\x01", *deflated, struct.pack(">I", checksum)]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"encode_png takes uint8 (H, W[, C]) arrays, not {array.dtype} {array.shape}"
        )
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in _COLOR_TYPE:
        raise ValueError(f"encode_png takes 1, 3 or 4 channels, got {channels}")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("encode_png needs a non-empty image")
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[channels], 0, 0, 0)
    idat = _zlib_stream(_up_filtered(np.ascontiguousarray(array)))
    return b"".join(
        [_SIGNATURE, *_chunk(b"IHDR", header), *_chunk(b"IDAT", *idat), *_chunk(b"IEND")]
    )
