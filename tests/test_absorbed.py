"""The absorbed MLA attention (engine_adapter/embedded/absorbed.py) against the library's own
attention: one DeepSeek-V2 and one DeepSeek-V3 attention module on random inputs, then the
engine's prefills and decode steps with prefill_attention "absorbed" and "auto" against
"dense" (the library's path) on the tiny YaRN and plain-RoPE checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.edits import header_and_reorder
from support.models import plain_model, yarn_model  # noqa: F401
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

from irminsul.engine_adapter.embedded import absorbed
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
        "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 0.707, "mscale_all_dim": 0.707}
SMALL = {"hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 3,
         "kv_lora_rank": 48, "qk_rope_head_dim": 16, "qk_nope_head_dim": 24, "v_head_dim": 20,
         "max_position_embeddings": 163840, "rope_parameters": YARN}


class _Visible:
    """A cache whose update hands back the block's own latents: every query token is new and
    sees the block (a plain causal prefill, as the library runs it without a cache)."""

    def update(self, k_nope, k_pe, layer_idx, *args, **kwargs):
        return k_nope, k_pe


def _modules(kind: str, q_lora_rank):
    torch.manual_seed(0)
    if kind == "v2":
        cfg = DeepseekV2Config(**SMALL, q_lora_rank=q_lora_rank)
        attn, rotary = v2.DeepseekV2Attention(cfg, 0), v2.DeepseekV2RotaryEmbedding(cfg)
    else:
        cfg = DeepseekV3Config(**SMALL, q_lora_rank=q_lora_rank, rope_interleave=True)
        attn, rotary = v3.DeepseekV3Attention(cfg, 0), v3.DeepseekV3RotaryEmbedding(cfg)
    cfg._attn_implementation = "eager"
    for p in attn.parameters():  # wider than the initialiser's 0.02: attention far from uniform
        torch.nn.init.normal_(p, std=0.15)
    return attn.eval(), rotary


@pytest.mark.parametrize("kind", ["v2", "v3"])
@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_absorbed_attention_equals_the_librarys(kind, q_lora_rank):
    attn, rotary = _modules(kind, q_lora_rank)
    assert absorbed.supports(attn)
    n = 37
    hidden = torch.randn(1, n, SMALL["hidden_size"])
    pos = torch.arange(1000, 1000 + n)[None]  # far from 0: the rope angles matter
    pe = rotary(hidden, pos)
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        want, _ = attn(hidden_states=hidden, attention_mask=causal, position_embeddings=pe)
        got = absorbed.absorbed_attention(attn, hidden, causal, _Visible(), pe,
                                          absorbed.library_rope(attn))
    assert want.abs().max() > 0.1  # not a degenerate output
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    with torch.no_grad():  # and a mask that matters: without it the answer differs
        loose = absorbed.absorbed_attention(attn, hidden, None, _Visible(), pe,
                                            absorbed.library_rope(attn))
    assert (loose - want).abs().max() > 1e-3


def test_heads_in_groups_give_the_same_output(monkeypatch):
    attn, rotary = _modules("v2", None)
    n = 29
    hidden = torch.randn(1, n, SMALL["hidden_size"])
    pe = rotary(hidden, torch.arange(n)[None])
    causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    rope = absorbed.library_rope(attn)
    with torch.no_grad():
        whole = absorbed.absorbed_attention(attn, hidden, causal, _Visible(), pe, rope)
        monkeypatch.setattr(absorbed, "SCORE_BYTES", n * n * 4)  # one head at a time
        one = absorbed.absorbed_attention(attn, hidden, causal, _Visible(), pe, rope)
        monkeypatch.setattr(absorbed, "SCORE_BYTES", 2 * n * n * 4)  # 2 + 1 heads
        two = absorbed.absorbed_attention(attn, hidden, causal, _Visible(), pe, rope)
    torch.testing.assert_close(one, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two, whole, atol=1e-6, rtol=1e-6)


def _prompts(seed=0):
    return header_and_reorder(np.random.default_rng(seed))


@pytest.fixture(scope="module", params=["yarn", "plain"])
def engine(request, yarn_model, plain_model):  # noqa: F811
    model = yarn_model if request.param == "yarn" else plain_model
    return Engine(EngineConfig(model_dir=str(model), device="cpu", self_check=False,
                               prefill_block=96, absorbed_max_queries=64))


def _run(engine, attention, policy):
    engine.runner.prefill_attention = attention
    warm, edit = _prompts()
    engine.flush_cache()
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    out = engine.prefill(edit[0], anchors=edit[1], policy=policy, policy_args={"k": 4})
    engine.flush_cache()
    engine.prefill(warm[0], anchors=warm[1], policy="full")
    tokens = [o.token_id for o in engine.generate(edit[0], SamplingParams(max_new_tokens=12),
                                                  anchors=edit[1], policy=policy,
                                                  policy_args={"k": 4})]
    return out, tokens


@pytest.mark.parametrize("policy", ["full", "pic", "blend"])
def test_engine_absorbed_matches_dense(engine, policy):
    before = engine.runner.prefill_attention
    try:
        ref, ref_tokens = _run(engine, "dense", policy)
        for attention in ("absorbed", "auto"):
            out, tokens = _run(engine, attention, policy)
            assert out.counts == ref.counts
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
            assert tokens == ref_tokens
    finally:
        engine.runner.prefill_attention = before
    if policy != "full":
        assert ref.counts.reused_tokens > 0


def test_auto_picks_the_form_by_block_size(engine):
    r = engine.runner
    before = r.prefill_attention
    try:
        r.prefill_attention = "auto"
        assert r.absorbs(1) and r.absorbs(64) and not r.absorbs(65)
        r.prefill_attention = "absorbed"
        assert r.absorbs(10_000)
        for other in ("dense", "flex"):
            r.prefill_attention = other
            assert not r.absorbs(1)
    finally:
        r.prefill_attention = before


def test_absorbed_decode_expands_nothing(engine):
    """A pic prefill's small blocks and every decode step attend over the latents: the
    per-head K/V memo the library's path fills is never allocated."""
    r = engine.runner
    before = r.prefill_attention
    warm, edit = _prompts(1)
    seen = []
    inner = r.run_layers

    def spy(kv, *a, **kw):
        seen.append(kv)
        return inner(kv, *a, **kw)

    try:
        r.prefill_attention = "absorbed"
        engine.flush_cache()
        engine.prefill(warm[0], anchors=warm[1], policy="full")
        r.run_layers = spy
        list(engine.generate(edit[0], SamplingParams(max_new_tokens=6), anchors=edit[1],
                             policy="pic"))
        assert seen and all(kv.keys == [None] * r.num_layers for kv in seen)
        r.prefill_attention = "dense"
        seen.clear()
        list(engine.generate(edit[0], SamplingParams(max_new_tokens=2), anchors=edit[1],
                             policy="pic"))
        assert any(k is not None for kv in seen for k in kv.keys)  # the check can fail
    finally:
        r.run_layers = inner
        r.prefill_attention = before
