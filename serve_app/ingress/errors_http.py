"""Foreign exceptions as API errors, and API errors as HTTP answers.

`to_api_error` is the one translation of an exception into the `APIError` a client sees
(Starlette's HTTP statuses, Ray's back-pressure and lost replicas, anything unexpected as a bare
500); `error_response` is the one renderer of an `APIError` as an HTTP response. The errors
themselves and their JSON shape are shared with the replica (`common/errors.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from serve_app.common.errors import (
    APIError,
    AuthenticationError,
    ForbiddenError,
    HeadersTooLargeError,
    HTTPStatusError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TimeoutError_,
    UnsupportedMediaTypeError,
    error_body,
)


def error_response(error: APIError, *, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The HTTP answer for `error`: its status, the JSON body, Retry-After / WWW-Authenticate."""
    return JSONResponse(
        error_body(error),
        status_code=error.status_code,
        headers={**error.headers(), **(headers or {})},
    )


_STATUS_TO_ERROR: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    408: RequestTimeoutError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    431: HeadersTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
    504: TimeoutError_,
}


def error_for_status(
    status_code: int, message: str, *, extra_headers: Mapping[str, str] | None = None
) -> APIError:
    """An APIError for a bare HTTP status (Starlette's own HTTPExceptions), keeping the headers
    its status calls for (a 405's Allow)."""
    cls = _STATUS_TO_ERROR.get(status_code)
    if cls is None:
        return HTTPStatusError(status_code, message, extra_headers=extra_headers)
    return cls(message, extra_headers=extra_headers)


def to_api_error(exc: BaseException, *, retry_after_s: float | None = None) -> APIError:
    """The APIError a client sees for `exc`: itself if it is one; Starlette's HTTP statuses by
    status; Ray's back-pressure and lost-replica errors as 503 with `retry_after_s`; anything
    else a 500 that reveals nothing of `exc` (log it where it is caught)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):
        return error_for_status(exc.status_code, str(exc.detail), extra_headers=exc.headers)
    from_ray = _from_ray(exc, retry_after_s=retry_after_s)
    if from_ray is not None:
        return from_ray
    return InternalError("The server had an error while processing your request.")


def client_gone(exc: BaseException) -> bool:
    """Whether `exc` says the client went away: Starlette's ClientDisconnect (mid-body), a
    cancellation (Serve cancels a request whose client hung up), or Ray's TaskCancelledError,
    which Serve's `receive` raises for such a request still waiting for its body."""
    from ray.exceptions import TaskCancelledError
    from starlette.requests import ClientDisconnect

    return isinstance(exc, ClientDisconnect | asyncio.CancelledError | TaskCancelledError)


def _from_ray(exc: BaseException, *, retry_after_s: float | None) -> APIError | None:
    # Imported here: Ray is only ever present where its errors can occur (unit tests of the
    # ingress run without a cluster, and this module must stay light).
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return ServiceUnavailableError(
            "The server is at capacity; retry after the delay in Retry-After.",
            code="server_overloaded",
            retry_after_s=retry_after_s,
        )
    lost = ActorDiedError | ActorUnavailableError | RayActorError | DeploymentUnavailableError
    if isinstance(exc, lost):
        return ServiceUnavailableError(
            "The model replica became unavailable; retry the request.",
            code="replica_unavailable",
            retry_after_s=retry_after_s,
        )
    return None
