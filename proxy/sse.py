"""Server-sent events: an incremental parser (WHATWG rules), readers over aiohttp bodies, and
the encoder for what the proxy and the engine server send."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, NamedTuple

from irminsul.proxy.errors import UpstreamStreamError, upstream_error_message

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # nginx would otherwise hold events back
DONE = "[DONE]"
_NEWLINE = re.compile(r"[\r\n]")
_SPLIT_LINES = re.compile(r"\r\n|\r|\n")


class SSEEvent(NamedTuple):
    event: str | None  # None when the stream named no event type ("message" by the spec)
    data: str
    id: str | None = None  # the last event id seen so far
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Feed bytes in any split; get the events each feed completes.

    Lines end with CRLF, LF or CR; fields `event`, `data` (joined by LF), `id`, `retry`;
    lines starting with ":" are comments; a blank line dispatches. Invalid UTF-8 is replaced,
    as the spec says. One leniency: :meth:`close` dispatches an event that has data but lost
    its final blank line, since an upstream cut short should not lose its last chunk.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._first = True
        self._event: str | None = None
        self._data: list[str] | None = None
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Events completed by ``data``. Changes the parser's buffered state."""
        return self._take(self._decoder.decode(data), final=False)

    def close(self) -> list[SSEEvent]:
        """Events left at the end of the stream (see the class docstring)."""
        events = self._take(self._decoder.decode(b"", final=True), final=True)
        if self._buf:
            events.extend(self._line(self._buf))
            self._buf = ""
        if self._data is not None:
            events.extend(self._line(""))
        return events

    def _take(self, text: str, *, final: bool) -> list[SSEEvent]:
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        buf = self._buf + text
        events: list[SSEEvent] = []
        pos = 0
        while (m := _NEWLINE.search(buf, pos)) is not None:
            i = m.start()
            if buf[i] == "\r":
                if i + 1 == len(buf) and not final:
                    break  # a CR at the end may be the first half of a CRLF
                end = i + 2 if buf.startswith("\n", i + 1) else i + 1
            else:
                end = i + 1
            events.extend(self._line(buf[pos:i]))
            pos = end
        self._buf = buf[pos:]
        return events

    def _line(self, line: str) -> list[SSEEvent]:
        if not line:
            if self._data is None:
                self._event = None
                return []
            event = SSEEvent(self._event, "\n".join(self._data), self._last_id, self._retry)
            self._event, self._data = None, None
            return [event]
        if line.startswith(":"):
            return []
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data = [*(self._data or ()), value]
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return []


def _byte_chunks(source: Any) -> AsyncIterable[bytes]:
    content = getattr(source, "content", None)  # an aiohttp ClientResponse
    if content is not None and hasattr(content, "iter_any"):
        return content.iter_any()
    if hasattr(source, "iter_any"):  # an aiohttp StreamReader
        return source.iter_any()
    return source


async def aiter_sse(source: Any) -> AsyncIterator[SSEEvent]:
    """Events from an aiohttp ClientResponse or StreamReader, or any async iterable of bytes."""
    parser = SSEParser()
    async for chunk in _byte_chunks(source):
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event


async def aiter_chat_chunks(source: Any) -> AsyncIterator[dict]:
    """The JSON objects of an OpenAI-style stream, up to ``data: [DONE]``.

    Raises :class:`UpstreamStreamError` for an `error` event, a payload with an "error" key
    (SGLang and vLLM report mid-stream failures that way) or data that is not JSON.
    """
    async for event in aiter_sse(source):
        if event.data.strip() == DONE:
            return
        try:
            payload = event.json()
        except ValueError:
            raise UpstreamStreamError(f"upstream sent a non-JSON event: {event.data[:200]!r}")
        if event.event == "error" or (isinstance(payload, dict) and "error" in payload):
            raise UpstreamStreamError(upstream_error_message(502, payload), body=payload)
        if not isinstance(payload, dict):
            raise UpstreamStreamError(f"upstream sent a non-object event: {event.data[:200]!r}")
        yield payload


def encode_event(data: Any, event: str | None = None, id: str | None = None) -> bytes:
    """One event as wire bytes. ``data`` that is not a string is sent as compact JSON; a string
    with line breaks becomes several data lines, which the parser joins back with LF."""
    lines = []
    for name, value in (("event", event), ("id", id)):
        if value is not None:
            if _NEWLINE.search(value):
                raise ValueError(f"SSE {name} must not contain a line break: {value!r}")
            lines.append(f"{name}: {value}")
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    lines.extend(f"data: {part}" for part in _SPLIT_LINES.split(data))
    return ("\n".join(lines) + "\n\n").encode()


def encode_done() -> bytes:
    return b"data: [DONE]\n\n"


def encode_named(events: list[tuple[str, dict]]) -> bytes:
    """(event name, data) pairs -- what the stream translators return -- as wire bytes."""
    return b"".join(encode_event(data, event=name) for name, data in events)
