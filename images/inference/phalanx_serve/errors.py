"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from phalanx_serve.protocol import error_json


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
        problems = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":
                problems.append(f"request body is not valid JSON ({err.get('msg')})")
                continue
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        first = exc.errors()[0] if exc.errors() else {}
        param = None
        if first.get("type") != "json_invalid":
            param = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error_response(
            400,
            "; ".join(problems) or "invalid request",
            "invalid_request_error",
            None,
            param or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _TYPE_BY_STATUS.get(exc.status_code, "invalid_request_error")
        return error_response(
            exc.status_code,
            str(exc.detail),
            type_,
            headers=dict(exc.headers) if exc.headers else None,
        )
