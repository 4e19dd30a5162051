"""Quality audits (audit.py): served requests with reused KV re-run with `full` in idle time,
recorded in the savings database, shown by `irminsul report`, and a prefix fallback past the
thresholds (log, /health, /metrics).

Real engine servers on 127.0.0.1 (port 0) over the tiny random checkpoint, real SQLite files.
The audit's figures are checked against the quality harness's own path (probe.Prober: the
request's prompt under the same policy on a store warmed the same way, against full).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web
from click.testing import CliRunner
from support.models import yarn_model  # noqa: F401  (fixture)
from support.savings import make_row

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.engine_adapter.embedded import audit as audit_mod
from irminsul.engine_adapter.embedded.audit import AUDIT_TOKENS, Auditor
from irminsul.engine_adapter.embedded.command import serve_command, start_embedded
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.planner import PolicyArgs
from irminsul.engine_adapter.embedded.probe import Prober, agreement, kl_divergence
from irminsul.engine_adapter.embedded.proxy_upstream import embedded_upstream_ctx
from irminsul.engine_adapter.embedded.server import ENGINE_SERVER
from irminsul.engine_adapter.embedded.store import ChunkStore
from irminsul.proxy import migrations
from irminsul.proxy.app import create_app
from irminsul.proxy.audits import AuditRow
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.report import build_report, report_command
from irminsul.proxy.report_render import render
from irminsul.proxy.savings import SavingsLog

CHUNKER = ChunkerConfig(min_tokens=8, avg_tokens=32, max_tokens=128)
BODY = "\n".join(f"def function_{i}(value):\n    return value * {i} + {i * i}"
                 for i in range(14))
HEAD_A = "Session started 2025-01-01. Working directory: /srv/app"
HEAD_B = "Session started 2025-03-17 18:42 for maria. Working directory: /home/maria/app, 3 files"
QUESTION = "Question one?"
NEW = 8  # output tokens per request (ignore_eos: every request produces them all)


def chat(head: str, question: str | None = None, **extra) -> dict:
    messages = [{"role": "system", "content": head}, {"role": "user", "content": BODY}]
    if question is not None:
        messages.append({"role": "user", "content": question})
    return {"model": "m", "messages": messages, "max_tokens": NEW, "temperature": 0,
            "ignore_eos": True, **extra}


def config(model_dir, db: Path | None, **kw) -> EngineConfig:
    return EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32",
                        max_seq_len=2048, chunker=CHUNKER, policy="pic", self_check=False,
                        audit_rate=1.0, audit_db=None if db is None else str(db), **kw)


async def post(http, path, body) -> dict:
    async with http.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def get_json(http, path) -> dict:
    async with http.get(path) as resp:
        assert resp.status == 200
        return await resp.json()


async def get_text(http, path) -> str:
    async with http.get(path) as resp:
        assert resp.status == 200
        return await resp.text()


async def audits_done(http, n: int, timeout: float = 60.0) -> dict:
    """Wait until the engine has made ``n`` audits and has none queued; its audit stats."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        snap = (await get_json(http, "/irminsul/stats"))["audit"]
        if sum(snap["audits"].values()) + snap["errors"] >= n and snap["queued"] == 0:
            return snap
        assert loop.time() < end, f"audits not done in {timeout} s: {snap}"
        await asyncio.sleep(0.05)


def audit_rows(db: Path) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audits ORDER BY id")]
    finally:
        conn.close()


class Served:
    """An engine server started as `irminsul serve` starts it; an HTTP session on it."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    async def __aenter__(self):
        self.runner, url = await start_embedded(self.cfg, "127.0.0.1", 0)
        self.engine = self.runner.app[ENGINE_SERVER].engine
        self.http = aiohttp.ClientSession(base_url=url)
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        await self.runner.cleanup()  # stops the worker, then flushes and closes the writer


def metric(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of ``name`` in Prometheus exposition text."""
    out = []
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            head, value = line.rsplit(" ", 1)
            out.append((head[len(name):], float(value)))
    return out


# ---- end to end ------------------------------------------------------------------------------


async def test_every_reusing_request_is_audited_once_and_matches_the_harness(
        yarn_model, tmp_path):  # noqa: F811
    db = tmp_path / "savings.db"
    async with Served(config(yarn_model, db)) as s:
        first = await post(s.http, "/v1/chat/completions", chat(HEAD_A))
        assert first["usage"]["irminsul"]["reused_tokens"] == 0  # nothing stored yet
        # blend at r = 0.9 on this prompt: the greedy tokens agree for a while, then differ,
        # which checks the teacher-forced positions one by one.
        moved = await post(s.http, "/v1/chat/completions", chat(
            HEAD_B, QUESTION, irminsul_policy="blend", irminsul_policy_args={"r": 0.9}))
        counts = ReuseCounts.from_json(moved["usage"]["irminsul"])
        assert counts.reused_tokens > 0 and counts.policy == "blend"
        # Not audited: the exact prefix only (pic and prefix on a repeat), and full.
        again = await post(s.http, "/v1/chat/completions", chat(HEAD_A))
        prefix = await post(s.http, "/v1/chat/completions",
                            chat(HEAD_A, irminsul_policy="prefix"))
        full = await post(s.http, "/v1/chat/completions",
                          chat(HEAD_B, "And function_5?", irminsul_policy="full"))
        for out in (again, prefix):
            c = out["usage"]["irminsul"]
            assert c["exact_prefix_tokens"] > 0 and c["reused_tokens"] == 0
        assert full["usage"]["irminsul"]["reused_tokens"] == 0
        snap = await audits_done(s.http, 1)
        assert snap["audits"] == {"pass": 1, "fail": 0, "fallback": 0} or \
            snap["audits"] == {"pass": 0, "fail": 1, "fallback": 0}
        assert (snap["sampled"], snap["dropped"], snap["errors"]) == (1, 0, 0)
        metrics = await get_text(s.http, "/metrics")
        health = await get_json(s.http, "/health")
        engine = s.engine
    assert sum(v for _, v in metric(metrics, "irminsul_engine_audits_total")) == 1
    assert metric(metrics, "irminsul_engine_prefix_fallback") == [
        ('{configured_policy="pic"}', 0.0)]
    assert health["status"] == "ok" and health["policy"] == "pic"
    assert health["fallback_reasons"] == [] and health["audit"]["window"] == 1

    (row,) = audit_rows(db)
    assert row["model"] == engine.model_name and row["policy"] == "blend"
    assert json.loads(row["args"]) == {"k": 16, "r": 0.9}
    assert row["request_id"]
    assert (row["prompt_tokens"], row["exact_prefix_tokens"], row["reused_tokens"],
            row["recomputed_tokens"], row["new_tokens"]) == (
        counts.prompt_tokens, counts.exact_prefix_tokens, counts.reused_tokens,
        counts.recomputed_tokens, counts.new_tokens)
    assert row["compared_tokens"] == NEW
    assert row["kl"] > 0 and 0 < row["agreement"] < 1
    assert row["verdict"] == ("pass" if row["kl"] <= 1.0 else "fail")

    # The quality harness's path on the same prompts: warm a store with the first prompt,
    # run the moved one with blend and with full, compare. Same figures as the audit.
    tok = engine.tokenizer
    a = tok.encode_chat(chat(HEAD_A)["messages"])
    b = tok.encode_chat(chat(HEAD_B, QUESTION)["messages"])
    prober, store = Prober.of(engine), ChunkStore(1 << 30)
    prober.warm(store, a.ids, a.anchors)
    got = prober.run(store, b.ids, b.anchors, "blend", PolicyArgs(16, 0.9), NEW)
    ref = prober.run(ChunkStore(0), b.ids, b.anchors, "full", engine.defaults, NEW)
    assert got.counts.reused_tokens == counts.reused_tokens
    assert row["kl"] == pytest.approx(kl_divergence(ref.logits, got.logits), rel=1e-4, abs=1e-7)
    assert row["agreement"] == agreement(ref.tokens, got.tokens)

    report = build_report(db)
    (group, total) = report.audits
    assert (group.model, group.policy, group.audits) == (engine.model_name, "blend", 1)
    assert group.kl_mean == group.kl_max == pytest.approx(row["kl"])
    assert group.agreement_mean == pytest.approx(row["agreement"])
    assert (total.model, total.audits) == ("(all)", 1)
    text = render(report, "table")
    assert "quality audits" in text and engine.model_name in text and f"{row['kl']:.4f}" in text
    data = json.loads(render(report, "json"))
    assert data["audits"][0]["kl_mean"] == pytest.approx(row["kl"])


async def test_low_threshold_falls_back_to_prefix_after_a_full_window(
        yarn_model, tmp_path, caplog):  # noqa: F811
    db = tmp_path / "savings.db"
    cfg = config(yarn_model, db, audit_max_kl=0.0, audit_window=2)
    with caplog.at_level(logging.WARNING, logger=audit_mod.__name__):
        async with Served(cfg) as s:
            await post(s.http, "/v1/chat/completions", chat(HEAD_A))
            await post(s.http, "/v1/chat/completions", chat(HEAD_B, "Question one?"))
            snap = await audits_done(s.http, 1)
            assert snap["fallback"] is None and snap["audits"]["fail"] == 1  # window not full
            assert (await get_json(s.http, "/health"))["status"] == "ok"
            await post(s.http, "/v1/chat/completions", chat(HEAD_B, "Question two, longer?"))
            snap = await audits_done(s.http, 2)
            assert snap["audits"]["fallback"] == 1 and "KL" in snap["fallback"]
            after = await post(s.http, "/v1/chat/completions", chat(HEAD_A + " (later)"))
            metrics = await get_text(s.http, "/metrics")
            health = await get_json(s.http, "/health")
    assert "serving prefix only" in caplog.text and "KL" in caplog.text
    counts = after["usage"]["irminsul"]
    assert counts["policy"] == "prefix" and counts["reused_tokens"] == 0
    assert metric(metrics, "irminsul_engine_prefix_fallback") == [
        ('{configured_policy="pic"}', 1.0)]
    (reason,) = metric(metrics, "irminsul_engine_prefix_fallback_reason")
    assert reason[0].startswith('{cause="audit",reason="mean KL') and reason[1] == 1.0
    assert health["status"] == "degraded" and health["policy"] == "prefix"
    assert health["fallback_reasons"][0]["cause"] == "audit"
    rows = audit_rows(db)
    assert [r["verdict"] for r in rows] == ["fail", "fallback"]
    assert all(r["kl"] > 0 for r in rows)  # what made the zero threshold trip
    report = build_report(db)
    assert report.audits[-1].fallbacks == 1 and report.audits[-1].failed == 2


async def test_embedded_proxy_and_engine_share_one_database(yarn_model, tmp_path):  # noqa: F811
    db = tmp_path / "shared.db"
    proxy_cfg = ProxyConfig(model_dir=str(yarn_model), db=str(db), audit_rate=1.0)
    app = create_app(proxy_cfg, upstream_ctx=embedded_upstream_ctx(
        proxy_cfg, engine_config=config(yarn_model, None)))  # audit_db comes from the proxy
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            await post(http, "/v1/chat/completions", chat(HEAD_A))
            moved = await post(http, "/v1/chat/completions", chat(HEAD_B, "Why?"))
            assert moved["usage"]["irminsul"]["reused_tokens"] > 0
            await audits_done(http, 1)  # /irminsul/stats is relayed to the engine
    finally:
        await runner.cleanup()
    out = CliRunner().invoke(report_command, ["--db", str(db)])
    assert out.exit_code == 0, out.output
    assert "requests: 2" in out.output and "quality audits" in out.output
    assert len(audit_rows(db)) == 1


# ---- pieces ----------------------------------------------------------------------------------


def counts(reused: int) -> ReuseCounts:
    return ReuseCounts(prompt_tokens=100, exact_prefix_tokens=10, reused_tokens=reused,
                       recomputed_tokens=5, new_tokens=85 - reused, policy="pic")


def draws(auditor: Auditor, n: int, reused: int = 40) -> list[bool]:
    ids, logits = torch.zeros(100, dtype=torch.int32).numpy(), torch.zeros(16)
    return [auditor.begin("r", ids, counts(reused), "pic", PolicyArgs(), logits) is not None
            for _ in range(n)]


def test_sampling_rate_seed_and_what_is_never_sampled():
    cfg = EngineConfig(model_dir="m", audit_rate=0.25, audit_seed=7)
    first, second = draws(Auditor(cfg, "m"), 400), draws(Auditor(cfg, "m"), 400)
    assert first == second  # seeded: the same requests are drawn
    assert 60 <= sum(first) <= 140  # 100 expected; binomial sd ~8.7
    assert all(draws(Auditor(EngineConfig(model_dir="m", audit_rate=1.0), "m"), 50))
    assert not any(draws(Auditor(EngineConfig(model_dir="m"), "m"), 50))  # rate 0: off
    # a plan that reused nothing (exact prefix only, full, prefix) is never sampled
    assert not any(draws(Auditor(EngineConfig(model_dir="m", audit_rate=1.0), "m"), 50, 0))


def test_queue_is_bounded_and_counts_drops():
    auditor = Auditor(EngineConfig(model_dir="m", audit_rate=1.0), "m", queue_size=2)
    ids, logits = torch.zeros(100, dtype=torch.int32).numpy(), torch.zeros(16)
    for _ in range(5):
        auditor.submit(auditor.begin("r", ids, counts(40), "pic", PolicyArgs(), logits))
    snap = auditor.snapshot()
    assert (snap["sampled"], snap["dropped"], snap["queued"]) == (2, 3, 2)


def test_a_sample_keeps_at_most_the_audit_window():
    auditor = Auditor(EngineConfig(model_dir="m", audit_rate=1.0), "m")
    logits = torch.tensor([0.0, 3.0, 1.0])
    s = auditor.begin("r", torch.zeros(4, dtype=torch.int32).numpy(), counts(40), "pic",
                      PolicyArgs(), logits)
    assert s.positions() == [1]  # no output: the first position's greedy token still counts
    for i in range(AUDIT_TOKENS + 5):
        s.step(logits, i % 3)
    assert len(s.greedy) == len(s.served) == AUDIT_TOKENS and set(s.greedy) == {1}


# ---- database and configuration ---------------------------------------------------------------

ROW = {"request_id": "r1", "model": "m", "policy": "pic", "args": '{"k": 4}',
       "prompt_tokens": 10, "exact_prefix_tokens": 0, "reused_tokens": 6,
       "recomputed_tokens": 1, "new_tokens": 3, "compared_tokens": 4, "kl": 0.5,
       "agreement": 0.25, "verdict": "pass", "audit_ms": 3.0}


def test_migration_applies_to_a_database_of_the_previous_version(tmp_path, monkeypatch):
    db = tmp_path / "old.db"
    previous = [m for m in migrations.MIGRATIONS if m.__name__ != "m003_audits"]
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", previous)
        with SavingsLog(db) as log:
            log.write([make_row()])
        conn = sqlite3.connect(db)
        assert "audits" not in {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.close()
    with SavingsLog(db) as log:
        assert log.applied == ["m003_audits"]
        assert log.count() == 1  # the old rows are kept
        log.write([AuditRow(**ROW)])
    assert [(r["request_id"], r["kl"], r["agreement"]) for r in audit_rows(db)] == [
        ("r1", 0.5, 0.25)]
    text = render(build_report(db), "table")
    assert "quality audits" in text


def test_report_without_audits_has_no_audit_section(tmp_path):
    db = tmp_path / "plain.db"
    with SavingsLog(db) as log:
        log.write([make_row()])
    report = build_report(db)
    assert report.audits == ()
    assert "quality audits" not in render(report, "table")
    assert "audits" not in json.loads(render(report, "json"))


@pytest.mark.parametrize("bad", [
    {"prompt_tokens": 11}, {"agreement": 1.5}, {"kl": -0.1}, {"kl": float("nan")},
    {"verdict": "ok"}, {"args": "not json"}, {"compared_tokens": 0}, {"request_id": ""}])
def test_audit_row_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        AuditRow(**{**ROW, **bad})


@pytest.mark.parametrize("bad", [{"audit_rate": 1.5}, {"audit_rate": -0.1},
                                 {"audit_window": 0}, {"audit_max_kl": -1},
                                 {"audit_min_agreement": 2}, {"audit_seed": 1.5},
                                 {"audit_db": ""}])
def test_config_rejects_bad_audit_settings(bad):
    with pytest.raises(ValueError):
        EngineConfig(model_dir="m", **bad)


def test_serve_cli_takes_audit_options():
    runner = CliRunner()
    out = runner.invoke(serve_command, ["--help"])
    assert "--audit-rate" in out.output and "--db" in out.output
    bad = runner.invoke(serve_command, ["--audit-rate", "1.5"])
    assert bad.exit_code == 2 and "audit-rate" in bad.output
