"""An SGLang-compatible upstream for tests: real HTTP, real prefix accounting, fault knobs.

It serves /v1/chat/completions, /v1/completions, /generate (streaming or not, SSE ending with
``data: [DONE]``), /v1/models, /model_info, /get_model_info, /health and, when asked,
/v1/messages and /irminsul/capabilities. ``cached_tokens`` is the longest common prefix of the
request's token IDs with any earlier request's, as a radix cache would find. In irminsul mode
it also reads the annotation it receives, checks it against its own token IDs and reports
ReuseCounts, counting a chunk as reused only when its stored token IDs compare equal.

Tests flip ``knobs`` at run time (hang, refuse, die mid-stream, stream until cancelled, return
tool calls) and read ``received`` / ``cancelled`` to see what the proxy did.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from aiohttp import web

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import (
    ANNOTATION_KEY,
    CAPABILITY_PATH,
    SGLANG_HINT_KEY,
    Annotation,
    ContractError,
    ReuseCounts,
    capabilities,
)
from support.fake_formats import (
    Events,
    anthropic_events,
    anthropic_message,
    chat_chunks,
    chat_completion,
    completion,
    completion_chunks,
    generate_chunks,
    generate_result,
    responses_events,
    responses_object,
)

FAKE_FINGERPRINT = "f" * 32


@dataclass
class Knobs:
    """Fault and behaviour switches; change them between requests."""

    hang: bool = False  # accept the request and never answer (until the client goes away)
    refuse_status: int | None = None  # answer every generation request with this error status
    die_after_chunks: int | None = None  # stream this many events, then drop the connection
    stream_forever: bool = False  # keep streaming (one event per chunk_delay) until cancelled
    tool_calls: bool = False  # answer chat requests with a get_weather tool call
    tool: dict | None = None  # {"name", "arguments" (JSON text)} called instead of get_weather
    tool_calls_left: int | None = None  # with tool_calls: this many tool calls, then text
    chunk_delay: float = 0.0  # seconds between streamed events
    reply: str = "Hello from the fake engine, one word per token."


class Received(NamedTuple):
    path: str
    query: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes when not JSON


@dataclass
class FakeSGLang:
    """The fake engine's state; ``app()`` builds a fresh aiohttp application around it."""

    tokenizer: Any = None  # a ModelTokenizer; None: one token per UTF-8 byte of a rendering
    irminsul: bool = False  # answer the capability probe and account content reuse
    messages_api: bool = False  # serve /v1/messages natively
    responses_api: bool = False  # serve /v1/responses natively (string input only)
    model: str = "fake-model"
    max_history: int = 64  # prompts kept for prefix matching (a radix cache is bounded too)
    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    knobs: Knobs = field(default_factory=Knobs)
    received: list[Received] = field(default_factory=list)
    annotations: list[dict | None] = field(default_factory=list)  # as received, per request
    cancelled: int = 0
    history: list[np.ndarray] = field(default_factory=list)
    chunks: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.cancel_event = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/completions", self._completions)
        r.add_post("/generate", self._generate)
        if self.messages_api:
            r.add_post("/v1/messages", self._messages)
        if self.responses_api:
            r.add_post("/v1/responses", self._responses)
        r.add_get("/v1/models", self._models)
        r.add_get("/model_info", self._model_info)
        r.add_get("/get_model_info", self._model_info)
        r.add_get("/health", lambda _: web.Response())
        if self.irminsul:
            r.add_get(CAPABILITY_PATH, self._capabilities)
        return app

    # ---- accounting --------------------------------------------------------------------

    def tokenize(self, kind: str, body: dict) -> np.ndarray:
        """Token IDs of a request the way this engine renders it."""
        tok = self.tokenizer
        if kind == "chat":
            messages, tools = body["messages"], body.get("tools")
            if tok is not None:
                kw = body.get("chat_template_kwargs") or {}
                return tok.encode_chat(messages, tools=tools, **kw).ids
            text = json.dumps([messages, tools], sort_keys=True)
        elif kind == "generate" and body.get("input_ids") is not None:
            return np.asarray(body["input_ids"], dtype=np.int32)
        else:
            text = body.get("prompt", body.get("text", ""))
            if isinstance(text, list) and all(isinstance(t, int) for t in text):
                return np.asarray(text, dtype=np.int32)
            if tok is not None:
                return tok.encode_prompt(str(text)).ids
        return np.frombuffer(str(text).encode(), dtype=np.uint8).astype(np.int32)

    def account(self, ids: np.ndarray, annotation: Any) -> ReuseCounts:
        """Exact prefix against every earlier request; in irminsul mode, chunk reuse too."""
        exact = 0
        for prev in self.history:
            n = min(len(prev), len(ids))
            diff = np.flatnonzero(prev[:n] != ids[:n])
            exact = max(exact, int(diff[0]) if len(diff) else n)
        exact = min(exact, max(len(ids) - 1, 0))  # the last token is always computed (logits)
        self.history.append(ids)
        del self.history[: -self.max_history]
        reused = hit = total = 0
        ann = None
        if self.irminsul and annotation is not None:
            try:
                ann = Annotation.from_json(annotation)
            except ContractError:
                ann = None
        if ann is not None and ann.matches(ids):
            total = len(ann.chunks)
            for c in ann.chunks:
                part = ids[c.start : c.end]
                stored = self.chunks.get(c.key)
                if c.end > exact and stored is not None and np.array_equal(stored, part):
                    reused += c.end - max(c.start, exact)
                    hit += 1
            # stored after the request, as an engine commits after its prefill: a chunk that
            # repeats inside one prompt is not a hit of that prompt
            for c in ann.chunks:
                self.chunks.setdefault(c.key, ids[c.start : c.end].copy())
        return ReuseCounts(
            prompt_tokens=len(ids), exact_prefix_tokens=exact, reused_tokens=reused,
            new_tokens=len(ids) - exact - reused, chunks_total=total, chunks_hit=hit,
            policy="pic" if self.irminsul else "",
        )

    def _usage(self, counts: ReuseCounts, completion_tokens: int) -> dict:
        usage = {
            "prompt_tokens": counts.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": counts.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": counts.exact_prefix_tokens},
        }
        if self.irminsul:
            usage["irminsul"] = counts.to_json()
        return usage

    # ---- handlers ----------------------------------------------------------------------

    async def _begin(self, request: web.Request, kind: str):
        """Record the request, apply the hang/refuse knobs; returns (body, counts, pieces)."""
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        self.received.append(
            Received(request.path, request.query_string, dict(request.headers), body)
        )
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}')
        if kind == "responses":
            if not isinstance(body.get("input"), str):
                raise web.HTTPBadRequest(text='{"error": {"message": "input: a string"}}',
                                         content_type="application/json")
            body = {**body, "messages": [{"role": "user", "content": body["input"]}]}
            kind = "chat"
        if kind == "messages" and isinstance(body.get("messages"), list):
            system = body.get("system")  # a string system prompt goes first, as templates want
            head = [{"role": "system", "content": system}] if isinstance(system, str) else []
            body = {**body, "messages": head + body["messages"]}
            kind = "chat"
        if kind == "chat" and not isinstance(body.get("messages"), list):
            raise web.HTTPBadRequest(text='{"error": {"message": "messages: field required"}}',
                                     content_type="application/json")
        self.annotations.append(body.get(ANNOTATION_KEY))
        if self.knobs.hang:
            await self._until_cancelled(asyncio.Event().wait())
        if self.knobs.refuse_status is not None:
            refused = type("Refused", (web.HTTPError,), {"status_code": self.knobs.refuse_status})
            raise refused(text=json.dumps({"error": {"message": "refused by knob"}}),
                          content_type="application/json")
        counts = self.account(self.tokenize(kind, body), body.get(ANNOTATION_KEY))
        words = self.knobs.reply.split(" ")
        limit = body.get("max_tokens", body.get("max_completion_tokens",
                                                body.get("max_output_tokens")))
        if kind == "generate":
            limit = (body.get("sampling_params") or {}).get("max_new_tokens")
        if isinstance(limit, int) and limit >= 0:
            words = words[:limit]
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return body, counts, pieces

    async def _until_cancelled(self, awaitable):
        try:
            return await awaitable
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            self.cancel_event.set()
            raise

    async def _stream(self, request: web.Request, events: Events):
        """Write SSE events one by one, honouring the streaming knobs."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        k = self.knobs
        body = itertools.cycle(events.body) if k.stream_forever else events.body
        sent = 0

        async def pump() -> bool:
            nonlocal sent
            for ev in itertools.chain(events.head, body, events.tail):
                if k.die_after_chunks is not None and sent >= k.die_after_chunks:
                    return False
                await resp.write(ev)
                sent += 1
                if k.chunk_delay:
                    await asyncio.sleep(k.chunk_delay)
            return True

        if not await self._until_cancelled(pump()):
            request.transport.close()  # the engine process died mid-stream
            raise asyncio.CancelledError
        await resp.write_eof()
        return resp

    async def _chat(self, request: web.Request):
        body, counts, pieces = await self._begin(request, "chat")
        return await self._answer(request, body, counts, pieces, chat_completion, chat_chunks)

    async def _completions(self, request: web.Request):
        body, counts, pieces = await self._begin(request, "completion")
        return await self._answer(request, body, counts, pieces, completion, completion_chunks)

    async def _answer(self, request, body, counts, pieces, whole, chunks):
        usage = self._usage(counts, len(pieces))
        k = self.knobs
        tools = k.tool_calls and whole is chat_completion and k.tool_calls_left != 0
        extra = {"tool": k.tool} if tools and k.tool is not None else {}
        if tools and k.tool_calls_left is not None:
            k.tool_calls_left -= 1
        echo = body.get(ANNOTATION_KEY)
        if not body.get("stream"):
            out = whole(self.model, pieces, usage, tool_calls=tools, **extra)
            if echo is not None:
                out["irminsul_echo"] = echo
            return web.json_response(out)
        opts = body.get("stream_options") or {}
        return await self._stream(request, chunks(self.model, pieces, usage, tool_calls=tools,
                                                  include_usage=bool(opts.get("include_usage")),
                                                  **extra))

    async def _generate(self, request: web.Request):
        body, counts, pieces = await self._begin(request, "generate")
        meta = {"prompt_tokens": counts.prompt_tokens, "completion_tokens": len(pieces),
                "cached_tokens": counts.exact_prefix_tokens}
        if self.irminsul:
            meta["irminsul"] = counts.to_json()
        if body.get(SGLANG_HINT_KEY) is not None:
            meta["kv_hints_echo"] = body[SGLANG_HINT_KEY]
        if not body.get("stream"):
            return web.json_response(generate_result(pieces, meta))
        return await self._stream(request, generate_chunks(pieces, meta))

    async def _messages(self, request: web.Request):
        body, counts, pieces = await self._begin(request, "messages")
        usage = {"input_tokens": counts.prompt_tokens - counts.exact_prefix_tokens,
                 "output_tokens": len(pieces), "cache_read_input_tokens":
                 counts.exact_prefix_tokens, "cache_creation_input_tokens": 0}
        if self.irminsul:
            usage["irminsul"] = counts.to_json()
        if not body.get("stream"):
            return web.json_response(anthropic_message(self.model, pieces, usage))
        return await self._stream(request, anthropic_events(self.model, pieces, usage))

    async def _responses(self, request: web.Request):
        body, counts, pieces = await self._begin(request, "responses")
        usage = {"input_tokens": counts.prompt_tokens, "output_tokens": len(pieces),
                 "total_tokens": counts.prompt_tokens + len(pieces),
                 "input_tokens_details": {"cached_tokens": counts.exact_prefix_tokens},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        if self.irminsul:
            usage["irminsul"] = counts.to_json()
        if not body.get("stream"):
            return web.json_response(responses_object(self.model, pieces, usage))
        return await self._stream(request, responses_events(self.model, pieces, usage))

    async def _models(self, _):
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": int(time.time()),
             "owned_by": "fake-sglang"}]})

    async def _model_info(self, _):
        return web.json_response({"model_path": self.model, "is_generation": True})

    async def _capabilities(self, _):
        return web.json_response(capabilities(
            engine="fake", model=self.model, model_fingerprint=FAKE_FINGERPRINT,
            chunker=self.chunker.to_json(), policies=["full", "prefix", "pic"],
            default_policy="pic"))
