"""What each upstream SSE event becomes, per API (see proxy/streams.py for the loop).

Events are re-encoded from their parsed form; JSON is parsed only for events that may carry
usage, an error, or (until it came) the first generated content, so a long stream costs one
substring test per event.
"""

from __future__ import annotations

import json

from irminsul.proxy.errors import anthropic_error_body, openai_error_body, upstream_error_message
from irminsul.proxy.exchange import Exchange
from irminsul.proxy.first_token import chunk_shows_token
from irminsul.proxy.prewarm import Prewarmed
from irminsul.proxy.sse import DONE, SSEEvent, encode_done, encode_event, encode_named
from irminsul.proxy.streams import StreamBroken, loads
from irminsul.proxy.translation import TokenCounts
from irminsul.proxy.usage import (
    UpstreamUsage,
    merge,
    read_anthropic,
    read_generate,
    read_openai,
    rewrite_anthropic,
    rewrite_generate,
    rewrite_openai,
)


class OpenAIEvents:
    """Chat completions, completions and SGLang /generate streams, relayed in their own shape.

    ``rewrite``: report saved tokens as cached (irminsul mode). ``drop_usage_chunk``: the proxy
    added stream_options.include_usage itself, so the usage-only chunk is not the client's.
    """

    def __init__(self, api: str, ex: Exchange, *, rewrite: bool, drop_usage_chunk: bool,
                 prewarmed: Prewarmed | None = None):
        self.api, self.ex = api, ex
        self.rewrite, self.drop_usage_chunk = rewrite or prewarmed is not None, drop_usage_chunk
        self.prewarmed = prewarmed  # --prewarm: the usage gets the request's honest split
        self.done = self.errored = False

    def event(self, ev: SSEEvent) -> bytes:
        data = ev.data
        if data.strip() == DONE:
            self.done = True
            return encode_done()
        ex = self.ex
        if not (ex.ttft_s is None or self.api == "generate" or '"usage"' in data
                or '"error"' in data):
            return encode_event(data, event=ev.event)
        payload = loads(data)
        if not isinstance(payload, dict):
            return encode_event(data, event=ev.event)
        if "error" in payload and not payload.get("choices"):
            self.errored = True
            ex.fail(502, upstream_error_message(502, payload))
            return encode_event(data, event=ev.event)
        if self.api == "generate":
            return self._generate(payload, ev)
        usage = payload.get("usage")
        if isinstance(usage, dict):
            if self.prewarmed is not None:  # the split goes out through the rewrite below
                usage = self.prewarmed.split(usage)
                payload = {**payload, "usage": usage}
            ex.usage = merge(ex.usage, read_openai(usage))
            if self.drop_usage_chunk and not payload.get("choices"):
                return b""
            if self.rewrite and usage.get("irminsul") is not None:
                data = json.dumps({**payload, "usage": rewrite_openai(usage)})
        if ex.ttft_s is None and chunk_shows_token(self.api, payload):
            ex.first_content()
        return encode_event(data, event=ev.event)

    def _generate(self, payload: dict, ev: SSEEvent) -> bytes:
        meta = payload.get("meta_info")
        data = ev.data
        if isinstance(meta, dict):
            self.ex.usage = merge(self.ex.usage, read_generate(meta))
            if self.rewrite and meta.get("irminsul") is not None:
                data = json.dumps({**payload, "meta_info": rewrite_generate(meta)})
        if self.ex.ttft_s is None and chunk_shows_token("generate", payload):
            self.ex.first_content()
        return encode_event(data, event=ev.event)

    def end(self) -> bytes:
        if not (self.done or self.errored):
            raise StreamBroken("upstream stream ended before data: [DONE]")
        return b""

    def error(self, status: int, message: str) -> bytes:
        return encode_event(openai_error_body(status, message))


class AnthropicEvents:
    """A native /v1/messages stream, relayed with its usage rewritten in irminsul mode."""

    def __init__(self, ex: Exchange, *, rewrite: bool):
        self.ex, self.rewrite = ex, rewrite
        self.done = self.errored = False

    def event(self, ev: SSEEvent) -> bytes:
        name = ev.event
        if self.ex.ttft_s is None and name in ("content_block_delta", "message_delta"):
            self.ex.first_content()  # (a tool_use block's start would need a parse per event)
        if name == "message_stop":
            self.done = True
        elif name == "error":
            self.errored = True
            self.ex.fail(502, upstream_error_message(502, ev.data))
        elif name in ("message_start", "message_delta"):
            payload = loads(ev.data)
            holder = payload.get("message") if name == "message_start" and isinstance(
                payload, dict) else payload
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if isinstance(usage, dict):
                self.ex.usage = merge(self.ex.usage, read_anthropic(usage))
                if self.rewrite and usage.get("irminsul") is not None:
                    holder["usage"] = rewrite_anthropic(usage)  # payload is our own parse
                    return encode_event(payload, event=name)
        return encode_event(ev.data, event=name)

    def end(self) -> bytes:
        if not (self.done or self.errored):
            raise StreamBroken("upstream stream ended before message_stop")
        return b""

    def error(self, status: int, message: str) -> bytes:
        return encode_event(anthropic_error_body(status, message), event="error")


RESPONSE_END = ("response.completed", "response.incomplete", "response.failed")


def responses_error(status: int, message: str, sequence_number: int) -> bytes:
    """A Responses stream `error` event. It also carries an OpenAI-style "error" object, which
    is what the OpenAI SDKs test to raise instead of yielding the event."""
    return encode_event({"type": "error", "code": "server_error" if status >= 500 else
                         "invalid_request", "message": message, "param": None,
                         "sequence_number": sequence_number,
                         "error": openai_error_body(status, message)["error"]}, event="error")


class ResponsesEvents:
    """A native /v1/responses stream, relayed with its usage rewritten in irminsul mode."""

    def __init__(self, ex: Exchange, *, rewrite: bool):
        self.ex, self.rewrite = ex, rewrite
        self.done = self.errored = False
        self.sequence = 0

    def event(self, ev: SSEEvent) -> bytes:
        name = ev.event or ""
        if name.endswith(".delta") and self.ex.ttft_s is None:
            self.ex.first_content()
        if name not in RESPONSE_END and name != "error" and '"sequence_number"' not in ev.data:
            return encode_event(ev.data, event=ev.event)
        payload = loads(ev.data)
        if not isinstance(payload, dict):
            return encode_event(ev.data, event=ev.event)
        if isinstance(payload.get("sequence_number"), int):
            self.sequence = payload["sequence_number"] + 1
        kind = payload.get("type") or name
        if kind == "error":
            self.errored = True
            self.ex.fail(502, upstream_error_message(502, payload))
        elif kind in RESPONSE_END:
            self.done = True
            resp = payload.get("response")
            usage = resp.get("usage") if isinstance(resp, dict) else None
            if isinstance(usage, dict):
                self.ex.usage = merge(self.ex.usage, read_openai(usage))
                if self.rewrite and usage.get("irminsul") is not None:
                    resp["usage"] = rewrite_openai(usage, details_key="input_tokens_details")
                    return encode_event(payload, event=ev.event)
        return encode_event(ev.data, event=ev.event)

    def end(self) -> bytes:
        if not (self.done or self.errored):
            raise StreamBroken("upstream stream ended before response.completed")
        return b""

    def error(self, status: int, message: str) -> bytes:
        return responses_error(status, message, self.sequence)


def client_counts(u: UpstreamUsage | None) -> TokenCounts | None:
    """Counts for a translated answer: cached = tokens whose prefill was skipped."""
    if u is None or u.prompt_tokens is None:
        return None
    cached = u.counts.saved_tokens if u.counts is not None else (u.exact_prefix or 0)
    return TokenCounts(u.prompt_tokens, u.completion_tokens or 0, cached,
                       None if u.counts is None else u.counts.to_json())


class TranslatedEvents:
    """Chat chunks from the upstream, sent as another API's events by ``translator`` (an
    anthropic_stream.MessageStream or a responses_stream.ResponsesStream: feed / finish);
    ``fail(status, message)`` gives its error events."""

    def __init__(self, translator, ex: Exchange, fail):
        self.t, self.ex, self.fail = translator, ex, fail
        self.done = False

    def event(self, ev: SSEEvent) -> bytes:
        if ev.data.strip() == DONE:
            self.done = True
            return b""
        payload = loads(ev.data)
        if not isinstance(payload, dict):
            raise StreamBroken(f"upstream sent a non-JSON event: {ev.data[:200]!r}")
        if ev.event == "error" or "error" in payload:
            raise StreamBroken(upstream_error_message(502, payload))
        if isinstance(payload.get("usage"), dict):
            self.ex.usage = merge(self.ex.usage, read_openai(payload["usage"]))
        if self.ex.ttft_s is None and chunk_shows_token("openai", payload):
            self.ex.first_content()
        return encode_named(self.t.feed(payload))

    def end(self) -> bytes:
        if not self.done:
            raise StreamBroken("upstream stream ended before data: [DONE]")
        return encode_named(self.t.finish(client_counts(self.ex.usage)))

    def error(self, status: int, message: str) -> bytes:
        return encode_named(self.fail(status, message))
