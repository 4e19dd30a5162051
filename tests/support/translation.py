"""A canned OpenAI chat upstream and a translating front server for the SDK fidelity tests.

The upstream (a real aiohttp server) answers /v1/chat/completions from a :class:`Script`,
streamed as SGLang does (a role chunk, content pieces, tool calls with the name first and the
arguments in fragments, a finish chunk, a usage-only chunk, [DONE]). The front server serves
/v1/messages and /v1/responses by translating, forwarding over HTTP and translating back,
which is the path the proxy takes when its upstream lacks those endpoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from irminsul.proxy.anthropic import chat_to_message, messages_to_chat
from irminsul.proxy.anthropic_stream import MessageStream
from irminsul.proxy.errors import (
    TranslationError,
    UpstreamStreamError,
    error_response,
    translation_error_response,
    upstream_error_message,
)
from irminsul.proxy.responses import chat_to_response, responses_to_chat
from irminsul.proxy.responses_stream import ResponsesStream
from irminsul.proxy.sse import (
    SSE_HEADERS,
    aiter_chat_chunks,
    encode_done,
    encode_event,
    encode_named,
)


class Script(NamedTuple):
    """What the canned upstream model 'generates'."""

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[tuple[str, str, str], ...] = ()  # (id, name, arguments text)
    finish_reason: str = "stop"
    matched_stop: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    irminsul: dict | None = None
    piece: int = 3  # characters per streamed piece
    error_after: int | None = None  # stream this many chunks, then an error payload


def _pieces(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


def script_usage(s: Script) -> dict:
    usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
             "total_tokens": s.prompt_tokens + s.completion_tokens,
             "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}
    if s.irminsul is not None:
        usage["irminsul"] = s.irminsul
    return usage


def script_chunks(s: Script) -> list[dict]:
    def chunk(delta=None, finish=None, usage=None, choices=True):
        c = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
             "model": "upstream-model", "choices": []}
        if choices:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None,
                      "finish_reason": finish}
            if finish is not None:
                choice["matched_stop"] = s.matched_stop
            c["choices"].append(choice)
        c["usage"] = usage
        return c

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": p}) for p in _pieces(s.reasoning, s.piece)]
    out += [chunk({"content": p}) for p in _pieces(s.text, s.piece)]
    for i, (call_id, name, args) in enumerate(s.tool_calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": call_id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]})
                for p in _pieces(args, s.piece)]
    out.append(chunk(finish=s.finish_reason))
    out.append(chunk(usage=script_usage(s), choices=False))
    return out


def script_completion(s: Script) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": s.text or None}
    if s.reasoning:
        message["reasoning_content"] = s.reasoning
    if s.tool_calls:
        message["tool_calls"] = [{"id": i, "type": "function",
                                  "function": {"name": n, "arguments": a}}
                                 for i, n, a in s.tool_calls]
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "upstream-model", "usage": script_usage(s),
            "choices": [{"index": 0, "message": message, "finish_reason": s.finish_reason,
                         "matched_stop": s.matched_stop}]}


SESSION = web.AppKey("session", aiohttp.ClientSession)


def upstream_app(state: dict) -> web.Application:
    """``state["script"]`` answers; every request body is appended to ``state["bodies"]``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state["bodies"].append(body)
        script: Script = state["script"]
        if not body.get("stream"):
            return web.json_response(script_completion(script))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        for n, c in enumerate(script_chunks(script)):
            if script.error_after is not None and n == script.error_after:
                await resp.write(encode_event({"error": {"message": "engine overloaded",
                                                         "code": 503}}))
                return resp
            await resp.write(encode_event(c))
        await resp.write(encode_done())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def front_app(upstream_url: str) -> web.Application:
    """The translating server the SDKs talk to."""

    async def forward(request, api, translate):
        try:
            body = await request.json()
            chat = translate(body)
        except TranslationError as e:
            return None, None, translation_error_response(api, e)
        except ValueError:
            return None, None, error_response(api, 400, "request body is not JSON")
        session: aiohttp.ClientSession = request.app[SESSION]
        upstream = await session.post(upstream_url + "/v1/chat/completions", json=chat.body)
        return body, upstream, None

    async def messages(request: web.Request) -> web.StreamResponse:
        body, upstream, failed = await forward(request, "anthropic", messages_to_chat)
        if failed is not None:
            return failed
        if upstream.status != 200:
            text = await upstream.text()
            return error_response("anthropic", upstream.status,
                                  upstream_error_message(upstream.status, text))
        stops = body.get("stop_sequences") or ()
        if not body.get("stream"):
            completion = await upstream.json()
            return web.json_response(chat_to_message(completion, model=body["model"],
                                                     stop_sequences=stops))
        stream = MessageStream(model=body["model"], stop_sequences=stops)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            async for chunk in aiter_chat_chunks(upstream):
                await resp.write(encode_named(stream.feed(chunk)))
            await resp.write(encode_named(stream.finish()))
        except UpstreamStreamError as e:
            await resp.write(encode_named(stream.start() + stream.fail(e.status, e.message)))
        return resp

    async def responses(request: web.Request) -> web.StreamResponse:
        body, upstream, failed = await forward(request, "openai", responses_to_chat)
        if failed is not None:
            return failed
        if upstream.status != 200:
            text = await upstream.text()
            return error_response("openai", upstream.status,
                                  upstream_error_message(upstream.status, text))
        if not body.get("stream"):
            return web.json_response(chat_to_response(await upstream.json(), request=body))
        stream = ResponsesStream(request=body)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            async for chunk in aiter_chat_chunks(upstream):
                await resp.write(encode_named(stream.feed(chunk)))
            await resp.write(encode_named(stream.finish()))
        except UpstreamStreamError as e:
            await resp.write(encode_named(stream.fail(e.message)))
        return resp

    async def on_startup(app):
        app[SESSION] = aiohttp.ClientSession()

    async def on_cleanup(app):
        await app[SESSION].close()

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def start_pair(aiohttp_server, script: Script) -> tuple[str, dict]:
    """Starts upstream and front servers on 127.0.0.1 port 0; returns (front URL, state)."""
    state: dict = {"script": script, "bodies": []}
    upstream = await aiohttp_server(upstream_app(state), host="127.0.0.1", port=0)
    front = await aiohttp_server(front_app(str(upstream.make_url("")).rstrip("/")),
                                 host="127.0.0.1", port=0)
    return str(front.make_url("")).rstrip("/"), state
