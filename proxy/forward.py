"""Talking to the upstream: headers to pass on, failures mapped to statuses, plain relaying.

Failures before the upstream answered become :class:`UpstreamFailure`: connection refused or
reset -> 502, silence longer than --upstream-timeout -> 504. Authorization and x-api-key are
relayed (the upstream may check them) and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web

from irminsul.proxy.upstream import Upstream

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones aiohttp sets itself for the new message.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
})  # fmt: skip
REQUEST_DROP = HOP_BY_HOP | {"accept-encoding"}  # ask the upstream for identity encoding
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "date", "server"}


class UpstreamFailure(Exception):
    """The upstream gave no HTTP answer: ``status`` is 502 or 504."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(Exception):
    pass


def request_headers(headers: Mapping[str, str], *, json_body: bool = True) -> dict[str, str]:
    """Client headers to send upstream (multi-valued headers keep their last value)."""
    out = {k: v for k, v in headers.items() if k.lower() not in REQUEST_DROP}
    if json_body:
        out = {k: v for k, v in out.items() if k.lower() != "content-type"}
        out["Content-Type"] = "application/json"
    return out


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in RESPONSE_DROP}


def failure_of(exc: BaseException, what: str = "upstream") -> UpstreamFailure:
    """The UpstreamFailure for a client-side exception (timeouts first: aiohttp's timeout
    errors are also ClientErrors)."""
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure(504, f"{what} did not answer within the upstream timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, f"{what} refused the connection: {exc.os_error or exc}")
    return UpstreamFailure(502, f"{what} failed: {type(exc).__name__}: {exc}")


STREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@contextlib.asynccontextmanager
async def upstream_call(up: Upstream, method: str, path: str, *, query: str = "",
                        headers: Mapping[str, str] | None = None, data: bytes | None = None
                        ) -> AsyncIterator[aiohttp.ClientResponse]:
    """The upstream's response (headers received); raises UpstreamFailure if none came.
    Leaving the block early (a client that went away) closes the upstream connection, which
    is how the upstream learns to stop generating."""
    try:
        cm = up.session.request(method, up.url(path, query), headers=headers, data=data,
                                allow_redirects=False)
        resp = await cm.__aenter__()
    except STREAM_ERRORS as e:
        raise failure_of(e) from e
    try:
        yield resp
    except BaseException:
        resp.close()  # unread body: drop the connection rather than reuse it
        raise
    finally:
        await cm.__aexit__(None, None, None)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (BodyTooLarge) without reading
    an oversized body whole."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body of {request.content_length} bytes exceeds the "
                           f"limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def relay(request: web.Request, up: Upstream, limit: int) -> web.StreamResponse:
    """Pass a request the proxy does not interpret (GET /v1/models, /health, unknown /v1
    POSTs...) to the upstream and its answer back, streamed as it arrives."""
    try:
        body = await read_body(request, limit)
    except BodyTooLarge as e:
        return web.json_response({"error": {"message": str(e), "type": "invalid_request_error",
                                            "param": None, "code": None}}, status=413)
    headers = request_headers(request.headers, json_body=False)
    try:
        async with upstream_call(up, request.method, request.path, query=request.query_string,
                                 headers=headers, data=body or None) as resp:
            out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                     headers=response_headers(resp.headers))
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except STREAM_ERRORS as e:  # cut the client's response short, as ours was
                log.warning("relay of %s %s broke: %s", request.method, request.path, e)
                if request.transport is not None:
                    request.transport.close()
                return out
            await out.write_eof()
            return out
    except UpstreamFailure as e:
        return web.json_response({"error": {"message": e.message, "type": "server_error",
                                            "param": None, "code": None}}, status=e.status)
