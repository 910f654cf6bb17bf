"""`response_format=url`: a bounded, expiring image store that every ingress replica can read.

Images live under one fsspec location (a local folder by default; `s3://...`, `gcs://...` or
`memory://` by config), or in a Redis server (`redis://...`: `ingress/redis_store.py`), which
every ingress replica on every node of a cluster reads. An id is
`img-<created ms>-<32 random hex>.<ext>`, which gives

- expiry without metadata calls: the creation time is in the name, checked on every read;
- the content type from the extension;
- unguessable URLs (128 random bits), as OpenAI's result URLs are bearer links.

In a folder all state is in the object names, so replicas share nothing but the store. Every
`put` lists the folder, deletes what has expired, then the oldest images until the new one fits
under `max_total_bytes`. Blocking (fsspec is synchronous): call from a thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_app.common.config import StorageConfig, is_redis_url
from serve_app.ingress.stored_images import (
    ID_RE,
    ImageStorage,
    StoredImage,
    new_image_id,
    not_found,
    parse_image_id,
    too_large,
)

logger = logging.getLogger("ray.serve")


def open_image_store(
    config: StorageConfig, *, clock: Callable[[], float] = time.time, retry_after_s: float = 5.0
) -> ImageStorage:
    """The store `config.url` names: Redis for redis:// and rediss://, else an fsspec location."""
    if is_redis_url(config.url):
        from serve_app.ingress.redis_store import RedisImageStore

        return RedisImageStore.from_config(config, clock=clock, retry_after_s=retry_after_s)
    return ImageStore.from_config(config, clock=clock)


@dataclass(frozen=True)
class _Entry:
    path: str
    created_ms: int
    size: int


class ImageStore:
    def __init__(
        self,
        *,
        url: str,
        ttl_s: float,
        max_total_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(_expand(url))
        self._fs: Any = fs
        self._root = str(root).rstrip("/")
        self._ttl_ms = int(ttl_s * 1000)
        self._max_bytes = max_total_bytes
        self._clock = clock
        self._fs.makedirs(self._root, exist_ok=True)

    @classmethod
    def from_config(
        cls, config: StorageConfig, *, clock: Callable[[], float] = time.time
    ) -> ImageStore:
        return cls(
            url=config.url, ttl_s=config.ttl_s, max_total_bytes=config.max_total_bytes, clock=clock
        )

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def put(self, data: bytes, *, output_format: str) -> str:
        """Store `data`; returns its id. Evicts expired, then oldest, images to make room."""
        if len(data) > self._max_bytes:
            raise too_large()
        now = self._now_ms()
        self._make_room(len(data), now_ms=now)
        image_id = new_image_id(now, output_format)
        self._fs.pipe_file(f"{self._root}/{image_id}", data)
        return image_id

    def get(self, image_id: str) -> StoredImage:
        """The image, or NotFoundError (404) if the id is malformed, unknown or expired."""
        created_ms, content_type = parse_image_id(image_id)
        age_ms = self._now_ms() - created_ms
        if age_ms >= self._ttl_ms:
            self._delete(f"{self._root}/{image_id}")
            raise not_found(image_id)
        try:
            data = self._fs.cat_file(f"{self._root}/{image_id}")
        except FileNotFoundError:
            raise not_found(image_id) from None
        return StoredImage(
            data=bytes(data),
            content_type=content_type,
            expires_in_s=(self._ttl_ms - age_ms) / 1000,
        )

    def total_bytes(self) -> int:
        return sum(entry.size for entry in self._entries())

    def _entries(self) -> list[_Entry]:
        try:
            listing = self._fs.ls(self._root, detail=True)
        except FileNotFoundError:
            return []
        entries = []
        for info in listing:
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            match = ID_RE.match(name)
            if match is not None and info.get("type") != "directory":
                size = int(info.get("size") or 0)
                entries.append(_Entry(f"{self._root}/{name}", int(match.group(1)), size))
        return sorted(entries, key=lambda e: (e.created_ms, e.path))

    def _make_room(self, incoming: int, *, now_ms: int) -> None:
        kept: list[_Entry] = []
        for entry in self._entries():
            if now_ms - entry.created_ms >= self._ttl_ms:
                self._delete(entry.path)
            else:
                kept.append(entry)
        total = sum(entry.size for entry in kept)
        for entry in kept:  # oldest first
            if total + incoming <= self._max_bytes:
                break
            self._delete(entry.path)
            total -= entry.size

    def _delete(self, path: str) -> None:
        # Another replica may have evicted it already.
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            pass
        except OSError:
            logger.warning("could not delete %s from the image store", path, exc_info=True)


def _expand(url: str) -> str:
    # A plain local path may start with "~"; URLs with a scheme are left alone.
    if "://" in url:
        return url
    import os

    return os.path.expanduser(url)


def image_url(base_url: str, image_id: str) -> str:
    return f"{base_url.rstrip('/')}/v1/images/{image_id}"
