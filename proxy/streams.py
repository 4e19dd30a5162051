"""Relaying an upstream SSE stream to the client as it arrives, event by event.

``relay_sse`` owns the loop; an :class:`EventHandler` per API decides what each upstream event
becomes (unchanged, usage rewritten, dropped, translated to another API's events), notes usage
and the first generated content on the Exchange, and says whether the stream completed.

Failures: an upstream that breaks, falls silent past --upstream-timeout, sends an error event
or ends without its final event gets one error event in the client's API shape, then the
stream ends. A client that goes away ends the relay at once; leaving the upstream response
unread then closes that connection, which cancels the generation upstream.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

import aiohttp
from aiohttp import web

from irminsul.proxy.errors import TranslationError, UpstreamStreamError
from irminsul.proxy.exchange import CLIENT_CLOSED, Exchange
from irminsul.proxy.forward import STREAM_ERRORS, failure_of
from irminsul.proxy.sse import SSE_HEADERS, SSEEvent, SSEParser

log = logging.getLogger(__name__)


class StreamBroken(Exception):
    """The upstream stream cannot go on (status 502)."""


class ClientGone(Exception):
    pass


class EventHandler(Protocol):
    def event(self, ev: SSEEvent) -> bytes:
        """Bytes to send the client for one upstream event (b"" for none). May raise
        StreamBroken / UpstreamStreamError / TranslationError."""

    def end(self) -> bytes:
        """Called once the upstream stream ended cleanly; the last bytes to send. Raises
        StreamBroken if the stream stopped before its final event."""

    def error(self, status: int, message: str) -> bytes:
        """The error event that ends a failed stream, in the client's API shape."""


async def _write(out: web.StreamResponse, data: bytes) -> None:
    if not data:
        return
    try:
        await out.write(data)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError) as e:
        raise ClientGone from e


async def relay_sse(request: web.Request, upstream: aiohttp.ClientResponse, ex: Exchange,
                    handler: EventHandler) -> web.StreamResponse:
    """Stream ``upstream`` (a 200 SSE response) to the client through ``handler``.
    Sets ex.status / ex.error; returns the prepared client response."""
    out = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await out.prepare(request)
    parser = SSEParser()
    failure: tuple[int, str] | None = None
    try:
        try:
            async for raw in upstream.content.iter_any():
                await _write(out, b"".join(handler.event(ev) for ev in parser.feed(raw)))
            tail = b"".join(handler.event(ev) for ev in parser.close())
            await _write(out, tail + handler.end())
        except ClientGone:
            raise
        except (StreamBroken, UpstreamStreamError, TranslationError) as e:
            failure = (getattr(e, "status", 502), str(e))
        except STREAM_ERRORS as e:
            f = failure_of(e, "upstream stream")
            failure = (f.status, f.message)
        if failure is not None:
            ex.fail(*failure)
            log.warning("%s stream failed: %s", ex.endpoint, failure[1])
            await _write(out, handler.error(*failure))
        await out.write_eof()
    except ClientGone:
        ex.fail(CLIENT_CLOSED, "client disconnected during the stream")
        return out
    ex.finish(200)
    return out


def loads(data: str):
    """JSON of an event's data, or None if it is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        return None
