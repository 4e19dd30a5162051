"""Prometheus metrics of one proxy app (its own CollectorRegistry, so two apps in one process,
as in tests, never share or collide), served at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from irminsul.proxy.savings import RequestRow

# Endpoints get their own label value; any other relayed path is counted as "other", so a
# client probing random URLs cannot grow the label set without bound.
ENDPOINTS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
    "/v1/messages/count_tokens", "/generate",
})  # fmt: skip
# TTFT spans a few ms (all cached, tiny model) to minutes (cold 128K prefill on one GPU).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ProxyMetrics:
    """Counters and histograms of served requests; ``observe`` takes the request's row."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("irminsul_proxy_requests", "Requests served, by final status",
                                ["endpoint", "status", "mode"], registry=r)
        self.prompt_tokens = Counter("irminsul_proxy_prompt_tokens",
                                     "Prompt tokens of answered requests", ["endpoint"],
                                     registry=r)
        self.saved_tokens = Counter(
            "irminsul_proxy_saved_tokens",
            "Prompt tokens whose prefill was skipped: kind=exact_prefix (prefix cache) or "
            "reused (content reuse, irminsul mode)", ["kind"], registry=r)
        self.recomputed_tokens = Counter("irminsul_proxy_recomputed_tokens",
                                         "Tokens of hit chunks computed anyway", registry=r)
        self.potential_tokens = Counter(
            "irminsul_proxy_potential_reuse_tokens",
            "Tokens of chunks seen before that an exact-prefix cache missed (stock mode)",
            registry=r)
        self.completion_tokens = Counter("irminsul_proxy_completion_tokens",
                                         "Generated tokens", registry=r)
        self.ttft = Histogram("irminsul_proxy_ttft_seconds",
                              "Time from request to first generated content (streams)",
                              ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("irminsul_proxy_request_seconds", "Request duration",
                                  ["endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.analysis = Histogram("irminsul_proxy_analysis_seconds",
                                  "Tokenize + chunk + divergence time per analysed prompt",
                                  buckets=TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("irminsul_proxy_in_flight", "Requests being served", registry=r)

    def observe(self, row: RequestRow) -> None:
        """Count one finished request."""
        ep = row.endpoint if row.endpoint in ENDPOINTS else "other"
        self.requests.labels(ep, str(row.status or 0), row.upstream_mode).inc()
        if row.prompt_tokens is not None:
            self.prompt_tokens.labels(ep).inc(row.prompt_tokens)
        if row.exact_prefix_tokens:
            self.saved_tokens.labels("exact_prefix").inc(row.exact_prefix_tokens)
        if row.reused_tokens:
            self.saved_tokens.labels("reused").inc(row.reused_tokens)
        if row.recomputed_tokens:
            self.recomputed_tokens.inc(row.recomputed_tokens)
        if row.potential_reuse_tokens:
            self.potential_tokens.inc(row.potential_reuse_tokens)
        if row.completion_tokens:
            self.completion_tokens.inc(row.completion_tokens)
        if row.ttft_ms is not None:
            self.ttft.labels(ep).observe(row.ttft_ms / 1000.0)
        if row.total_ms is not None:
            self.duration.labels(ep).observe(row.total_ms / 1000.0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
