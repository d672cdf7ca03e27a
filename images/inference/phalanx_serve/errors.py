"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from phalanx_serve.protocol import error_json

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_json(message, type_, code, param), status_code=status, headers=headers
    )


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """One sentence per problem (at most three), and the first offending field."""
    problems: list[str] = []
    params: list[str] = []
    for err in errors:
        kind = err.get("type")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc)
        if kind == "json_invalid":
            problems.append(f"request body is not valid JSON ({err.get('msg')})")
            continue
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            text = f"Unrecognized request argument supplied: {field}"
        elif kind == "missing":
            text = f"{field} is required"
        elif field and not msg.startswith(loc[-1]):
            text = f"{field}: {msg}"
        else:
            text = msg
        if text not in problems:
            problems.append(text)
            params.append(field)
    param = next((p for p in params if p), None)
    return "; ".join(problems[:3]) or "invalid request", param


_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def install_error_handlers(app: FastAPI, on_invalid: Callable[[], None] = lambda: None) -> None:
    """``on_invalid`` is called for every 400 (the rejection counter)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status == 400:
            on_invalid()
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Malformed JSON and out-of-range fields alike are the client's to fix: 400, not 422.
        on_invalid()
        errors = list(exc.errors())
        message, param = describe_validation_errors(errors)
        return error_response(400, message, "invalid_request_error", None, param)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault; still an OpenAI-shaped body rather than plain text.
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _TYPE_BY_STATUS.get(exc.status_code, "invalid_request_error")
        return error_response(
            exc.status_code,
            str(exc.detail),
            type_,
            headers=dict(exc.headers) if exc.headers else None,
        )
