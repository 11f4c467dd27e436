"""OpenAI's error JSON shape for every failure, including FastAPI's own validation errors.

`{"error": {"message", "type", "param", "code"}}` is what the openai client parses into its
exception classes; Ollama clients read `{"error": "..."}`, and the Ollama routes get that shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from devstral.errors import ContextOverflowError, DevstralError, NonFiniteLogitsError

log = logging.getLogger("devstral.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy_error"}


class APIError(Exception):
    """An answer other than 2xx, raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_exception(exc: BaseException) -> APIError:
    """Map what the engine raises to an HTTP answer; anything unexpected is a 500 (and is logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, NonFiniteLogitsError):  # the model's fault, not the request's
        log.error("%s", exc)
        return APIError(500, str(exc), code="nan_logits")
    if isinstance(exc, DevstralError):
        return APIError(400, str(exc))
    log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def _is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def error_response(request: Request, err: APIError) -> JSONResponse:
    if _is_ollama(request):
        body: dict[str, Any] = {"error": err.message}
    else:
        body = error_body(err.status, err.message, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first pydantic error as one line naming the field, e.g. `messages.0.role: Field required`."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', msg)}", None
    if field is None and first.get("type") == "missing":
        return "request body is missing: expected a JSON object", None
    return (f"{field}: {msg}" if field else msg), field


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried (`literal[...]`, `list[int]`, `NamedToolChoice`)
    in the error location; the user only needs the field."""
    if not isinstance(part, str):
        return False
    return part in _UNION_TAGS or "[" in part or part[:1].isupper() or part.startswith("function-")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(DevstralError)
    async def _user_error(request: Request, exc: DevstralError) -> JSONResponse:
        return error_response(request, from_exception(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = describe_validation(list(exc.errors()))
        return error_response(request, APIError(400, message, param=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, from_exception(exc))
