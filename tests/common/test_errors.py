from __future__ import annotations

import pickle

import pytest

from serve_app.common.errors import (
    APIError,
    InvalidRequestError,
    ServiceUnavailableError,
    error_body,
)


def test_error_body_has_all_four_keys() -> None:
    body = error_body(InvalidRequestError("bad", param="n"))
    assert body == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_request",
        }
    }


def _subclasses(cls: type[APIError]) -> list[type[APIError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


@pytest.mark.parametrize(
    "cls", [c for c in _subclasses(APIError) if c.__name__ != "HTTPStatusError"]
)
def test_every_error_has_a_code_without_being_given_one(cls: type[APIError]) -> None:
    err = cls("x")
    assert isinstance(err.code, str) and err.code
    assert isinstance(pickle.loads(pickle.dumps(err)).code, str)


def test_errors_survive_pickling_across_processes() -> None:
    err = ServiceUnavailableError("busy", code="server_overloaded", retry_after_s=3.2)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ServiceUnavailableError)
    assert (back.message, back.code, back.retry_after_s) == ("busy", "server_overloaded", 3.2)
    assert back.headers() == {"Retry-After": "3"}
