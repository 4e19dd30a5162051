"""The embedded engine's HTTP server: SGLang's API (plus OpenAI and Anthropic shapes) over one
Engine, so the proxy treats it exactly like a patched SGLang.

Every engine call runs on one worker thread (worker.py); handlers parse (protocol.py), submit,
and stream or collect the job's events (streams.py) into response bodies (replies.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from ...proxy.anthropic import chat_to_message, messages_to_chat
from ...proxy.anthropic_stream import MessageStream
from ...proxy.errors import TranslationError, anthropic_error_body, openai_error_body
from ...proxy.responses import chat_to_response, responses_to_chat
from ...proxy.responses_stream import ResponsesStream
from ...proxy.sse import SSE_HEADERS
from ..contract import ANNOTATION_KEY, CAPABILITY_PATH, SGLANG_HINT_KEY, capabilities
from .config import POLICIES
from .metrics import EngineMetrics, fallback_reasons
from .protocol import ApiError, GenerationRequest, RequestParser
from .replies import chat_json, completion_json, generate_json
from .streams import (
    AnthropicFraming,
    EngineFailed,
    OpenAIFraming,
    ResponsesFraming,
    chat_chunks,
    collect,
    completion_chunks,
    generate_chunks,
    parse_output,
)
from .worker import EngineWorker, GenerationJob

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # agent prompts with long tool results run to megabytes
# Fields of an Anthropic or Responses body that the chat translation drops but the engine reads.
IRMINSUL_FIELDS = (ANNOTATION_KEY, SGLANG_HINT_KEY, "irminsul_policy", "irminsul_policy_args")


@web.middleware
async def _errors(request: web.Request, handler):
    """ApiError -> 4xx and engine failures -> 500, as the API's own error JSON."""
    try:
        return await handler(request)
    except (ApiError, TranslationError) as e:
        status, message, param = e.status, e.message, e.param
    except EngineFailed as e:
        status, message, param = 500, str(e), None
    if request.path == "/v1/messages":
        return web.json_response(anthropic_error_body(status, message), status=status)
    return web.json_response(openai_error_body(status, message, param=param), status=status)


async def read_json(request: web.Request):
    try:
        return await request.json()
    except ValueError as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None


async def parse(method, body) -> GenerationRequest:
    """Parse (and tokenize) off the event loop: a long agent prompt takes a while to render
    and encode, and the loop keeps serving health checks and streams meanwhile."""
    return await asyncio.to_thread(method, body)


def carry_irminsul(body: dict, chat_body: dict) -> dict:
    """The translated chat body plus the annotation and policy fields of the original."""
    return {**chat_body, **{k: body[k] for k in IRMINSUL_FIELDS if k in body}}


class EngineServer:
    """The handlers and what they share: the engine, its worker thread, the request parser."""

    def __init__(self, engine):
        self.engine = engine
        self.worker = EngineWorker(engine)
        cfg = engine.config
        self.parser = RequestParser(engine.tokenizer, max_seq_len=cfg.max_seq_len,
                                    model=engine.model_name, policies=self.policies)
        self.created = int(time.time())
        self.requests = 0
        self.metrics = EngineMetrics(engine)
        self.audit_writer = None  # the savings writer audits are recorded through

    async def on_startup(self, app: web.Application) -> None:
        audits, cfg = getattr(self.engine, "audits", None), self.engine.config
        if audits is not None and cfg.audit_rate > 0:
            if cfg.audit_db is None:
                log.warning("auditing %g of reusing requests without a savings database: "
                            "audits drive the fallback but are not recorded", cfg.audit_rate)
            else:
                from ...proxy.savings import SavingsWriter

                # Its own connection: in embedded mode the proxy writes the same file (WAL).
                self.audit_writer = await asyncio.to_thread(SavingsWriter, cfg.audit_db)
                audits.sink = self.audit_writer.submit
                log.info("auditing %g of reusing requests into %s", cfg.audit_rate,
                         cfg.audit_db)
        self.worker.start()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.worker.stop()
        if self.audit_writer is not None:
            self.engine.audits.sink = None
            await self.audit_writer.close()

    @property
    def policies(self) -> tuple[str, ...]:
        """The policies the engine can run (clip only with its auxiliary model)."""
        return tuple(getattr(self.engine, "available_policies", POLICIES))

    def _check_worker(self) -> None:
        if not self.worker.alive():
            raise ApiError("the engine worker is not running", status=503)

    def submit(self, req: GenerationRequest) -> GenerationJob:
        self._check_worker()
        self.requests += 1
        return self.worker.submit(req)

    async def call(self, fn):
        """``fn(engine)`` on the worker thread, after the jobs queued before it."""
        self._check_worker()
        return await self.worker.call(fn)

    async def stream(self, request: web.Request, job: GenerationJob, chunks: AsyncIterator[dict],
                     framing=None) -> web.StreamResponse:
        """Write chunks as SSE in ``framing`` (default: OpenAI ``data:`` lines and [DONE])."""
        framing = framing or OpenAIFraming()
        resp = web.StreamResponse(headers=SSE_HEADERS)
        try:
            await resp.prepare(request)
            try:
                async for chunk in chunks:
                    await resp.write(framing.chunk(chunk))
                tail = framing.end()
            except EngineFailed as e:
                tail = framing.fail(str(e))
            await resp.write(tail)
            await resp.write_eof()
        except ConnectionResetError:  # the client left: the finally stops the engine
            log.info("client disconnected from a stream; cancelling")
        finally:
            job.cancel()
        return resp

    async def run(self, request: web.Request, req: GenerationRequest):
        """Submit and collect a non-streaming request; None if the client went away."""
        job = self.submit(req)
        try:
            return await collect(job, request)
        finally:
            job.cancel()

    # ---- generation endpoints --------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        req = await parse(self.parser.generate, await read_json(request))
        if req.stream:
            job = self.submit(req)
            return await self.stream(request, job, generate_chunks(job, req, request, started))
        got = await self.run(request, req)
        if got is None:
            return web.Response(status=499)
        return web.json_response(generate_json(req, got.text, got.output_ids, got.done, started))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = await parse(self.parser.chat, await read_json(request))
        if req.stream:
            job = self.submit(req)
            return await self.stream(request, job, chat_chunks(job, req, request))
        completion = await self.chat_completion(request, req)
        if completion is None:
            return web.Response(status=499)
        return web.json_response(completion)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await parse(self.parser.completion, await read_json(request))
        if req.stream:
            job = self.submit(req)
            return await self.stream(request, job, completion_chunks(job, req, request))
        got = await self.run(request, req)
        if got is None:
            return web.Response(status=499)
        return web.json_response(completion_json(req, got.text, got.done, int(time.time())))

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic /v1/messages, translated onto the chat path (proxy/anthropic.py)."""
        body = await read_json(request)
        chat = messages_to_chat(body)
        req = await parse(self.parser.chat, carry_irminsul(body, chat.body))
        stops = chat.body.get("stop", ())
        if req.stream:
            job = self.submit(req)
            translator = MessageStream(model=chat.model, stop_sequences=stops,
                                       input_tokens=len(req.ids))
            return await self.stream(request, job, chat_chunks(job, req, request),
                                     AnthropicFraming(translator))
        completion = await self.chat_completion(request, req)
        if completion is None:
            return web.Response(status=499)
        return web.json_response(chat_to_message(completion, model=chat.model,
                                                 stop_sequences=stops))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI /v1/responses, translated onto the chat path (proxy/responses.py)."""
        body = await read_json(request)
        chat = responses_to_chat(body)
        req = await parse(self.parser.chat, carry_irminsul(body, chat.body))
        if req.stream:
            job = self.submit(req)
            translator = ResponsesStream(request=body, model=chat.model)
            return await self.stream(request, job, chat_chunks(job, req, request),
                                     ResponsesFraming(translator))
        completion = await self.chat_completion(request, req)
        if completion is None:
            return web.Response(status=499)
        return web.json_response(chat_to_response(completion, request=body, model=chat.model))

    async def chat_completion(self, request: web.Request, req: GenerationRequest):
        got = await self.run(request, req)
        if got is None:
            return None
        return chat_json(req, parse_output(req, got.text), got.done, int(time.time()))

    # ---- information and control -----------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if not self.worker.alive():
            return web.json_response({"status": "engine worker stopped"}, status=503)
        # 200 means alive; a failed self-check or audit window (serving prefix only) is
        # reported, not fatal.
        check, audits = getattr(self.engine, "check", None), getattr(self.engine, "audits", None)
        gate = getattr(self.engine, "gate", None)
        reasons = fallback_reasons(self.engine)
        return web.json_response({
            "status": "degraded" if reasons else "ok",
            "policy": getattr(self.engine, "served_policy", self.engine.config.policy),
            "fallback_reasons": [{"cause": c, "reason": r} for c, r in reasons],
            "self_check": None if check is None else check.to_json(),
            "gate": None if gate is None else gate.to_json(),
            "audit": None if audits is None else audits.snapshot(),
        })

    async def metrics_text(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.engine.model_name, "object": "model", "created": self.created,
                "owned_by": "irminsul", "root": self.engine.config.model_dir,
                "max_model_len": self.engine.config.max_seq_len}
        return web.json_response({"object": "list", "data": [card]})

    async def model_info(self, request: web.Request) -> web.Response:
        cfg, hf = self.engine.config, self.engine.hf_config
        return web.json_response({
            "model_path": cfg.model_dir,
            "tokenizer_path": cfg.model_dir,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": hf.get("model_type"),
            "architectures": hf.get("architectures"),
            "served_model_name": self.engine.model_name,
            "max_seq_len": cfg.max_seq_len,
            "model_fingerprint": self.engine.model_fingerprint,
        })

    async def capability(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response(capabilities(
            engine="embedded", model=self.engine.model_name,
            model_fingerprint=self.engine.model_fingerprint, chunker=cfg.chunker.to_json(),
            policies=self.policies,
            default_policy=getattr(self.engine, "served_policy", cfg.policy),
        ))

    async def flush_cache(self, request: web.Request) -> web.Response:
        # Runs on the worker after the jobs queued before it, never during a generation.
        await self.call(lambda engine: engine.flush_cache())
        return web.Response(text="Cache flushed.\n")

    async def stats(self, request: web.Request) -> web.Response:
        engine_stats = await self.call(lambda engine: engine.stats())
        server = {"requests": self.requests, "queued": self.worker.queued,
                  "annotations_seen": self.parser.annotations_seen,
                  "annotations_malformed": self.parser.malformed_annotations}
        return web.json_response({**engine_stats, "server": server})


ENGINE_SERVER = web.AppKey("irminsul_engine_server", EngineServer)


def create_engine_app(engine) -> web.Application:
    """An aiohttp app serving ``engine``; its worker thread starts and stops with the app."""
    srv = EngineServer(engine)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[ENGINE_SERVER] = srv
    app.on_startup.append(srv.on_startup)
    app.on_cleanup.append(srv.on_cleanup)
    app.add_routes([
        web.post("/generate", srv.generate),
        web.post("/v1/chat/completions", srv.chat_completions),
        web.post("/v1/completions", srv.completions),
        web.post("/v1/messages", srv.messages),
        web.post("/v1/responses", srv.responses),
        web.get("/v1/models", srv.models),
        web.get("/model_info", srv.model_info),
        web.get("/get_model_info", srv.model_info),
        web.get("/health", srv.health),
        web.get("/metrics", srv.metrics_text),
        web.post("/flush_cache", srv.flush_cache),
        web.get(CAPABILITY_PATH, srv.capability),
        web.get("/irminsul/stats", srv.stats),
    ])
    return app
