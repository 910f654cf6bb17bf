"""Foreign exceptions as API errors (Starlette's statuses, Ray's overload), API errors as HTTP."""

from __future__ import annotations

import json
import pickle

import pytest

from serve_app.common.errors import APIError, AuthenticationError, InvalidRequestError, error_body
from serve_app.ingress.errors_http import (
    client_gone,
    error_for_status,
    error_response,
    to_api_error,
)


@pytest.mark.parametrize(
    "status", [400, 401, 403, 404, 405, 408, 413, 415, 429, 431, 503, 504, 418, 502]
)
def test_error_for_status(status: int) -> None:
    err = error_for_status(status, "x")
    assert isinstance(err, APIError) and err.status_code == status and err.code


def test_to_api_error_translates_without_mutating() -> None:
    from ray.serve.exceptions import BackPressureError
    from starlette.exceptions import HTTPException

    own = InvalidRequestError("bad", param="n")
    assert to_api_error(own) is own
    teapot = to_api_error(HTTPException(418, "short and stout"))
    assert (teapot.status_code, teapot.error_type, teapot.message) == (
        418,
        "invalid_request_error",
        "short and stout",
    )
    assert InvalidRequestError.status_code == 400  # no class (or instance) was changed
    back = pickle.loads(pickle.dumps(teapot))
    assert (back.status_code, back.message) == (418, "short and stout")
    full = to_api_error(
        BackPressureError(num_queued_requests=8, max_queued_requests=8), retry_after_s=4
    )
    assert (full.status_code, full.code, full.headers()) == (
        503,
        "server_overloaded",
        {"Retry-After": "4"},
    )
    hidden = to_api_error(RuntimeError("secret"))
    assert hidden.status_code == 500 and "secret" not in hidden.message


def test_error_response_carries_the_error_headers() -> None:
    resp = error_response(AuthenticationError("no key"))
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert json.loads(bytes(resp.body)) == error_body(AuthenticationError("no key"))


def test_client_gone_knows_every_way_a_client_leaves() -> None:
    import asyncio

    from ray.exceptions import TaskCancelledError
    from starlette.requests import ClientDisconnect

    for gone in (ClientDisconnect(), asyncio.CancelledError(), TaskCancelledError()):
        assert client_gone(gone)
    for other in (RuntimeError("x"), InvalidRequestError("bad"), OSError("disk")):
        assert not client_gone(other)


def test_a_bare_status_gets_a_code_of_its_own() -> None:
    assert error_for_status(418, "x").code == "http_418"


def test_a_405_keeps_its_allow_header_across_processes() -> None:
    from starlette.exceptions import HTTPException

    err = to_api_error(HTTPException(405, headers={"Allow": "GET, HEAD"}))
    assert err.status_code == 405 and err.headers() == {"Allow": "GET, HEAD"}
    back = pickle.loads(pickle.dumps(err))
    assert back.headers() == {"Allow": "GET, HEAD"}
    assert error_response(back).headers["allow"] == "GET, HEAD"
