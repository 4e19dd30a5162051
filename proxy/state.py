"""What the handlers share for the app's lifetime, under one AppKey; and how a finished
request becomes a row and metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from irminsul.chunking.keys import Chunker
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.exchange import Exchange, build_row
from irminsul.proxy.metrics import ProxyMetrics
from irminsul.proxy.pipeline import Pipeline
from irminsul.proxy.recorder import Recorder
from irminsul.proxy.savings import SavingsWriter
from irminsul.proxy.upstream import Upstream, UpstreamInfo

log = logging.getLogger(__name__)


@dataclass
class ProxyState:
    config: ProxyConfig
    metrics: ProxyMetrics
    tokenizer: Any = None  # a ModelTokenizer, or None: relay and log without chunking
    hf_config: dict | None = None  # the model's config.json, for FLOPs saved
    stock_fingerprint: str = ""  # model_fingerprint(model_dir), used in stock mode
    upstream: Upstream | None = None
    pipeline: Pipeline | None = None
    writer: SavingsWriter | None = None
    recorder: Recorder | None = None
    pending: set[asyncio.Task] = field(default_factory=set)

    def sync_pipeline(self, info: UpstreamInfo) -> None:
        """Make the pipeline chunk as the engine does: in irminsul mode with the engine's
        chunker and fingerprint, else with the proxy's. Changes pipeline.chunker/fingerprint."""
        if self.pipeline is None:
            return
        if info.mode == "irminsul":
            chunker = info.chunker or self.config.chunker
            fingerprint = info.model_fingerprint
        else:
            chunker, fingerprint = self.config.chunker, self.stock_fingerprint
        if self.pipeline.chunker.config != chunker:
            self.pipeline.chunker = Chunker(chunker)
        self.pipeline.model_fingerprint = fingerprint

    def finish(self, ex: Exchange) -> None:
        """Log ``ex`` (row + metrics) now, or once its prompt analysis is done; a deferred
        analysis (stock mode) starts here, after the client has its answer. Never raises."""
        if ex.analysis is None and ex.start_analysis is not None:
            try:
                ex.analysis = ex.start_analysis()
            except RuntimeError:  # the pipeline is shut down: log without it
                log.warning("%s: pipeline closed; row logged without analysis", ex.endpoint)
        fut = ex.analysis
        if fut is None or fut.done():
            self._log(ex)
            return
        task = asyncio.ensure_future(self._log_later(ex))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _log_later(self, ex: Exchange) -> None:
        try:
            await asyncio.wait([ex.analysis])
        finally:
            self._log(ex)

    def _log(self, ex: Exchange) -> None:
        fut = ex.analysis
        analysis = None
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            analysis = fut.result()
            self.metrics.analysis.observe(analysis.seconds)
        try:
            row = build_row(ex, analysis, hf_config=self.hf_config,
                            log_prompts=self.config.log_prompts)
        except ValueError as e:  # inconsistent upstream counts: keep the request, say why
            log.warning("%s: row not logged with counts (%s)", ex.endpoint, e)
            ex.usage = None
            row = build_row(ex, analysis, log_prompts=self.config.log_prompts)
        self.metrics.observe(row)
        if self.writer is not None:
            try:
                self.writer.submit(row)
            except RuntimeError:  # closed: the app is shutting down
                log.warning("savings writer closed; a %s row was not logged", ex.endpoint)

    async def drain(self) -> None:
        """Wait for rows still waiting on their analysis."""
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)


STATE_KEY = web.AppKey("irminsul_proxy_state", ProxyState)
