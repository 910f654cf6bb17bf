"""`response_format=url` results in a Redis server: one store for every ingress replica on every
node of a cluster (`storage.url: redis://host:6379/0`; the `redis` extra).

Keys, all under `{<storage.key_prefix>}` (a Redis Cluster hash tag: one slot, so one script can
touch them all):

- `{p}:img:<id>`: the image bytes, with a Redis expiry of `storage.ttl_s`;
- `{p}:index`: a sorted set of ids by creation time (ms), oldest first: what eviction walks;
- `{p}:sizes`: a hash of id -> bytes, and `{p}:bytes`: their sum, the size bound's counter.

Every `put` runs one Lua script, atomically over all replicas: drop what has expired, evict the
oldest until the new image fits under `storage.max_total_bytes`, store it. Expiry is checked on
read from the id's creation time as well, so an image is gone at `ttl_s` whatever Redis's clock
says. A Redis that cannot be reached answers 503 + Retry-After (a retry may land when it is
back), never a hang: connects and commands time out. Blocking: call from a thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from serve_app.common.config import StorageConfig
from serve_app.common.errors import ServiceUnavailableError
from serve_app.ingress.stored_images import (
    StoredImage,
    new_image_id,
    not_found,
    parse_image_id,
    too_large,
)

logger = logging.getLogger("ray.serve")

# Seconds a connect or a command may take before the request is answered 503.
SOCKET_TIMEOUT_S = 5.0

# KEYS: index, sizes, bytes, the new image's key ("" to only sweep).
# ARGV: now ms, ttl ms, max bytes, incoming bytes, image key prefix, new id, data.
# Returns the bytes held afterwards.
_MAKE_ROOM_AND_PUT = """
local index, sizes, total_key, image_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, ttl, cap, incoming = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
    tonumber(ARGV[4])
local prefix = ARGV[5]
local function evict(id)
  local size = tonumber(redis.call('HGET', sizes, id) or '0')
  redis.call('DEL', prefix .. id)
  redis.call('HDEL', sizes, id)
  redis.call('ZREM', index, id)
  return redis.call('DECRBY', total_key, size)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl)) do
  evict(id)
end
local total = tonumber(redis.call('GET', total_key) or '0')
while total + incoming > cap do
  local oldest = redis.call('ZRANGE', index, 0, 0)
  if #oldest == 0 then break end
  total = evict(oldest[1])
end
if image_key ~= '' then
  redis.call('SET', image_key, ARGV[7], 'PX', ttl)
  redis.call('ZADD', index, now, ARGV[6])
  redis.call('HSET', sizes, ARGV[6], incoming)
  total = redis.call('INCRBY', total_key, incoming)
end
return total
"""


class RedisImageStore:
    def __init__(
        self,
        *,
        url: str,
        ttl_s: float,
        max_total_bytes: int,
        key_prefix: str = "qwen-image-edit-serve",
        clock: Callable[[], float] = time.time,
        retry_after_s: float = 5.0,
        password: str | None = None,
    ) -> None:
        import redis

        self._redis: Any = redis.Redis.from_url(
            url,
            password=password,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        self._errors: tuple[type[Exception], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            # A replica that is loading its data set, or a read-only one after a failover.
            redis.exceptions.BusyLoadingError,
            redis.exceptions.ReadOnlyError,
        )
        self._script = self._redis.register_script(_MAKE_ROOM_AND_PUT)
        tag = "{" + key_prefix + "}"
        self._keys = [f"{tag}:index", f"{tag}:sizes", f"{tag}:bytes"]
        self._image_prefix = f"{tag}:img:"
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._max_bytes = max_total_bytes
        self._clock = clock
        self._retry_after_s = retry_after_s

    @classmethod
    def from_config(
        cls,
        config: StorageConfig,
        *,
        clock: Callable[[], float] = time.time,
        retry_after_s: float = 5.0,
    ) -> RedisImageStore:
        return cls(
            url=config.url,
            ttl_s=config.ttl_s,
            max_total_bytes=config.max_total_bytes,
            key_prefix=config.key_prefix,
            clock=clock,
            retry_after_s=retry_after_s,
            password=_password(config.password_env),
        )

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def put(self, data: bytes, *, output_format: str) -> str:
        if len(data) > self._max_bytes:
            raise too_large()
        now = self._now_ms()
        image_id = new_image_id(now, output_format)
        self._run(self._image_prefix + image_id, now, len(data), image_id, data)
        return image_id

    def get(self, image_id: str) -> StoredImage:
        created_ms, content_type = parse_image_id(image_id)
        age_ms = self._now_ms() - created_ms
        if age_ms >= self._ttl_ms:
            raise not_found(image_id)  # the next put sweeps it
        data = self._call(self._redis.get, self._image_prefix + image_id)
        if data is None:
            raise not_found(image_id)
        return StoredImage(
            data=bytes(data),
            content_type=content_type,
            expires_in_s=(self._ttl_ms - age_ms) / 1000,
        )

    def total_bytes(self) -> int:
        return int(self._run("", self._now_ms(), 0, "", b""))

    def _run(self, image_key: str, now_ms: int, incoming: int, image_id: str, data: bytes) -> Any:
        args = [now_ms, self._ttl_ms, self._max_bytes, incoming, self._image_prefix, image_id, data]
        return self._call(self._script, keys=[*self._keys, image_key], args=args)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            logger.warning("the image store (Redis) is unavailable: %s", exc)
            raise ServiceUnavailableError(
                "The image store is unavailable; retry shortly.",
                code="image_store_unavailable",
                retry_after_s=self._retry_after_s,
            ) from None


def _password(env_name: str | None) -> str | None:
    # Unset or empty: none, or the URL's own (a password in the URL wins, as redis-py does it).
    return (os.environ.get(env_name) or None) if env_name else None
