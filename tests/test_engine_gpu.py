"""The engine on CUDA in bfloat16, DeepSeek-V2-Lite's shapes (fewer layers): runs only with a
GPU (``-m gpu``); CI on CPU skips it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.models import SHIPPED
from transformers import DeepseekV2ForCausalLM

from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.engine_adapter.embedded.presets import build_checkpoint
from irminsul.kernels.rope import Segment, materialize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """v2-lite shapes with 2 layers (one dense, one MoE of 64 experts), bfloat16."""
    out = tmp_path_factory.mktemp("v2-lite-2l")
    return build_checkpoint("v2-lite", out, seed=0, tokenizer_dir=SHIPPED, dtype="bfloat16",
                            device="cuda", num_hidden_layers=2)


@pytest.fixture(scope="module")
def engine(lite):
    return Engine(EngineConfig(model_dir=str(lite), device="cuda", dtype="auto"))


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 4000, n).astype(np.int32)


def test_full_matches_transformers_on_cuda(lite, engine):
    assert engine.runner.dtype == torch.bfloat16
    ids = _ids(1000, 0)
    got = engine.prefill(ids, policy="full").logits
    hf = DeepseekV2ForCausalLM.from_pretrained(lite, dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        ref = hf(torch.as_tensor(ids, dtype=torch.long, device="cuda")[None]).logits[0, -1]
    ref = ref.float().cpu()
    diff = (got - ref).abs().max().item()
    print(f"\ncuda bf16 full vs transformers: max|d| {diff:.4f}, scale {ref.abs().max():.3f}")
    assert diff <= 0.05 * ref.abs().max().item()  # bf16 rounding of two orders of work
    assert int(got.argmax()) == int(ref.argmax())


def test_layer0_placement_within_one_bf16_ulp_on_cuda(engine):
    r = engine.runner
    ids = torch.as_tensor(_ids(64, 1), dtype=torch.long)
    src, dst = torch.arange(100, 164), torch.arange(130_000, 130_064)
    fresh = {}
    for name, pos in (("src", src), ("dst", dst)):
        kv = r.new_kv(int(pos[-1]) + 1)
        r.run_layers(kv, r.embed(ids), pos, 0, 1)
        fresh[name] = (kv.c_kv[:, pos.cuda()].clone(), kv.k_pe[:, pos.cuda()].clone())
    buf_c = torch.zeros(r.num_layers, 64, r.rank, dtype=r.dtype, device="cuda")
    buf_k = torch.zeros(r.num_layers, 64, r.rope_dim, dtype=r.dtype, device="cuda")
    c0, k0 = fresh["src"]
    materialize(buf_c[:1], buf_k[:1], [Segment(c0[:1], k0[:1], 100, 130_000, 0)], r.spec)
    c1, k1 = fresh["dst"]
    assert torch.equal(buf_c[0], c1[0])
    pair = k1[0].float().reshape(64, -1, 2).norm(dim=-1).repeat_interleave(2, -1)
    ulp = torch.ldexp(torch.ones_like(pair), torch.frexp(pair).exponent - 8)
    assert ((buf_k[0].float() - k1[0].float()).abs() <= ulp).all()


def test_reuse_policies_run_on_cuda(engine):
    body = _ids(3000, 2)
    a = np.concatenate([_ids(20, 3), body]).astype(np.int32)
    b = np.concatenate([_ids(25, 4), body]).astype(np.int32)
    for policy in ("prefix", "pic", "blend"):
        engine.flush_cache()
        engine.prefill(a, anchors=(0, 20), policy="full")
        outs = list(engine.generate(b, SamplingParams(max_new_tokens=4, ignore_eos=True),
                                    anchors=(0, 25), policy=policy))
        c = outs[0].counts
        assert c.prompt_tokens == len(b) and len(outs) == 4
        if policy != "prefix":
            assert c.reused_tokens > 0
        print(f"{policy}: {c.to_json()} prefill {outs[0].prefill_seconds * 1e3:.1f} ms")


def test_cuda_graphs_match_eager_blocks_on_cuda(engine):
    """pic's recompute block and the decode steps replayed as CUDA graphs give the eager
    blocks' logits (bf16 rounding of padded GEMM shapes at most) and record without a
    failure; the arena's stale slots from an earlier, longer request change nothing."""
    r = engine.runner
    assert r.graphs is not None and r.graphs.capture
    body = _ids(2500, 5)
    warm = np.concatenate([_ids(20, 6), body]).astype(np.int32)
    edit = np.concatenate([_ids(30, 7), body]).astype(np.int32)
    runs = {}
    for graphs in (False, True, True):  # eager; recording; replaying
        r.use_graphs = graphs
        engine.flush_cache()
        engine.prefill(_ids(3000, 8), policy="full")  # leaves its KV in the arena
        engine.prefill(warm, anchors=(0, 20), policy="full")
        out = engine.prefill(edit, anchors=(0, 30), policy="pic")
        toks = [o.token_id for o in engine.generate(
            edit, SamplingParams(max_new_tokens=8, ignore_eos=True), anchors=(0, 30),
            policy="pic")]
        runs.setdefault(graphs, []).append((out.logits, toks))
    r.use_graphs = True
    stats = r.graphs.stats()
    assert stats["failed"] is None and stats["replays"] >= 16, stats
    # a replay is the recorded run: bit for bit
    assert torch.equal(runs[True][0][0], runs[True][1][0])
    assert runs[True][0][1] == runs[True][1][1]
    # against the eager blocks: bf16 rounding of other GEMM shapes (the argmax of random
    # weights' near-uniform logits may flip under it, so only the size is checked)
    ref, got = runs[False][0][0], runs[True][1][0]
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
