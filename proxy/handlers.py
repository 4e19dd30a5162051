"""The API endpoints: read and check the body, analyse the prompt, forward, relay, log a row.

Every API request ends as exactly one row (status, error, counts) whatever happens: bad
input (400/413 in the API's own error JSON), an upstream that refuses (502) or hangs (504),
a stream cut short (an error event), a client that goes away (499).

The prompt analysis feeds the row, so it runs on the pipeline thread after the client has its
answer and never competes with the relay; only in irminsul mode, where the annotation must go
with the request, does the request wait for the tokenizing and chunking part of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from irminsul.engine_adapter.contract import ANNOTATION_KEY, SGLANG_HINT_KEY
from irminsul.engine_adapter.sglang.hints import kv_hints_envelope
from irminsul.proxy import prewarm, shapes
from irminsul.proxy.attribution import normalize_attribution
from irminsul.proxy.errors import TranslationError, error_response, upstream_error_message
from irminsul.proxy.exchange import CLIENT_CLOSED, Exchange
from irminsul.proxy.forward import (
    UpstreamFailure,
    relay,
    request_headers,
    response_headers,
    upstream_call,
)
from irminsul.proxy.identity import session_key, tenant_extra_key, tenant_from_headers
from irminsul.proxy.json_codec import dumps, dumps_compact
from irminsul.proxy.pipeline import analyze_quietly
from irminsul.proxy.reorder import reorder_body
from irminsul.proxy.replies import Reply, fail, read_all, read_json
from irminsul.proxy.state import STATE_KEY, ProxyState
from irminsul.proxy.stream_handlers import (
    AnthropicEvents,
    OpenAIEvents,
    ResponsesEvents,
)
from irminsul.proxy.streams import relay_sse
from irminsul.proxy.translated import translated
from irminsul.proxy.usage import (
    read_anthropic,
    read_generate,
    read_openai,
    rewrite_anthropic,
    rewrite_generate,
    rewrite_openai,
)

log = logging.getLogger(__name__)


def api_handler(api: str):
    """The aiohttp handler of one API ("chat", "completions", "generate", "messages",
    "responses")."""

    async def handler(request: web.Request) -> web.StreamResponse:
        st = request.app[STATE_KEY]
        ex = Exchange(endpoint=shapes.ENDPOINTS[api], mode=st.upstream.info.row_mode,
                      t0=time.monotonic())
        st.metrics.in_flight.inc()
        try:
            try:
                resp = await _serve(request, st, api, ex)
            except Reply as r:
                resp = r.response
            return await _sent(request, resp)
        except asyncio.CancelledError:
            ex.fail(CLIENT_CLOSED, "client disconnected")
            raise
        except Exception as e:
            log.exception("internal error serving %s", ex.endpoint)
            ex.fail(500, f"internal proxy error: {type(e).__name__}")
            return error_response(shapes.error_shape(api), 500,
                                  "internal proxy error; see the proxy's log")
        finally:
            st.metrics.in_flight.dec()
            ex.finish()
            st.finish(ex)

    return handler


async def _sent(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """``resp``, written to the client already. The row's deferred analysis starts when the
    handler returns (ProxyState.finish): sending first keeps that CPU-bound work (and its hold
    on the GIL) from delaying the answer, which aiohttp would otherwise write only after it.
    A client gone by now is aiohttp's case as before (it would have failed the same write)."""
    if not resp.prepared:
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionError:
            pass
    return resp


def _rewrite(st: ProxyState, api: str, body: dict, stock: bool) -> dict:
    """The body to forward: the opt-in system-prompt rewrites applied (body unchanged)."""
    out = body
    if st.config.normalize_claude_attribution:
        out, _ = normalize_attribution(out, api)
    if st.config.reorder == "stable-first" and stock:
        out, _ = reorder_body(out, api)
    return out


async def _serve(request: web.Request, st: ProxyState, api: str, ex: Exchange):
    info = await st.upstream.ensure_probed()
    ex.mode = info.row_mode
    raw, body = await read_json(request, st, api, ex)
    ex.session = session_key(request.headers, body)
    ex.tenant = tenant_from_headers(request.headers, st.config.tenant_salt)
    ex.stream = body.get("stream") is True
    ex.model = shapes.model_of(body, info.model)
    if st.recorder is not None:
        st.recorder.record(ex.endpoint, ex.session, body)
    native = (api in ("chat", "completions", "generate")
              or (api == "messages" and info.has_messages)
              or (api == "responses" and info.has_responses))
    try:
        shapes.check(api, body)
        fwd = _rewrite(st, api, body, info.mode == "stock")
    except TranslationError as e:
        raise fail(api, ex, e.status, e.message, e.param) from None
    try:
        chat = shapes.translate(api, fwd)
    except TranslationError as e:
        if not native:
            raise fail(api, ex, e.status, e.message, e.param) from None
        # the engine serves this API itself and may take what the translation cannot
        # (previous_response_id, say): forward it as is, unanalysed
        log.info("%s: not analysed (%s); forwarded as is", ex.endpoint, e.message)
        chat = None
    source = shapes.prompt_source(api, fwd, chat)
    irminsul = info.mode == "irminsul"
    annotation = hints = None
    if st.pipeline is not None and source is not None:
        namespace = ex.tenant if st.config.isolate_tenants and ex.tenant else ""
        pipeline = st.pipeline
        if irminsul:  # the annotation goes with the request: tokenize and chunk first
            prep = await analyze_quietly(pipeline.submit_prepare(
                source, session=ex.session, namespace=namespace))
            if prep is not None:
                annotation = prep.annotation.to_json()
                # the rest (divergence, turn) only feeds the row: after the answer, like stock
                ex.start_analysis = lambda: pipeline.submit_complete(
                    prep, source, session=ex.session, track_seen=False)
        elif st.config.prewarm and native and api in ("chat", "completions"):
            await _prewarm(request, st, ex, source, fwd, namespace)
        elif st.config.kv_hints and api == "generate":
            # SGLang's irminsul backend reads the annotation (anchors, tenant namespace) from
            # /generate's kv_hints envelope, its one channel to the scheduler
            prep = await analyze_quietly(pipeline.submit_prepare(
                source, session=ex.session, namespace=namespace))
            if prep is not None:
                hints = kv_hints_envelope(prep.annotation, f"irminsul-{prep.annotation.seq_hash}")
                ex.start_analysis = lambda: pipeline.submit_complete(prep, source,
                                                                     session=ex.session)
        else:  # it only feeds the row: run it once the client has its answer
            ex.start_analysis = lambda: pipeline.submit(source, session=ex.session,
                                                        namespace=namespace)
    elif st.config.log_prompts:
        ex.prompt = shapes.prompt_for_log(api, fwd, chat)
    try:
        if native:
            return await _native(request, st, api, ex, raw, body, fwd, annotation, hints)
        return await translated(request, st, api, ex, body, chat, annotation)
    except UpstreamFailure as e:
        raise fail(api, ex, e.status, e.message) from None


async def _prewarm(request: web.Request, st: ProxyState, ex: Exchange, source, fwd: dict,
                   namespace: str) -> None:
    """--prewarm (stock SGLang with the irminsul backend): tokenize and chunk now, send the
    pre-warm requests the seen chunks call for (proxy/prewarm.py), and leave the rest of the
    analysis for after the answer, as stock mode does."""
    pipeline = st.pipeline
    planned = await analyze_quietly(pipeline.submit_prewarm(
        source, session=ex.session, namespace=namespace, limit=st.config.prewarm,
        min_tokens=st.config.prewarm_min_tokens, k=st.config.prewarm_k))
    if planned is None:
        return
    prep, ends = planned
    ex.start_analysis = lambda: pipeline.submit_complete(prep, source, session=ex.session)
    if ends:
        scope = dict(fwd)
        tenant_key = tenant_extra_key(st.config.isolate_tenants, ex.tenant, fwd)
        if tenant_key is not None:
            scope["extra_key"] = tenant_key  # where _native will send the request itself
        ex.prewarmed = await prewarm.prewarm(st.upstream, prep.ids, ends, scope,
                                             request_headers(request.headers))


def _usage_option(body: dict) -> dict | None:
    """stream_options asking for usage, if the client's do not already; else None."""
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        return None
    return {**(opts or {}), "include_usage": True}


def _encode(raw: bytes, body: dict, fwd: dict, extra: dict) -> bytes:
    """The JSON to forward: ``fwd`` plus the ``extra`` top-level keys. When the client's body
    goes unchanged, the keys are spliced onto its raw bytes instead of serialising 100 KB of
    conversation again (valid JSON either way: a key the body had is replaced, not doubled)."""
    if fwd is body and not any(k in body for k in extra):
        head = raw.rstrip()
        if head.endswith(b"}"):
            if not extra:
                return raw
            parts = [memoryview(head)[:-1], b"," if body else b""]
            for i, (k, v) in enumerate(extra.items()):
                # the annotation is the proxy's own and float-free: no walk needed
                value = dumps_compact(v) if k == ANNOTATION_KEY else dumps(v)
                parts += [b"," if i else b"", dumps_compact(k), b":", value]
            return b"".join([*parts, b"}"])
    return dumps({**fwd, **extra})


def _with_hints(theirs, ours: dict):
    """The kv_hints to forward: ours, or the client's envelope with our action appended. A
    client value that is not an envelope is left as it is (SGLang answers it itself)."""
    if theirs is None:
        return ours
    if isinstance(theirs, dict) and isinstance(theirs.get("actions"), list):
        return {**theirs, "actions": [*theirs["actions"], *ours["actions"]]}
    return theirs


async def _native(request, st: ProxyState, api: str, ex: Exchange, raw: bytes, body: dict,
                  fwd: dict, annotation: dict | None, hints: dict | None = None):
    extra: dict = {}
    if hints is not None:
        extra[SGLANG_HINT_KEY] = _with_hints(fwd.get(SGLANG_HINT_KEY), hints)
    tenant_key = tenant_extra_key(st.config.isolate_tenants, ex.tenant, fwd)
    if tenant_key is not None and api in ("chat", "completions", "generate"):
        extra["extra_key"] = tenant_key
    if annotation is not None:
        # Top-level key only, on every endpoint: an engine speaking the wire contract reads
        # it there. (SGLang's backend reads it from a kv_hints envelope: --kv-hints.)
        extra[ANNOTATION_KEY] = annotation
    drop_usage = False
    if ex.stream and api in ("chat", "completions"):
        opts = _usage_option(fwd)
        if opts is not None:
            extra["stream_options"], drop_usage = opts, True
    data = _encode(raw, body, fwd, extra)
    rewrite = st.upstream.info.mode == "irminsul"  # only an irminsul engine sends the split
    async with upstream_call(st.upstream, "POST", request.path, query=request.query_string,
                             headers=request_headers(request.headers), data=data) as resp:
        sse = resp.content_type == "text/event-stream"
        if resp.status == 200 and ex.stream and sse:
            if api == "messages":
                handler = AnthropicEvents(ex, rewrite=rewrite)
            elif api == "responses":
                handler = ResponsesEvents(ex, rewrite=rewrite)
            else:
                handler = OpenAIEvents(api, ex, rewrite=rewrite, drop_usage_chunk=drop_usage,
                                       prewarmed=ex.prewarmed)
            return await relay_sse(request, resp, ex, handler)
        return await _whole(resp, api, ex, rewrite)


async def _whole(resp, api: str, ex: Exchange, rewrite: bool) -> web.Response:
    """A non-streamed upstream answer, relayed with usage read (and rewritten)."""
    raw = await read_all(resp)
    headers = response_headers(resp.headers)
    if resp.status != 200:
        ex.fail(resp.status, upstream_error_message(resp.status, raw))
        return web.Response(status=resp.status, body=raw, headers=headers)
    ex.finish(200)
    try:
        payload = json.loads(raw)  # not json_codec: answers are many small objects (logprobs)
    except ValueError:
        return web.Response(status=200, body=raw, headers=headers)
    if not isinstance(payload, dict):
        return web.Response(status=200, body=raw, headers=headers)
    changed = False
    if api == "generate":
        meta = payload.get("meta_info")
        ex.usage = read_generate(meta)
        if rewrite and isinstance(meta, dict) and meta.get("irminsul") is not None:
            payload, changed = {**payload, "meta_info": rewrite_generate(meta)}, True
    else:
        usage = payload.get("usage")
        if ex.prewarmed is not None and isinstance(usage, dict):  # chat/completions only
            usage, rewrite = ex.prewarmed.split(usage), True  # rewritten just below
        read = read_anthropic if api == "messages" else read_openai
        ex.usage = read(usage)
        if rewrite and isinstance(usage, dict) and usage.get("irminsul") is not None:
            if api == "messages":
                usage = rewrite_anthropic(usage)
            else:
                key = "input_tokens_details" if api == "responses" else "prompt_tokens_details"
                usage = rewrite_openai(usage, details_key=key)
            payload, changed = {**payload, "usage": usage}, True
    if changed:
        raw = json.dumps(payload, ensure_ascii=False).encode()
    return web.Response(status=200, body=raw, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def passthrough(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE_KEY]
    return await relay(request, st.upstream, st.config.max_body_bytes)
