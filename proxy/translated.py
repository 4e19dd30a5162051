"""Anthropic and Responses requests served through the upstream's /v1/chat/completions, and
/v1/messages/count_tokens."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from irminsul.engine_adapter.contract import ANNOTATION_KEY
from irminsul.proxy.anthropic import chat_to_message, messages_to_chat
from irminsul.proxy.anthropic_stream import MessageStream
from irminsul.proxy.errors import TranslationError, upstream_error_message
from irminsul.proxy.exchange import Exchange
from irminsul.proxy.forward import relay, request_headers, upstream_call
from irminsul.proxy.identity import tenant_extra_key
from irminsul.proxy.json_codec import dumps
from irminsul.proxy.replies import Reply, fail, read_all, read_json
from irminsul.proxy.responses import chat_to_response
from irminsul.proxy.responses_stream import ResponsesStream
from irminsul.proxy.state import STATE_KEY, ProxyState
from irminsul.proxy.stream_handlers import TranslatedEvents, client_counts
from irminsul.proxy.streams import relay_sse
from irminsul.proxy.translation import ChatRequest
from irminsul.proxy.usage import read_openai


def translated_headers(request: web.Request) -> dict[str, str]:
    headers = request_headers(request.headers)
    lowered = {k.lower() for k in headers}
    key = request.headers.get("x-api-key")
    if key and "authorization" not in lowered:  # an OpenAI-style upstream checks this one
        headers["Authorization"] = f"Bearer {key}"
    return headers


async def translated(request, st: ProxyState, api: str, ex: Exchange, body: dict,
                      chat: ChatRequest, annotation: dict | None):
    """An Anthropic or Responses request served by the upstream's /v1/chat/completions."""
    out = chat.body if annotation is None else {**chat.body, ANNOTATION_KEY: annotation}
    tenant_key = tenant_extra_key(st.config.isolate_tenants, ex.tenant, chat.body)
    if tenant_key is not None:
        out = {**out, "extra_key": tenant_key}
    data = dumps(out)  # json.dumps's value, ~10x faster for a 100 KB conversation
    async with upstream_call(st.upstream, "POST", "/v1/chat/completions",
                             headers=translated_headers(request), data=data) as resp:
        if resp.status != 200:
            message = upstream_error_message(resp.status, await read_all(resp))
            raise fail(api, ex, resp.status, message)
        if chat.stream:
            if api == "messages":
                t = MessageStream(model=chat.model, stop_sequences=body.get("stop_sequences"))
                on_fail = t.fail
            else:
                t = ResponsesStream(request=body, model=chat.model)
                on_fail = lambda status, message: t.fail(message)
            return await relay_sse(request, resp, ex, TranslatedEvents(t, ex, on_fail))
        try:
            completion = json.loads(await read_all(resp))
        except ValueError:
            raise fail(api, ex, 502, "upstream answered with a body that is not JSON") from None
        ex.usage = read_openai(completion.get("usage") if isinstance(completion, dict) else None)
        counts = client_counts(ex.usage)
        try:
            if api == "messages":
                result = chat_to_message(completion, model=chat.model, counts=counts,
                                         stop_sequences=body.get("stop_sequences"))
            else:
                result = chat_to_response(completion, request=body, counts=counts,
                                          model=chat.model)
        except TranslationError as e:
            raise fail(api, ex, e.status, e.message) from None
        ex.finish(200)
        return web.json_response(result)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: counted with the model's tokenizer and chat template
    when the proxy has them, else relayed to the upstream."""
    st = request.app[STATE_KEY]
    if st.tokenizer is None:
        return await relay(request, st.upstream, st.config.max_body_bytes)
    ex = Exchange(endpoint="/v1/messages/count_tokens", mode=st.upstream.info.row_mode,
                  t0=time.monotonic())
    try:
        _, body = await read_json(request, st, "messages", ex)
        try:
            chat = messages_to_chat({**body, "max_tokens": body.get("max_tokens") or 1})
        except TranslationError as e:
            raise fail("messages", ex, e.status, e.message, e.param) from None
        prompt = await asyncio.to_thread(st.tokenizer.encode_chat, chat.body["messages"],
                                         tools=chat.body.get("tools") or None)
    except Reply as r:
        return r.response
    return web.json_response({"input_tokens": len(prompt.ids)})
