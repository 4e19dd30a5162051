"""The GPU paths of a reuse prefill, checked on CPU against the torch / dense-mask paths:
placement by the fused Triton kernel (one launch per request; runs here under
TRITON_INTERPRET=1 when Triton is installed) and FlexAttention with a position block mask."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.models import yarn_model  # noqa: F401

from irminsul.engine_adapter.embedded.attention import position_block_mask
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.planner import PolicyArgs, make_plan
from irminsul.engine_adapter.embedded.prefill import place
from irminsul.kernels.materialize import triton_available

POISON = 1234.0
interpreted = pytest.mark.skipif(
    not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton installed and TRITON_INTERPRET=1 (the kernel on the CPU interpreter)")


@pytest.fixture(scope="module")
def engine(yarn_model):  # noqa: F811
    return Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", self_check=False,
                               prefill_block=96))


def _prompts(seed: int = 0):
    """A prompt and its edit: a changed header before the same sections, reordered."""
    g = np.random.default_rng(seed)
    sections = [g.integers(10, 4000, n).astype(np.int32) for n in (70, 130, 90, 110)]
    head_a, head_b = g.integers(10, 4000, 20), g.integers(10, 4000, 23)
    a = np.concatenate([head_a, *sections]).astype(np.int32)
    b = np.concatenate([head_b, sections[2], sections[0], sections[3], sections[1]])
    bounds = np.cumsum([len(head_b), 90, 70, 110])
    a_bounds = np.cumsum([len(head_a), 70, 130, 90])
    return (a, tuple(int(x) for x in a_bounds)), (b.astype(np.int32), tuple(int(x) for x in bounds))


def _plan(engine, policy, shared_prefix: bool):
    (a, aa), (b, ba) = _prompts()
    if shared_prefix:  # b keeps a's first 40 tokens: an exact prefix to copy too
        b = np.concatenate([a[:40], b[40:]]).astype(np.int32)
    engine.flush_cache()
    engine.prefill(a, anchors=aa, policy="full")
    chunks = engine._chunks(b, None, ba, "")
    return make_plan(engine.store, b, chunks, policy=policy, args=PolicyArgs(4, 0.1))


@interpreted
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_kernel_placement_matches_torch_path(engine, shared_prefix):
    plan = _plan(engine, "pic", shared_prefix)
    try:
        assert plan.placements, "the edit must reuse chunks"
        if shared_prefix:
            assert plan.prefix_len > 0
        bufs = {}
        for placement in ("torch", "triton"):
            kv = engine.runner.new_kv(len(plan.ids) + 5)
            kv.c_kv.fill_(POISON)
            kv.k_pe.fill_(POISON)
            engine.runner.placement = placement
            place(engine.runner, plan, kv)
            bufs[placement] = kv
    finally:
        engine.runner.placement = "torch"
        engine.store.release(plan.entries)
    ref, got = bufs["torch"], bufs["triton"]
    # the prefix and every placement (pic's recomputed tokens are placed, then overwritten)
    placed = np.concatenate([np.arange(plan.prefix_len)]
                            + [np.arange(p.start, p.start + p.length) for p in plan.placements])
    assert len(placed) > len(plan.ids) // 2
    assert torch.equal(got.c_kv, ref.c_kv)  # c_KV copied bit for bit, nothing else written
    assert (got.k_pe[:, ~torch.isin(torch.arange(got.capacity), torch.from_numpy(placed))]
            == POISON).all()
    prefix = slice(0, plan.prefix_len)
    assert torch.equal(got.k_pe[:, prefix], ref.k_pe[:, prefix])  # delta 0: an exact copy
    w = ref.k_pe[:, placed].float()
    pair = w.reshape(*w.shape[:-1], -1, 2).norm(dim=-1).repeat_interleave(2, -1)
    err = (got.k_pe[:, placed].float() - w).abs()
    assert (err <= 1e-6 * pair + 1e-30).all(), err.max()


@interpreted
def test_engine_logits_same_with_kernel_placement(engine):
    (a, aa), (b, ba) = _prompts(1)
    out = {}
    try:
        for placement in ("torch", "triton"):
            engine.runner.placement = placement
            engine.flush_cache()
            engine.prefill(a, anchors=aa, policy="full")
            out[placement] = engine.prefill(b, anchors=ba, policy="pic", policy_args={"k": 4})
    finally:
        engine.runner.placement = "torch"
    assert out["triton"].counts.reused_tokens > 0
    assert out["triton"].counts == out["torch"].counts
    torch.testing.assert_close(out["triton"].logits, out["torch"].logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q,span", [(1, 50), (300, 700), (128, 128), (200, 4000)])
def test_position_block_mask_equals_dense_mask(q, span):
    """FlexAttention under the block mask against SDPA under the dense additive mask."""
    g = torch.Generator().manual_seed(q + span)
    positions = torch.sort(torch.randperm(span, generator=g)[:q]).values
    visible = int(positions[-1]) + 1
    heads = 3
    query = torch.randn(1, heads, q, 40, generator=g)
    key = torch.randn(1, heads, visible, 40, generator=g)
    value = torch.randn(1, heads, visible, 24, generator=g)
    hidden = torch.arange(visible)[None, :] > positions[:, None]
    dense = torch.zeros(q, visible).masked_fill_(hidden, float("-inf"))
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=0.3)
    from torch.nn.attention.flex_attention import flex_attention

    got = flex_attention(query, key, value, block_mask=position_block_mask(positions, visible),
                         scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "pic", "blend"])
def test_flex_prefill_matches_dense(engine, policy):
    (a, aa), (b, ba) = _prompts(2)
    out = {}
    before = engine.runner.prefill_attention
    try:
        for attn in ("dense", "flex"):
            engine.runner.prefill_attention = attn
            engine.flush_cache()
            engine.prefill(a, anchors=aa, policy="full")
            out[attn] = engine.prefill(b, anchors=ba, policy=policy, policy_args={"k": 4})
    finally:
        engine.runner.prefill_attention = before
    assert out["flex"].counts == out["dense"].counts
    if policy != "full":
        assert out["flex"].counts.reused_tokens > 0
    torch.testing.assert_close(out["flex"].logits, out["dense"].logits, atol=1e-4, rtol=1e-4)
