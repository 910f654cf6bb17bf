"""The fast PNG writer: lossless, standard chunks and checksums, one zlib stream from bands."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app.ingress import png
from serve_app.ingress.png import encode_png


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk, checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), kind
        out.append((kind, payload))
        pos += 12 + length
    assert pos == len(data)
    return out


def decoded(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def rng_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 3), (1, 37, 3), (41, 1, 3), (24, 40, 3), (30, 20), (16, 16, 4), (9, 7, 1)],
)
def test_lossless_for_every_layout(shape: tuple[int, ...]) -> None:
    array = rng_image(shape)
    back = decoded(encode_png(array))
    assert np.array_equal(back, array.reshape(back.shape))


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_bands_join_into_one_valid_zlib_stream(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    # Smooth with noise: matches inside each band, literals across band edges.
    monkeypatch.setattr(png, "_threads", lambda: threads)
    monkeypatch.setattr(png, "_MIN_BAND_BYTES", 4096)
    monkeypatch.setattr(png, "_pool", None)
    ramp = np.linspace(0, 255, 130, dtype=np.uint8)[None, :, None]
    array = (np.broadcast_to(ramp, (97, 130, 3)) + rng_image((97, 130, 3)) // 64).astype(np.uint8)
    data = encode_png(array)
    parts = chunks(data)
    assert [kind for kind, _ in parts] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", parts[0][1]) == (130, 97, 8, 2, 0, 0, 0)
    raw = zlib.decompress(parts[1][1])  # checks the Adler-32 of the joined stream
    rows = np.frombuffer(raw, np.uint8).reshape(97, 1 + 130 * 3)
    assert set(rows[:, 0].tolist()) == {2}  # Up filter on every row
    assert np.array_equal(decoded(data), array)


def test_compresses_flat_and_smooth_images() -> None:
    # A vertical gradient (a sky): after the Up filter every row is one repeated byte.
    ramp = np.linspace(0, 255, 512, dtype=np.uint8)[:, None, None]
    array = np.ascontiguousarray(np.broadcast_to(ramp, (512, 512, 3)))
    data = encode_png(array)
    assert len(data) < array.nbytes // 100
    assert np.array_equal(decoded(data), array)


def test_accepts_non_contiguous_arrays() -> None:
    array = rng_image((20, 30, 3))[:, ::-1]
    assert np.array_equal(decoded(encode_png(array)), array)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), np.uint16),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
    ],
)
def test_rejects_what_it_cannot_write(array: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_png(array)
