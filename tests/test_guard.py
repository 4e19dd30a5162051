"""The engine's start-up self-check (guard.py): a passing check keeps the configured policy;
a failing one (a threshold no reuse can meet, a broken δ-rotation) makes the engine serve
prefix only and say why in its stats, /health and log."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from support.models import yarn_model  # noqa: F401  (fixture)

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.embedded import guard
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.server import create_engine_app
from irminsul.kernels.rope import delta_rotate

CHUNKER = ChunkerConfig(min_tokens=16, avg_tokens=32, max_tokens=96)


def make(model_dir, **kw) -> Engine:
    return Engine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32",
                               chunker=CHUNKER, **kw))


def shifted(engine) -> tuple[np.ndarray, np.ndarray, int]:
    """A prompt, the same body after a longer header (its chunks reusable, moved), and the
    second prompt's body start (an anchor)."""
    body = engine.tokenizer.encode(Path(guard.__file__).read_text()[:1200])
    head_a = engine.tokenizer.encode("Header one.\n")
    head_b = engine.tokenizer.encode("A much longer header, number two.\n")
    a = np.concatenate([head_a, body]).astype(np.int32)
    return a, np.concatenate([head_b, body]).astype(np.int32), len(head_b)


def reuse_of(engine, **kw) -> int:
    a, b, at = shifted(engine)
    engine.flush_cache()
    engine.prefill(a, anchors=(len(a) - len(b) + at,))
    return engine.prefill(b, anchors=(at,), **kw).counts


def test_passing_check_keeps_the_policy(yarn_model):  # noqa: F811
    eng = make(yarn_model, policy="pic")
    check = eng.check
    assert check.ok and check.reasons == () and eng.served_policy == "pic"
    assert check.rope_error <= 1e-6
    assert check.probe_reused > 0 and check.probe_kl is not None
    assert 0.0 <= check.probe_agreement <= 1.0
    stats = eng.stats()
    assert stats["self_check"]["ok"] is True and stats["engine"]["policy"] == "pic"
    assert stats["engine"]["requests"] == 0 and stats["store"]["entries"] == 0  # untouched
    assert reuse_of(eng).reused_tokens > 0


async def test_kl_threshold_failure_falls_back_to_prefix(yarn_model, aiohttp_server,  # noqa: F811
                                                         caplog):
    with caplog.at_level(logging.WARNING, logger=guard.__name__):
        eng = make(yarn_model, policy="blend", check_max_kl=0.0)
    assert not eng.check.ok and eng.served_policy == "prefix"
    assert eng.check.probe_kl > 0
    assert any("KL(full || blend)" in r for r in eng.check.reasons)
    assert "serving prefix only" in caplog.text and "KL" in caplog.text
    counts = reuse_of(eng, policy="pic", policy_args={"k": 0})
    assert counts.policy == "prefix" and counts.reused_tokens == 0
    assert eng.stats()["engine"]["policy"] == "prefix"
    assert eng.stats()["self_check"]["served_policy"] == "prefix"
    server = await aiohttp_server(create_engine_app(eng))
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/health")) as resp:
        assert resp.status == 200  # still alive
        health = await resp.json()
    assert health["status"] == "degraded" and health["policy"] == "prefix"
    assert "KL" in health["self_check"]["reasons"][0]


def test_agreement_threshold_failure(yarn_model):  # noqa: F811
    eng = make(yarn_model, policy="pic", check_min_agreement=1.0, check_max_kl=100.0)
    # random weights: the moved chunk changes the greedy tokens, so agreement < 1
    assert not eng.check.ok
    assert [r for r in eng.check.reasons if "agreement" in r]


def test_broken_rotation_falls_back(yarn_model, monkeypatch):  # noqa: F811
    monkeypatch.setattr(guard, "delta_rotate",
                        lambda k, src, dst, spec: delta_rotate(k, src, dst + 1, spec))
    eng = make(yarn_model, policy="pic", check_max_kl=100.0)
    assert not eng.check.ok and eng.served_policy == "prefix"
    assert eng.check.rope_error > 1e-3
    assert "δ-rotation differs" in eng.check.reasons[0]


def test_opt_out_and_full_policy(yarn_model):  # noqa: F811
    off = make(yarn_model, policy="pic", self_check=False)
    assert off.check is None and off.served_policy == "pic" and off.stats()["self_check"] is None
    full = make(yarn_model, policy="full")
    assert full.check.ok and full.check.probe_kl is None  # nothing lossy configured to probe


@pytest.mark.parametrize("bad", [{"check_min_agreement": 1.5}, {"check_max_kl": -1},
                                 {"check_tokens": 0}, {"self_check": "yes"}])
def test_config_rejects_bad_thresholds(bad):
    with pytest.raises((ValueError, TypeError)):
        EngineConfig(model_dir="x", **bad)
