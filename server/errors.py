"""OpenAI's error envelope, built in one place, and the exception handlers that turn every failure into it.

`{"error": {"message", "type", "param", "code"}}`: all four keys always present, `param` and `code` strings or null.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.jobs import EngineUnavailable, JobCancelled, ModelLoadFailed, OutOfDeviceMemory, QueueFull

log = logging.getLogger("flux2.server")

_TYPES_BY_STATUS = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded"}


class APIError(Exception):
    """An error to answer with OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if status >= 500 else _TYPES_BY_STATUS.get(status, "invalid_request_error"))
        self.headers = headers


class RequestTimeout(Exception):
    """A request ran past --request-timeout; its job was cancelled."""

    def __init__(self, limit: float):
        super().__init__(f"request timeout after {limit:g} s")
        self.limit = limit


def engine_error(exc: BaseException) -> APIError:
    """How every failure of the engine (or of waiting for it) is answered, as JSON or as a stream's error event:
    the one place engine exceptions become HTTP."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        retry = math.ceil(exc.retry_after)
        return APIError(
            429,
            f"The server is busy: {exc}. Retry in about {retry} s.",
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, ModelLoadFailed):
        return APIError(
            503, f"The model is not available: {exc}. Its operator must fix that first.", code="model_not_ready"
        )
    if isinstance(exc, EngineUnavailable):
        return APIError(503, f"The model is not ready ({exc}); retry shortly.", code="model_not_ready")
    if isinstance(exc, RequestTimeout):
        return APIError(
            504,
            f"The request took longer than the server's limit of {exc.limit:g} s and was cancelled.",
            code="timeout",
            headers={"x-should-retry": "false"},
        )
    if isinstance(exc, OutOfDeviceMemory):
        return APIError(
            503,
            "The GPU ran out of memory for this request, even one image at a time. Try a smaller "
            "size or fewer reference images.",
            code="out_of_memory",
        )
    if isinstance(exc, JobCancelled):
        return APIError(503, f"The job was cancelled: {exc}.", code="cancelled")
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


def invalid_param(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, error.type, error.param, error.code), status_code=error.status, headers=error.headers
    )


class ClientGone(Exception):
    """The client disconnected while its request waited; nothing is sent back."""


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_exception_handler(APIError, _on_api_error)
    for engine_exception in (QueueFull, EngineUnavailable, RequestTimeout, OutOfDeviceMemory, JobCancelled):
        app.add_exception_handler(engine_exception, _on_engine_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    # Anything else is caught by UnexpectedErrorMiddleware, inside the request-id middleware.


async def _on_engine_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(engine_error(exc))


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; the status is for logs and metrics


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = validation_error(exc.errors())
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if error.code == "invalid_json" and content_type != "application/json":
        # `curl -d '{...}'` sends form-urlencoded: the JSON is fine, its label is not (a POST without one is JSON:
        # json_default.py)
        message = f"Send the body as JSON with Content-Type: application/json (got '{content_type}')."
        error = APIError(400, message, code="invalid_json")
    return error_response(error)


def validation_error(errors: list[dict] | tuple) -> APIError:
    """The first pydantic/FastAPI validation error as a 400 naming the parameter."""
    if not errors:
        return APIError(400, "Invalid request.", code="invalid_request")
    first = errors[0]
    param = parameter_path(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "missing" and param is None:  # no body at all
        return APIError(400, "The request body is empty: send a JSON object.", code="invalid_json")
    if kind == "missing":
        message = f"Missing required parameter: '{param}'."
        if isinstance(first.get("input"), dict) and "file_id" in first["input"]:  # OpenAI's other way to name an image
            message += " file_id is not supported (this server keeps no uploaded files): send image_url, a data: URI."
        return APIError(400, message, param=param, code="missing_required_parameter")
    if kind in ("json_invalid", "json_type") or (param is None and kind == "model_attributes_type"):
        return APIError(400, "The request body is not a valid JSON object.", code="invalid_json")
    message = "the number is too large" if kind == "int_parsing_size" else first.get("msg", "Invalid value")
    return APIError(
        400, f"Invalid value for '{param}': {message}." if param else f"{message}.", param=param, code="invalid_value"
    )


def parameter_path(location: Sequence[int | str]) -> str | None:
    """A validation error's location as OpenAI names parameters: `images[0].image_url`, without where it was read
    from (body, query, ...) nor the union member pydantic tried (`ImageURL`, `str`, `function-after[...]`): every
    field of the API is snake_case, every member tag is not."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("body", "query", "path", "form") and not path:
            continue
        elif _FIELD_NAME.fullmatch(part) and part not in _UNION_MEMBER_TYPES:
            path += f".{part}" if path else part
    return path or None


_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_UNION_MEMBER_TYPES = {"str", "int", "float", "bool", "bytes", "list", "dict", "none", "tuple", "set"}


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"Unknown path: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR:  # bad UTF-8, JSON nested too deep
        return error_response(APIError(400, "The request body is not valid JSON.", code="invalid_json"))
    else:
        message = str(exc.detail)
    status = exc.status_code
    return error_response(APIError(status, message, code=_HTTP_CODES.get(status), headers=exc.headers))


_FASTAPI_BODY_ERROR = "There was an error parsing the body"  # FastAPI's detail when a JSON body cannot be decoded


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class SendTracker:
    """An ASGI `send` that remembers whether the response has started (after that, no error answer can be sent)."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class UnexpectedErrorMiddleware:
    """The last resort: an exception nothing else handled becomes a 500 in OpenAI's envelope, logged with a trace.
    It sits inside the request-id middleware, so the answer carries `x-request-id` and the log line names it
    (Starlette's own catch-all runs outside every middleware)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = SendTracker(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if tracked.started:  # a streamed answer already began: nothing more can be said in HTTP
                raise
            response = error_response(
                APIError(500, "The server had an error while processing your request.", code="internal_error")
            )
            await response(scope, receive, send)
