"""Typed API errors: what any failure a client can see is, and its wire shape.

Every failure a client can see is an `APIError`: both deployments raise them (the replica's cross
the handle pickled), so they are plain Python, no torch, no HTTP framework, no Ray. `error_body`
is the one place that knows the wire shape `{"error": {"message", "type", "param", "code"}}`.
Translating foreign exceptions (Starlette's HTTP statuses, Ray's overload and replica-loss
errors) and writing the HTTP answer are the ingress' (`ingress/errors_http.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error type. Every error has a `code` (clients
    branch on it): the raiser's, else its class's `default_code`."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after_s = retry_after_s
        # Headers the status itself calls for (e.g. a 405's Allow).
        self.extra_headers = dict(extra_headers or {})

    # Keyword-only __init__ arguments are lost by the default pickling, and these errors
    # cross Ray process boundaries.
    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                self.message,
                self.param,
                self.code,
                self.retry_after_s,
                self.extra_headers,
            ),
        )

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return headers


def _rebuild(
    cls: type[APIError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: float | None,
    extra_headers: Mapping[str, str] | None = None,
) -> APIError:
    return cls(
        message, param=param, code=code, retry_after_s=retry_after_s, extra_headers=extra_headers
    )


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": "Bearer"}


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ForbiddenError(APIError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class MethodNotAllowedError(APIError):
    """Carries `Allow` (RFC 9110 15.5.6) in `extra_headers`: the methods the route takes."""

    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeoutError(APIError):
    """The request body did not arrive in time (the client stalled mid-upload)."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_headers_too_large"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class TimeoutError_(APIError):
    """The edit did not finish within the request deadline."""

    status_code = 504
    error_type = "server_error"
    default_code = "timeout"


class RequestCancelledError(APIError):
    """The client went away; nobody reads this answer, but the replica stops work on it."""

    status_code = 499
    error_type = "server_error"
    default_code = "cancelled"


class HTTPStatusError(APIError):
    """A bare HTTP status that has no class of its own (e.g. a 418 from Starlette)."""

    def __init__(
        self, status_code: int, message: str, *, extra_headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, code=f"http_{status_code}", extra_headers=extra_headers)
        self.status_code = status_code
        self.error_type = "invalid_request_error" if status_code < 500 else "server_error"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_status, (self.status_code, self.message, self.extra_headers))


def _rebuild_status(
    status_code: int, message: str, extra_headers: Mapping[str, str]
) -> HTTPStatusError:
    return HTTPStatusError(status_code, message, extra_headers=extra_headers)


def error_body(error: APIError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }
