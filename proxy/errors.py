"""Error bodies in the two API shapes clients parse, and the errors translation raises.

OpenAI:    {"error": {"message", "type", "param", "code"}}
Anthropic: {"type": "error", "error": {"type", "message"}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

# Anthropic's documented error types by HTTP status; anything else >= 500 is api_error.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# OpenAI's error `type` values as its API returns them for these statuses.
OPENAI_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class TranslationError(ValueError):
    """A request (status 400) or an upstream answer (status 502) that cannot be translated."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class UpstreamStreamError(RuntimeError):
    """An upstream stream that carried an error payload or broke its format."""

    def __init__(self, message: str, *, status: int = 502, body: Any = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body


def anthropic_error_type(status: int) -> str:
    if status in ANTHROPIC_ERROR_TYPES:
        return ANTHROPIC_ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def openai_error_type(status: int) -> str:
    if status in OPENAI_ERROR_TYPES:
        return OPENAI_ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(status: int, message: str, *, type: str | None = None) -> dict:
    return {"type": "error", "error": {"type": type or anthropic_error_type(status),
                                       "message": message}}


def openai_error_body(
    status: int, message: str, *, type: str | None = None, param: str | None = None,
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type or openai_error_type(status),
                      "param": param, "code": code}}


def error_response(api: str, status: int, message: str, *, param: str | None = None
                   ) -> web.Response:
    """A JSON error response in the shape of ``api``: "anthropic" or "openai" (chat,
    completions and Responses all use the OpenAI shape)."""
    if api == "anthropic":
        body = anthropic_error_body(status, message)
    elif api == "openai":
        body = openai_error_body(status, message, param=param)
    else:
        raise ValueError(f"unknown API shape {api!r}")
    return web.json_response(body, status=status)


def translation_error_response(api: str, err: TranslationError) -> web.Response:
    return error_response(api, err.status, err.message, param=err.param)


def upstream_error_message(status: int, body: Any) -> str:
    """The human message inside an upstream error body of any shape (OpenAI, Anthropic,
    FastAPI's {"detail": ...}, SGLang's {"message": ...}, or plain text)."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            text = body.strip()
            return text[:2000] if text else f"upstream answered HTTP {status}"
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if isinstance(body.get(key), str):
                return body[key]
        if body.get("detail") is not None:
            return json.dumps(body["detail"], ensure_ascii=False)[:2000]
    return f"upstream answered HTTP {status}"
