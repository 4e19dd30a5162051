"""Answering a request early with an error in its API's shape, and reading bodies."""

from __future__ import annotations

from aiohttp import web

from irminsul.proxy import shapes
from irminsul.proxy.errors import error_response
from irminsul.proxy.exchange import Exchange
from irminsul.proxy.forward import STREAM_ERRORS, BodyTooLarge, failure_of, read_body
from irminsul.proxy.json_codec import loads
from irminsul.proxy.state import ProxyState


class Reply(Exception):
    """Answer the client with ``response`` now (an error found while serving)."""

    def __init__(self, response: web.StreamResponse):
        self.response = response


def fail(api: str, ex: Exchange, status: int, message: str, param: str | None = None) -> Reply:
    """Record the failure on ``ex``; the Reply (to raise) carries the API's error JSON."""
    ex.fail(status, message)
    return Reply(error_response(shapes.error_shape(api), status, message, param=param))


async def read_json(request: web.Request, st: ProxyState, api: str, ex: Exchange
                    ) -> tuple[bytes, dict]:
    """(raw bytes, parsed object) of the request body; raises a Reply for 413 / 400."""
    try:
        raw = await read_body(request, st.config.max_body_bytes)
    except BodyTooLarge as e:
        raise fail(api, ex, 413, str(e)) from None
    try:
        body = loads(raw)  # json.loads, faster (proxy/json_codec.py)
    except ValueError as e:
        raise fail(api, ex, 400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise fail(api, ex, 400, "request body must be a JSON object")
    return raw, body


async def read_all(resp) -> bytes:
    """An upstream response's whole body; UpstreamFailure if the upstream breaks off."""
    try:
        return await resp.read()
    except STREAM_ERRORS as e:
        raise failure_of(e) from e
