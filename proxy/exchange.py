"""One request as the proxy saw it, and the savings-log row made from it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.proxy.flops import reuse_savings
from irminsul.proxy.pipeline import Analysis
from irminsul.proxy.prewarm import Prewarmed
from irminsul.proxy.savings import RequestRow, counts_fields
from irminsul.proxy.usage import UpstreamUsage

CLIENT_CLOSED = 499  # nginx's status for "client closed the request": nothing was answered


@dataclass
class Exchange:
    """Facts about one request, filled in as it is served (one handler owns it)."""

    endpoint: str
    mode: str  # upstream_mode of the row
    t0: float  # time.monotonic() when the request arrived
    session: str = "unknown"
    tenant: str | None = None
    model: str = "unknown"
    stream: bool = False
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    usage: UpstreamUsage | None = None
    analysis: asyncio.Future[Analysis] | None = None
    start_analysis: Callable[[], asyncio.Future[Analysis]] | None = None  # deferred (stock)
    prompt: str | None = None  # for --log-prompts when no rendered text exists
    prewarmed: Prewarmed | None = None  # pre-warm requests sent ahead of this one (--prewarm)
    done_s: float | None = None

    def first_content(self) -> None:
        """Mark the time to first generated content (the first call counts)."""
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.t0

    def fail(self, status: int, message: str) -> None:
        """Record a failure; the first failure recorded wins (it is the cause)."""
        if self.error is None:
            self.status, self.error = status, message

    def finish(self, status: int | None = None) -> None:
        if self.status is None:
            self.status = status
        if self.done_s is None:
            self.done_s = time.monotonic() - self.t0


def stock_counts(usage: UpstreamUsage | None) -> ReuseCounts | None:
    """A stock engine's split: its exact prefix was skipped, everything else computed."""
    if usage is None or usage.prompt_tokens is None or usage.exact_prefix is None:
        return None
    if usage.exact_prefix > usage.prompt_tokens:
        return None
    return ReuseCounts(prompt_tokens=usage.prompt_tokens, exact_prefix_tokens=usage.exact_prefix,
                       new_tokens=usage.prompt_tokens - usage.exact_prefix, policy="")


def build_row(ex: Exchange, analysis: Analysis | None, *, hf_config: dict | None = None,
              log_prompts: bool = False) -> RequestRow:
    """The row for ``ex``. Token counters are filled only for an answered request (status
    < 400), from what the upstream reported; an error row carries its status and message."""
    fields: dict = {
        "session": ex.session, "model": ex.model or "unknown", "endpoint": ex.endpoint,
        "upstream_mode": ex.mode, "tenant": ex.tenant, "stream": ex.stream,
        "status": ex.status, "error": ex.error,
        "ttft_ms": None if ex.ttft_s is None else ex.ttft_s * 1000.0,
        "total_ms": None if ex.done_s is None else ex.done_s * 1000.0,
    }
    if analysis is not None:
        d = analysis.divergence
        fields.update(turn=analysis.turn, diverge_offset=d.offset, diverge_message=d.message_index,
                      miss_cause=d.kind, miss_detail=d.detail)
        if log_prompts:
            fields["prompt"] = analysis.text
    if log_prompts and fields.get("prompt") is None:
        fields["prompt"] = ex.prompt
    answered = ex.error is None and ex.status is not None and ex.status < 400
    u = ex.usage if answered else None
    if u is not None:
        fields["completion_tokens"] = u.completion_tokens
        counts = u.counts or stock_counts(u)
        if counts is None:
            fields["prompt_tokens"] = u.prompt_tokens
        else:
            fields.update(counts_fields(counts))
            if hf_config is not None:
                saved = reuse_savings(hf_config, counts)
                fields.update(flops_saved=saved.flops, energy_saved_j=saved.joules)
        if u.counts is None:  # stock: chunks are the proxy's own, if it has a tokenizer
            fields.update(chunks_total=None, chunks_hit=None)
        if u.counts is None and counts is not None and analysis is not None:
            # what a content cache could have added, from the proxy's own chunking
            fields.update(chunks_total=len(analysis.chunks), chunks_hit=len(analysis.hit_spans))
            room = counts.prompt_tokens - counts.exact_prefix_tokens
            fields["potential_reuse_tokens"] = min(
                room, analysis.potential_reuse(counts.exact_prefix_tokens))
    return RequestRow(**fields)
