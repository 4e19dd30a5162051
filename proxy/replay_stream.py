"""Reading one streamed answer for replay: when the first token came, and the usage reported.

Per API shape: OpenAI chat and completions chunks (usage in the last chunk, asked for with
``stream_options.include_usage``), Anthropic events (usage in ``message_start`` and
``message_delta``) and SGLang ``/generate`` chunks (``meta_info``). Cached and reused counts are
taken as the server reports them: ``usage.prompt_tokens_details.cached_tokens``,
``usage.irminsul``, Anthropic ``cache_read_input_tokens``, ``meta_info.cached_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import aiohttp

from irminsul.proxy.errors import upstream_error_message
from irminsul.proxy.first_token import anthropic_event_shows_token, chunk_shows_token
from irminsul.proxy.sse import DONE, aiter_sse
from irminsul.proxy.usage import (
    UpstreamUsage,
    merge,
    read_anthropic,
    read_generate,
    read_openai,
)


class StreamResult(NamedTuple):
    first_token_at: float | None  # time.perf_counter() of the first generated token
    usage: UpstreamUsage | None
    error: str | None  # an error the stream carried, or a format it broke


def _usage(api: str, payload: Mapping) -> UpstreamUsage | None:
    if api == "generate":
        return read_generate(payload.get("meta_info"))
    return read_openai(payload.get("usage"))


async def read_stream(response: Any, api: str) -> StreamResult:
    """Consume an SSE response of the given API shape (openai, completions, anthropic,
    generate). Never raises for what the server sent; a broken stream is an ``error``."""
    first: float | None = None
    usage: UpstreamUsage | None = None
    try:
        async for event in aiter_sse(response):
            if event.data.strip() == DONE:
                break
            try:
                payload = json.loads(event.data)
            except ValueError:
                return StreamResult(first, usage, f"non-JSON event: {event.data[:120]!r}")
            if not isinstance(payload, Mapping):
                return StreamResult(first, usage, f"non-object event: {event.data[:120]!r}")
            if event.event == "error" or "error" in payload:
                return StreamResult(first, usage, upstream_error_message(200, payload))
            if api == "anthropic":
                kind = payload.get("type")
                if first is None and anthropic_event_shows_token(kind, payload):
                    first = time.perf_counter()
                if kind == "message_start":
                    message = payload.get("message")
                    if isinstance(message, Mapping):
                        usage = merge(usage, read_anthropic(message.get("usage")))
                elif kind == "message_delta":
                    usage = merge(usage, read_anthropic(payload.get("usage")))
                continue
            if first is None and chunk_shows_token(api, payload):
                first = time.perf_counter()
            usage = merge(usage, _usage(api, payload))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # dropped mid-stream
        return StreamResult(first, usage, f"stream broken: {type(e).__name__}: {e}")
    return StreamResult(first, usage, None)


def read_whole(payload: Any, api: str) -> StreamResult:
    """A server that answered a streaming request with one JSON object."""
    if not isinstance(payload, Mapping):
        return StreamResult(None, None, "answer is not a JSON object")
    if api == "anthropic":
        return StreamResult(None, read_anthropic(payload.get("usage")), None)
    return StreamResult(None, _usage(api, payload), None)
