"""response_format=url: the expiring, size-capped image store and GET /v1/images/{id}."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig
from serve_app.common.errors import InternalError, NotFoundError
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from serve_app.ingress.storage import ImageStore
from tests.fakes import FakeModelHandle
from tests.ingress.test_ingress import assert_error, post_edit


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def memory_url() -> str:
    # fsspec's memory filesystem is process-global: one folder per test.
    return f"memory://images-{uuid.uuid4().hex}"


def store(url: str | None = None, **kw: Any) -> tuple[ImageStore, Clock]:
    clock = Clock()
    options: dict[str, Any] = {"ttl_s": 60.0, "max_total_bytes": 10_000, **kw}
    return ImageStore(url=url or memory_url(), clock=clock, **options), clock


def test_put_then_get_returns_the_bytes_and_content_type() -> None:
    s, _ = store()
    image_id = s.put(b"\x89PNG fake", output_format="png")
    got = s.get(image_id)
    assert got.data == b"\x89PNG fake" and got.content_type == "image/png"
    assert got.expires_in_s == pytest.approx(60.0)
    assert s.get(s.put(b"jpg", output_format="jpeg")).content_type == "image/jpeg"


def test_ids_are_unguessable_and_distinct() -> None:
    s, _ = store()
    ids = {s.put(b"x", output_format="webp") for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i.split("-")[2].split(".")[0]) == 32 for i in ids)


def test_images_expire_after_the_ttl() -> None:
    s, clock = store(ttl_s=60.0)
    image_id = s.put(b"data", output_format="png")
    clock.now += 59.0
    assert s.get(image_id).expires_in_s == pytest.approx(1.0)
    clock.now += 1.0
    with pytest.raises(NotFoundError):
        s.get(image_id)
    assert s.total_bytes() == 0  # the expired file was deleted on read


def test_expired_images_are_swept_on_put() -> None:
    s, clock = store(ttl_s=10.0)
    s.put(b"a" * 100, output_format="png")
    clock.now += 11
    s.put(b"b" * 10, output_format="png")
    assert s.total_bytes() == 10


def test_size_cap_evicts_the_oldest_first() -> None:
    s, clock = store(max_total_bytes=2500)
    ids = []
    for i in range(3):
        ids.append(s.put(bytes([i]) * 1000, output_format="png"))
        clock.now += 1
    # Adding the third needed room: the first (oldest) went, the second stayed.
    with pytest.raises(NotFoundError):
        s.get(ids[0])
    assert s.get(ids[1]).data == b"\x01" * 1000
    assert s.get(ids[2]).data == b"\x02" * 1000
    assert s.total_bytes() == 2000 <= 2500


def test_an_image_larger_than_the_cap_is_a_server_error() -> None:
    s, _ = store(max_total_bytes=1024)
    with pytest.raises(InternalError) as info:
        s.put(b"x" * 2000, output_format="png")
    assert info.value.code == "image_store_full"


@pytest.mark.parametrize(
    "bad_id",
    ["nope", "../etc/passwd", "img-1700000000000-" + "0" * 32 + ".gif", "img-1-abc.png"],
)
def test_malformed_or_unknown_ids_are_404(bad_id: str) -> None:
    s, _ = store()
    with pytest.raises(NotFoundError):
        s.get(bad_id)
    with pytest.raises(NotFoundError):
        s.get("img-1700000000000-" + "a" * 32 + ".png")  # well-formed, never stored


def test_two_replicas_on_one_location_share_images_and_the_cap(tmp_path: Path) -> None:
    # A local folder, as two ingress replicas on one node (or any shared fsspec URL) see it.
    a, clock = store(str(tmp_path / "shared"), max_total_bytes=1500)
    b = ImageStore(url=str(tmp_path / "shared"), ttl_s=60.0, max_total_bytes=1500, clock=clock)
    first = a.put(b"1" * 1000, output_format="png")
    assert b.get(first).data == b"1" * 1000
    clock.now += 1
    second = b.put(b"2" * 1000, output_format="png")  # b evicts a's older image
    with pytest.raises(NotFoundError):
        a.get(first)
    assert a.get(second).data == b"2" * 1000


# --- over HTTP -----------------------------------------------------------------------------


def make_client(**storage: Any) -> tuple[TestClient, Clock]:
    """The app as `make run` is addressed: on localhost, one of the default allowed hosts."""
    clock = Clock()
    cfg = AppConfig.model_validate(
        {
            "model": {"source": "tiny"},
            "limits": {"min_output_side": 32},
            "storage": {"url": memory_url(), "ttl_s": 60, **storage},
        }
    )
    service = EditService(model=FakeModelHandle(), config=cfg, clock=clock)
    app = create_app(service)
    return TestClient(app, base_url="http://localhost:8000", raise_server_exceptions=False), clock


def test_url_response_then_fetch_the_image() -> None:
    client, _ = make_client()
    resp = post_edit(client, response_format="url", n=2, size="64x32", output_format="webp", seed=4)
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == 2 and all(set(d) == {"url"} for d in data)
    # Absolute, built from the request's base URL by default.
    assert data[0]["url"].startswith("http://localhost:8000/v1/images/img-")
    fetched = client.get(data[0]["url"])
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/webp"
    assert "max-age=60" in fetched.headers["cache-control"]
    img = Image.open(io.BytesIO(fetched.content))
    assert img.format == "WEBP" and img.size == (64, 32)
    assert client.get(data[1]["url"]).content != fetched.content


def test_public_base_url_builds_the_urls() -> None:
    client, _ = make_client(public_base_url="https://img.example.com/edge/")
    url = post_edit(client, response_format="url", size="32x32").json()["data"][0]["url"]
    assert url.startswith("https://img.example.com/edge/v1/images/img-")
    path = url.removeprefix("https://img.example.com/edge")
    assert client.get(path).status_code == 200


def test_expired_or_unknown_image_is_openai_404() -> None:
    client, clock = make_client()
    url = post_edit(client, response_format="url", size="32x32").json()["data"][0]["url"]
    clock.now += 61
    err = assert_error(client.get(url), 404, "image_id")
    assert err["code"] == "image_not_found"
    unknown = "/v1/images/img-1700000000000-" + "0" * 32 + ".png"
    assert assert_error(client.get(unknown), 404, "image_id")["code"] == "image_not_found"
    # Not an image id at all: an unknown route, as before this route existed.
    assert assert_error(client.get("/v1/images/generations"), 404, None)["code"] == "not_found"


def test_get_on_the_edits_route_stays_405() -> None:
    client, _ = make_client()
    assert_error(client.get("/v1/images/edits"), 405, None)
