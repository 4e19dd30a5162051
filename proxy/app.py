"""The proxy's aiohttp application: ``create_app(config)``, and ``run_proxy(config)`` for the CLI.

Start-up, in order: load the tokenizer (if any) and the model's config.json, open the savings
log and the recorder, then (an embedded engine first, when ``upstream_ctx`` is given) open the
upstream session, probe the upstream and build the prompt pipeline to match its mode. Shutdown
runs the same steps backwards; rows still waiting for their prompt analysis are written first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from irminsul.chunking.keys import Chunker
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.handlers import api_handler, metrics, passthrough
from irminsul.proxy.metrics import ProxyMetrics
from irminsul.proxy.pipeline import Pipeline
from irminsul.proxy.recorder import Recorder
from irminsul.proxy.savings import SavingsWriter
from irminsul.proxy.state import STATE_KEY, ProxyState
from irminsul.proxy.translated import count_tokens
from irminsul.proxy.upstream import UPSTREAM_KEY, UpstreamCtx, upstream_cleanup_ctx

log = logging.getLogger("irminsul.proxy")


def _load_tokenizer(path: str):
    from irminsul.chunking.tokenizer import ModelTokenizer

    return ModelTokenizer.from_dir(path)


def _model_files(model_dir: str | None) -> tuple[dict | None, str]:
    """(config.json as a dict, model_fingerprint) of ``model_dir``; (None, "") without one."""
    if model_dir is None:
        return None, ""
    from irminsul.chunking.fingerprint import model_fingerprint

    config_path = Path(model_dir) / "config.json"
    hf_config = json.loads(config_path.read_text()) if config_path.is_file() else None
    try:
        fingerprint = model_fingerprint(model_dir)
    except FileNotFoundError as e:
        log.warning("no model fingerprint (%s); chunk keys are not tied to a model", e)
        fingerprint = ""
    return hf_config, fingerprint


def _state_ctx(config: ProxyConfig, tokenizer: Any):
    async def ctx(app: web.Application):
        st = app[STATE_KEY]
        if tokenizer is not None:
            st.tokenizer = tokenizer
        elif config.tokenizer_dir is not None:
            st.tokenizer = await asyncio.to_thread(_load_tokenizer, config.tokenizer_dir)
        st.hf_config, st.stock_fingerprint = await asyncio.to_thread(_model_files,
                                                                     config.model_dir)
        if st.tokenizer is None:
            log.warning("no tokenizer (give --tokenizer or --model-dir): relaying and logging "
                        "requests without tokenizing or chunking them")
        else:
            log.info("tokenizer %s (vocab %d)", getattr(st.tokenizer, "name", "?"),
                     getattr(st.tokenizer, "vocab_size", -1))
            st.pipeline = Pipeline(st.tokenizer, Chunker(config.chunker),
                                   model_fingerprint=st.stock_fingerprint,
                                   seen_tokens=config.seen_chunk_tokens)
        if config.db is not None:
            st.writer = await asyncio.to_thread(SavingsWriter, config.db)
            log.info("savings log: %s", config.db)
        if config.record is not None:
            st.recorder = Recorder(config.record)
            log.info("recording request bodies to %s", config.record)
        try:
            yield
        finally:
            await st.drain()
            if st.pipeline is not None:
                await asyncio.to_thread(st.pipeline.close)
            await st.drain()  # rows whose analysis finished during the pipeline's shutdown
            if st.writer is not None:
                await st.writer.close()
            if st.recorder is not None:
                await st.recorder.close()

    return ctx


def _wire_upstream(config: ProxyConfig):
    """After the probe: hand the Upstream to the state and keep the pipeline in step with
    its mode (again whenever a later probe changes it)."""

    async def ctx(app: web.Application):
        st, up = app[STATE_KEY], app[UPSTREAM_KEY]
        st.upstream = up
        st.sync_pipeline(up.info)
        up.on_probe = st.sync_pipeline
        if up.info.mode == "irminsul" and config.reorder != "off":
            log.info("--reorder %s is not applied: an irminsul engine reuses content at any "
                     "position", config.reorder)
        yield

    return ctx


def create_app(config: ProxyConfig, *, upstream_ctx: UpstreamCtx | None = None,
               tokenizer: Any = None) -> web.Application:
    """The proxy app. ``upstream_ctx``: an async generator function taking the app and yielding
    the upstream URL once (start an embedded engine before the yield, stop it after); needed
    when ``config.upstream`` is None. ``tokenizer``: a ModelTokenizer already loaded (else
    read from config.tokenizer_dir)."""
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE_KEY] = ProxyState(config=config, metrics=ProxyMetrics())
    app.cleanup_ctx.append(_state_ctx(config, tokenizer))
    app.cleanup_ctx.append(upstream_cleanup_ctx(config, upstream_ctx))
    app.cleanup_ctx.append(_wire_upstream(config))
    r = app.router
    for api, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions"),
                      ("generate", "/generate"), ("messages", "/v1/messages"),
                      ("responses", "/v1/responses")):
        r.add_post(path, api_handler(api))
    r.add_post("/v1/messages/count_tokens", count_tokens)
    r.add_get("/metrics", metrics)
    r.add_route("*", "/{tail:.*}", passthrough)
    return app


def run_proxy(config: ProxyConfig, *, upstream_ctx: UpstreamCtx | None = None,
              tokenizer: Any = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM). A client that disconnects cancels its
    handler (handler_cancellation), which closes the upstream request."""
    app = create_app(config, upstream_ctx=upstream_ctx, tokenizer=tokenizer)
    web.run_app(app, host=config.host, port=config.port, handler_cancellation=True,
                access_log=None, print=lambda text: log.info("%s", text.strip()))
