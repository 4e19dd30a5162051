"""From a job's worker events to response bodies: each endpoint's stream of chunk objects and
the one-shot collector for non-streaming requests.

The handler that submitted a job cancels it in a ``finally`` (a no-op once it finished), so a
client that disconnects, or a stream whose consumer stops early, stops the engine too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from aiohttp import web

from ...proxy.anthropic_stream import MessageStream
from ...proxy.errors import openai_error_body
from ...proxy.responses_stream import ResponsesStream
from ...proxy.sse import encode_done, encode_event, encode_named
from .output_text import ParsedOutput, ToolCallStream, parse_tool_calls
from .protocol import GenerationRequest
from .replies import chat_chunk, completion_json, completion_usage_chunk, generate_json, usage_json
from .worker import Failed, Finished, GenerationJob, TextDelta

# How often a non-streaming request checks that its client is still connected. aiohttp (>=3.9)
# does not cancel handlers on disconnect by default, and a non-streaming handler writes nothing
# until the end, so without this check a vanished client would keep the engine busy.
_DISCONNECT_POLL_S = 0.5


class EngineFailed(Exception):
    """The engine raised while serving the request (a server error, not the client's)."""


class Collected(NamedTuple):
    text: str
    output_ids: list[int]
    done: Finished


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def job_events(job: GenerationJob, request: web.BaseRequest) -> AsyncIterator[Any]:
    """The job's TextDelta events then its Finished; stops early if the client disconnects."""
    while True:
        # Checked before every wait, not only when one times out: while tokens flow, events
        # arrive faster than the poll interval and a timeout would never come.
        if client_gone(request):
            job.cancel()
            return
        try:
            event = await asyncio.wait_for(job.events.get(), _DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue
        if isinstance(event, Failed):
            raise EngineFailed(event.message)
        yield event
        if isinstance(event, Finished):
            return


async def collect(job: GenerationJob, request: web.BaseRequest) -> Collected | None:
    """The whole output, or None if the client went away first."""
    text: list[str] = []
    ids: list[int] = []
    async for event in job_events(job, request):
        if isinstance(event, TextDelta):
            text.append(event.text)
            ids.extend(event.token_ids)
        else:
            return Collected("".join(text), ids, event)
    return None


def parse_output(req: GenerationRequest, text: str) -> ParsedOutput:
    return parse_tool_calls(text) if req.parse_tools else ParsedOutput(text, ())


async def generate_chunks(job: GenerationJob, req: GenerationRequest, request: web.BaseRequest,
                          started: float) -> AsyncIterator[dict]:
    """SGLang /generate stream: every chunk carries the cumulative text and output_ids."""
    text, ids = "", []
    async for event in job_events(job, request):
        if isinstance(event, TextDelta):
            if event.token_ids or event.text:
                text += event.text
                ids.extend(event.token_ids)
                yield generate_json(req, text, ids, None, started)
        else:
            yield generate_json(req, text, ids, event, started)


async def chat_chunks(job: GenerationJob, req: GenerationRequest,
                      request: web.BaseRequest) -> AsyncIterator[dict]:
    """chat.completion.chunk objects: role first, content deltas, tool calls, finish, usage."""
    created = int(time.time())
    yield chat_chunk(req, created, {"role": "assistant", "content": ""})
    tools = ToolCallStream() if req.parse_tools else None
    async for event in job_events(job, request):
        if isinstance(event, TextDelta):
            text = tools.feed(event.text) if tools is not None else event.text
            if text:
                yield chat_chunk(req, created, {"content": text})
            continue
        parsed = tools.finish() if tools is not None else ParsedOutput("", ())
        if parsed.content:
            yield chat_chunk(req, created, {"content": parsed.content})
        if parsed.tool_calls:
            calls = [c.to_openai(i) for i, c in enumerate(parsed.tool_calls)]
            yield chat_chunk(req, created, {"tool_calls": calls})
        yield chat_chunk(req, created, {}, event, tool_calls=bool(parsed.tool_calls))
        if req.include_usage:
            yield chat_chunk(req, created, None, usage=usage_json(req, event))


async def completion_chunks(job: GenerationJob, req: GenerationRequest,
                            request: web.BaseRequest) -> AsyncIterator[dict]:
    """text_completion stream: text deltas, a finish chunk, then usage if asked for."""
    created = int(time.time())
    async for event in job_events(job, request):
        if isinstance(event, TextDelta):
            if event.text:
                yield completion_json(req, event.text, None, created, chunk=True)
            continue
        yield completion_json(req, "", event, created, chunk=True)
        if req.include_usage:
            yield completion_usage_chunk(req, event, created)


# ---- wire framing: OpenAI data lines, or the proxy's Anthropic / Responses translators ----


class OpenAIFraming:
    """chat/completions/generate chunks as ``data:`` lines, then ``data: [DONE]``."""

    def chunk(self, obj: dict) -> bytes:
        return encode_event(obj)

    def end(self) -> bytes:
        return encode_done()

    def fail(self, message: str) -> bytes:
        # SGLang and vLLM report a mid-stream failure as a data line holding an error object.
        return encode_event(openai_error_body(500, message)) + encode_done()


class AnthropicFraming:
    """Chat chunks translated into the Messages event stream (proxy/anthropic_stream.py)."""

    def __init__(self, translator: MessageStream):
        self.translator = translator

    def chunk(self, obj: dict) -> bytes:
        return encode_named(self.translator.feed(obj))

    def end(self) -> bytes:
        return encode_named(self.translator.finish())

    def fail(self, message: str) -> bytes:
        return encode_named(self.translator.fail(500, message))


class ResponsesFraming(AnthropicFraming):
    """Chat chunks translated into the Responses event stream (proxy/responses_stream.py)."""

    def __init__(self, translator: ResponsesStream):
        self.translator = translator

    def fail(self, message: str) -> bytes:
        return encode_named(self.translator.fail(message))
