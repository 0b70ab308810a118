"""Every error leaves the server in OpenAI's envelope:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("cleave.router")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request that cannot be served, with the status and envelope to answer it."""

    def __init__(
        self, status_code: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status_code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


# pydantic names the branch of a union it tried (``str``, ``list[int]``) inside the
# error location; those are types, not fields.
_UNION_BRANCHES = {"str", "int", "float", "bool", "none"}


def _field_path(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_BRANCHES or "[" in part:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _message(error: dict[str, Any]) -> str:
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """Map FastAPI's 422 (or a request model's own ``ValidationError``) to OpenAI's 400,
    naming the offending field."""
    errors = list(exc.errors()) or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {_message(first)}", code="invalid_json")
    param = _field_path(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return APIError(400, "The request body is missing or empty.", code="invalid_request")
    if first.get("type") == "missing":
        return APIError(400, f"{param}: this field is required", param=param, code="missing_required_parameter")
    # A value that fits no branch of a union fails once per branch; say it once.
    same_field = [e for e in errors if _field_path(tuple(e.get("loc", ()))) == param]
    reasons = list(dict.fromkeys(_message(e) for e in same_field))
    message = f"{param}: {' or '.join(reasons)}" if param else " or ".join(reasons)
    others = len(errors) - len(same_field)
    if others:
        message += f" (and {others} more error{'s' if others > 1 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def install_handlers(app: FastAPI, on_error: Callable[[Request, int], None]) -> None:
    """Route every failure through the envelope; ``on_error`` counts it in metrics."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        on_error(request, exc.status_code)
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        on_error(request, error.status_code)
        return error.to_response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        on_error(request, exc.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"No route for {request.method} {request.url.path}"
        return APIError(exc.status_code, message, code=code).to_response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        on_error(request, 500)
        return internal_error().to_response()
