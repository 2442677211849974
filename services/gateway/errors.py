"""Every error the gateway answers, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

OpenAI clients read `error.message` and `error.param` to tell the user what to fix, so every
failure path (our own checks, Litestar's body validation, unknown routes, a backend that
refused, died or went silent) ends in this one body, with the HTTP status the client's retry
logic expects (429 and 5xx are retried by the official client, 4xx are not).
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

log = structlog.get_logger("gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error that becomes one HTTP response with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


RETRY_AFTER_S = 1  # what a 429 asks a client to wait (the official client honours `Retry-After`)


def too_many(message: str, code: str | None = None) -> APIError:
    """A 429 with `Retry-After`, so that clients back off rather than hammer a full cluster."""
    return APIError(429, message, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _response(error: APIError, headers: dict[str, str] | None = None) -> Response[dict[str, Any]]:
    return Response(error.body(), status_code=error.status, headers=headers)


def on_api_error(request: Request[Any, Any, Any], exc: APIError) -> Response[dict[str, Any]]:
    return _response(exc, exc.headers)


_FIELD = re.compile(r"`(\w+)`")


def on_validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    """Litestar's body validation (wrong types, values out of range, missing or unknown fields) as an
    OpenAI 400 naming the field."""
    extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra else {}
    message = str(extra.get("message") or exc.detail) if isinstance(extra, dict) else str(exc.detail)
    param = extra.get("key") if isinstance(extra, dict) else None
    if isinstance(param, str):
        param = param.replace("[...]", "")  # msgspec's name for "a value of this object": the field is the object
    if "unknown field" in message:  # named only inside the message; `param` is the object holding it
        found = _FIELD.search(message)
        if found:
            param = found.group(1) if param in (None, "data") else f"{param}.{found.group(1)}"
            return _response(invalid(param, f"Unrecognized request argument supplied: {param}"))
    if param == "data" and message == "'data'":  # Litestar's KeyError when there is no body at all
        return _response(invalid(None, "the request body is empty: send a JSON object"))
    if param == "data":  # the body as a whole; a missing field is named only inside the message
        found = _FIELD.search(message) if "missing required field" in message else None
        param = found.group(1) if found else None
    return _response(invalid(param, f"{param}: {message}" if param else message))


def on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    """Litestar's own errors (unknown route, wrong method, too large a body) in OpenAI's shape.

    Their headers are kept: a 405 carries `Allow`, which HTTP requires."""
    return _response(APIError(exc.status_code, str(exc.detail)), exc.headers)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error", path=request.url.path)
    return _response(APIError(500, f"internal error: {type(exc).__name__}"))


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    APIError: on_api_error,
    ValidationException: on_validation_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}
