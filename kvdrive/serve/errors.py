"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``
with its status codes, for every failure the server answers (the openai client maps the
status to its exception class)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvdrive.serve.protocol import ErrorResponse

log = logging.getLogger("kvdrive.serve")

# status -> the error type OpenAI gives it
TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# the documented answers of every /v1 route, for the OpenAPI schema
RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)}
# the generation routes also stream (``"stream": true``)
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}  # one server-sent event
STREAMING = {
    **RESPONSES,
    200: {
        "content": {"text/event-stream": {"schema": _EVENT}},
        "description": "the response, or with stream: server-sent events of chunks, the last one 'data: [DONE]'",
    },
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.status, err.message, err.param, err.code), status_code=err.status, headers=err.headers
    )


def install(app: FastAPI) -> None:
    """Answer every error in the OpenAI shape: ours, the request body's validation (400, where
    FastAPI says 422), unknown routes and methods, and bugs (500, logged)."""

    @app.exception_handler(APIError)
    async def _api(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error_response(validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return error_response(APIError(err.status_code, str(err.detail), headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(err).__name__} (see the server log)"))


def validation_error(errors) -> APIError:
    """The first of pydantic's errors as a 400 naming the field (OpenAI's wording for unknown ones)."""
    first = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}", param=".".join(loc))
    if kind == "missing" and not loc:
        return APIError(400, "the request needs a JSON body")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    # a union's alternatives add their type to the location (prompt.str, prompt.list[int]): name the field
    param = ".".join(p for p in loc if not p.startswith(("str", "list[", "dict[", "function-", "int", "float")))
    return APIError(400, f"{param}: {msg}" if param else msg, param=param or None)
