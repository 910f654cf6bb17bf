"""The Redis url-result store against a real redis-server (started here): what the folder store
does (expiry, the size bound, the oldest evicted first) across replicas that share nothing but
the server, and a 503 + Retry-After, not a hang, when the server is gone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig, StorageConfig
from serve_app.common.errors import InternalError, NotFoundError, ServiceUnavailableError
from serve_app.ingress.redis_store import RedisImageStore
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from serve_app.ingress.storage import open_image_store
from tests.fakes import FakeModelHandle
from tests.fixtures import free_port, redis_server
from tests.ingress.test_ingress import assert_error, post_edit
from tests.ingress.test_storage import Clock


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def store(url: str, clock: Clock | None = None, **kw: Any) -> tuple[RedisImageStore, Clock]:
    clock = clock or Clock()
    # A prefix per test: one server, no state shared between tests.
    options: dict[str, Any] = {"ttl_s": 60.0, "max_total_bytes": 10_000, **kw}
    options.setdefault("key_prefix", f"test-{uuid.uuid4().hex}")
    return RedisImageStore(url=url, clock=clock, **options), clock


def test_put_then_get_returns_the_bytes_and_content_type(redis_url: str) -> None:
    s, _ = store(redis_url)
    image_id = s.put(b"\x89PNG fake", output_format="png")
    got = s.get(image_id)
    assert got.data == b"\x89PNG fake" and got.content_type == "image/png"
    assert got.expires_in_s == pytest.approx(60.0)
    assert s.total_bytes() == len(b"\x89PNG fake")


def test_images_expire_after_the_ttl_and_are_swept(redis_url: str) -> None:
    s, clock = store(redis_url, ttl_s=60.0)
    image_id = s.put(b"data", output_format="png")
    clock.now += 59.0
    assert s.get(image_id).expires_in_s == pytest.approx(1.0)
    clock.now += 1.0
    with pytest.raises(NotFoundError):
        s.get(image_id)
    assert s.total_bytes() == 0


def test_redis_expires_the_key_itself(redis_url: str) -> None:
    # The server's own expiry: images nobody reads again do not outlive the TTL in Redis.
    import redis

    s, _ = store(redis_url, ttl_s=30.0, key_prefix="own-expiry")
    image_id = s.put(b"x", output_format="webp")
    ttl_ms = redis.Redis.from_url(redis_url).pttl("{own-expiry}:img:" + image_id)
    assert 0 < ttl_ms <= 30_000


def test_size_cap_evicts_the_oldest_first(redis_url: str) -> None:
    s, clock = store(redis_url, max_total_bytes=2500)
    ids = []
    for i in range(3):
        ids.append(s.put(bytes([i]) * 1000, output_format="png"))
        clock.now += 1
    with pytest.raises(NotFoundError):
        s.get(ids[0])
    assert s.get(ids[1]).data == b"\x01" * 1000
    assert s.get(ids[2]).data == b"\x02" * 1000
    assert s.total_bytes() == 2000


def test_an_image_larger_than_the_cap_is_a_server_error(redis_url: str) -> None:
    s, _ = store(redis_url, max_total_bytes=1024)
    with pytest.raises(InternalError) as info:
        s.put(b"x" * 2000, output_format="png")
    assert info.value.code == "image_store_full"


@pytest.mark.parametrize("bad_id", ["nope", "../etc/passwd", "img-1-abc.png"])
def test_malformed_or_unknown_ids_are_404(redis_url: str, bad_id: str) -> None:
    s, _ = store(redis_url)
    with pytest.raises(NotFoundError):
        s.get(bad_id)
    with pytest.raises(NotFoundError):
        s.get("img-1700000000000-" + "a" * 32 + ".png")


def test_two_replicas_share_images_and_the_cap(redis_url: str) -> None:
    a, clock = store(redis_url, max_total_bytes=1500, key_prefix="shared")
    b, _ = store(redis_url, clock, max_total_bytes=1500, key_prefix="shared")
    first = a.put(b"1" * 1000, output_format="png")
    assert b.get(first).data == b"1" * 1000
    clock.now += 1
    second = b.put(b"2" * 1000, output_format="png")  # b evicts a's older image
    with pytest.raises(NotFoundError):
        a.get(first)
    assert a.get(second).data == b"2" * 1000
    assert a.total_bytes() == b.total_bytes() == 1000


def test_prefixes_keep_deployments_apart(redis_url: str) -> None:
    a, clock = store(redis_url, key_prefix="app-a")
    b, _ = store(redis_url, clock, key_prefix="app-b")
    image_id = a.put(b"a", output_format="png")
    with pytest.raises(NotFoundError):
        b.get(image_id)


def test_config_selects_redis_by_the_url_scheme(redis_url: str) -> None:
    chosen = open_image_store(StorageConfig(url=redis_url, key_prefix="by-config"))
    assert isinstance(chosen, RedisImageStore)
    assert chosen.get(chosen.put(b"ok", output_format="jpeg")).content_type == "image/jpeg"


def test_an_unreachable_server_is_503_with_retry_after() -> None:
    s, _ = store(f"redis://127.0.0.1:{free_port()}/0", retry_after_s=7)
    with pytest.raises(ServiceUnavailableError) as info:
        s.put(b"x", output_format="png")
    assert info.value.code == "image_store_unavailable"
    assert info.value.headers()["Retry-After"] == "7"
    with pytest.raises(ServiceUnavailableError):
        s.get("img-1700000000000-" + "a" * 32 + ".png")


# --- over HTTP -----------------------------------------------------------------------------


def make_client(url: str) -> TestClient:
    cfg = AppConfig.model_validate(
        {
            "model": {"source": "tiny"},
            "limits": {"min_output_side": 32},
            "storage": {"url": url, "key_prefix": f"http-{uuid.uuid4().hex}"},
            "retry_after_s": 3,
        }
    )
    service = EditService(model=FakeModelHandle(), config=cfg)
    return TestClient(
        create_app(service), base_url="http://localhost:8000", raise_server_exceptions=False
    )


def test_url_results_through_redis(redis_url: str) -> None:
    client = make_client(redis_url)
    resp = post_edit(client, response_format="url", n=2, size="64x32", output_format="png")
    assert resp.status_code == 200, resp.text
    urls = [d["url"] for d in resp.json()["data"]]
    fetched = client.get(urls[0])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content.startswith(b"\x89PNG")
    assert client.get(urls[1]).content != fetched.content


def test_an_unreachable_store_is_an_openai_503(tmp_path: Path) -> None:
    client = make_client(f"redis://127.0.0.1:{free_port()}/0")
    resp = post_edit(client, response_format="url", size="32x32")
    err = assert_error(resp, 503, None)
    assert err["code"] == "image_store_unavailable"
    assert resp.headers["retry-after"] == "3"


def test_the_password_comes_from_the_named_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with redis_server(tmp_path, password="s3cret") as url:
        config = StorageConfig(url=url, key_prefix="auth", password_env="TEST_REDIS_PASSWORD")
        monkeypatch.setenv("TEST_REDIS_PASSWORD", "wrong")
        with pytest.raises(ServiceUnavailableError):  # and the log says why
            open_image_store(config).put(b"x", output_format="png")
        monkeypatch.setenv("TEST_REDIS_PASSWORD", "s3cret")
        chosen = open_image_store(config)
        assert chosen.get(chosen.put(b"x", output_format="png")).data == b"x"
