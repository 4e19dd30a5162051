"""Prometheus metrics of the embedded engine server (GET /metrics): whether it serves ``prefix``
instead of its configured policy and why (start-up self-check, quality audits), and the audits'
counters. Read from the engine at scrape time, without waiting for the engine's lock."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


def fallback_reasons(engine) -> list[tuple[str, str]]:
    """(cause, reason) for each reason the engine serves prefix only: cause "self_check" or
    "audit"; empty while it serves its configured policy."""
    out = []
    check = getattr(engine, "check", None)
    if check is not None and not check.ok:
        out += [("self_check", r) for r in check.reasons]
    audits = getattr(engine, "audits", None)
    if audits is not None and audits.fallback_reason is not None:
        out.append(("audit", audits.fallback_reason))
    return out


class EngineCollector:
    """A custom collector over one engine (its own registry: two servers in one process, as in
    tests, never share series)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        reasons = fallback_reasons(self.engine)
        degraded = GaugeMetricFamily(
            "irminsul_engine_prefix_fallback",
            "1 while the engine serves prefix instead of its configured reuse policy",
            labels=["configured_policy"])
        degraded.add_metric([self.engine.config.policy], 1.0 if reasons else 0.0)
        yield degraded
        why = GaugeMetricFamily(
            "irminsul_engine_prefix_fallback_reason",
            "1 for each reason of the prefix fallback (cause: self_check or audit)",
            labels=["cause", "reason"])
        for cause, reason in reasons:
            why.add_metric([cause, reason], 1.0)
        yield why
        audits = getattr(self.engine, "audits", None)
        if audits is None:
            return
        snap = audits.snapshot()
        done = CounterMetricFamily("irminsul_engine_audits",
                                   "Quality audits made (a served request re-run with full)",
                                   labels=["verdict"])
        for verdict, n in snap["audits"].items():
            done.add_metric([verdict], n)
        yield done
        for name, key, text in (
            ("irminsul_engine_audit_samples", "sampled", "Served requests queued for an audit"),
            ("irminsul_engine_audit_samples_dropped", "dropped",
             "Samples dropped because the audit queue was full"),
            ("irminsul_engine_audit_errors", "errors", "Audits that raised"),
        ):
            yield CounterMetricFamily(name, text, value=snap[key])
        yield GaugeMetricFamily("irminsul_engine_audit_queue", "Samples waiting for an audit",
                                value=snap["queued"])
        for name, key, text in (
            ("irminsul_engine_audit_window_kl", "window_kl",
             "Mean KL(full || served) at the first position over the audit window"),
            ("irminsul_engine_audit_window_agreement", "window_agreement",
             "Mean greedy agreement with full over the audit window"),
        ):
            if snap[key] is not None:
                yield GaugeMetricFamily(name, text, value=snap[key])


class EngineMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
