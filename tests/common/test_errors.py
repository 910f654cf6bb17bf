from __future__ import annotations

import pickle

from serve_app.common.errors import InvalidRequestError, ServiceUnavailableError, error_body


def test_error_body_has_all_four_keys() -> None:
    body = error_body(InvalidRequestError("bad", param="n"))
    assert body == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }


def test_errors_survive_pickling_across_processes() -> None:
    err = ServiceUnavailableError("busy", code="server_overloaded", retry_after_s=3.2)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ServiceUnavailableError)
    assert (back.message, back.code, back.retry_after_s) == ("busy", "server_overloaded", 3.2)
    assert back.headers() == {"Retry-After": "3"}
