"""Every error the API answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the status
that says what went wrong (400 bad input, 401 no or wrong key, 403 not allowed, 404, 413 too large, 429 queue
full, 503 no model). Clients get a sentence, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..protocol import ConversationBusy, EngineClosed, PromptTooLong, QueueFull

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def backend_error(exc: Exception, retry_after_s: int = 1) -> ApiError:
    """What a backend's refusal means to an HTTP client."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineClosed):
        return ApiError(503, "the model was unloaded or replaced just now; try again", "model_unloaded")
    if isinstance(exc, ConversationBusy):
        return ApiError(409, str(exc), "conversation_busy")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), "context_length_exceeded", "messages")
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc))
    raise exc


def _where(error: dict) -> str:
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body")


def describe_validation_error(exc: RequestValidationError) -> str:
    """One readable line per problem: 'messages.0.role: Input should be ...'."""
    parts = []
    for error in exc.errors()[:5]:
        if error.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{_where(error) or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


def validation_error(exc: RequestValidationError) -> ApiError:
    """A body the schema refuses: 400 (OpenAI's status for it, not FastAPI's 422), `param` naming the first field
    at fault ("model" when it is missing)."""
    first = (exc.errors() or [{}])[0]
    param = None if first.get("type") == "json_invalid" else _where(first) or None
    return ApiError(400, describe_validation_error(exc), param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("API request failed")
        return JSONResponse(
            error_body(500, f"internal error ({type(exc).__name__}); the server log has details"), status_code=500
        )
