"""The embedded engine against transformers' DeepseekV2ForCausalLM (CPU, float32).

Exact paths (full, prefix, pic with every token recomputed, blend r=1) must give the library's
logits; approximate reuse (pic k=16 on a shifted prompt) must run, account for every token,
and its first-token deviation from full is printed (run with -s to see it).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from support.models import plain_model, yarn_model  # noqa: F401  (fixtures)
from transformers import DeepseekV2ForCausalLM

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import Annotation, seq_hash
from irminsul.engine_adapter.embedded import engine as engine_module
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.engine_adapter.embedded.store import KVEntry

CHUNKER = ChunkerConfig(min_tokens=16, avg_tokens=32, max_tokens=96)
BODY_FILE = Path(__file__).resolve().parents[1] / "engine_adapter" / "contract.py"


def make_engine(model_dir, **kw) -> Engine:
    kw.setdefault("policy", "pic")
    return Engine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32",
                               chunker=CHUNKER, **kw))


@pytest.fixture(scope="module")
def hf_models(yarn_model, plain_model):  # noqa: F811
    return {d: DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for d in (yarn_model, plain_model)}


def hf_last_logits(hf_models, model_dir, ids) -> torch.Tensor:
    with torch.inference_mode():
        out = hf_models[model_dir](torch.as_tensor(np.asarray(ids, np.int64))[None])
    return out.logits[0, -1].float()


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 agreement: max abs difference <= 1e-5 of the logits' scale."""
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), diff


@pytest.fixture(scope="module")
def prompts(yarn_model):  # noqa: F811
    """Two prompts sharing a ~400-token body after different headers, and an extension."""
    eng = make_engine(yarn_model)
    body = eng.tokenizer.encode(BODY_FILE.read_text()[:1600])
    head_a = eng.tokenizer.encode("Current time: 2025-01-01 12:00:00\n")
    head_b = eng.tokenizer.encode("Current time: 2025-01-02 08:30:59, user alice\n")
    tail = eng.tokenizer.encode("\nQuestion: what does the engine verify first?\n")
    a = np.concatenate([head_a, body]).astype(np.int32)
    b = np.concatenate([head_b, body]).astype(np.int32)
    return {"a": a, "b": b, "a_ext": np.concatenate([a, tail]).astype(np.int32),
            "anchors_a": (0, len(head_a)), "anchors_b": (0, len(head_b))}


@pytest.mark.parametrize("fixture", ["yarn_model", "plain_model"])
def test_full_equals_transformers(request, hf_models, prompts, fixture):
    model_dir = request.getfixturevalue(fixture)
    eng = make_engine(model_dir, policy="full")
    res = eng.prefill(prompts["a"])
    assert_close(res.logits, hf_last_logits(hf_models, model_dir, prompts["a"]))
    assert res.counts.new_tokens == len(prompts["a"]) and res.counts.policy == "full"


def test_prefix_on_an_extended_prompt_equals_full(yarn_model, hf_models, prompts):  # noqa: F811
    eng = make_engine(yarn_model, policy="prefix")
    eng.prefill(prompts["a"])
    res = eng.prefill(prompts["a_ext"])
    # Every token of the cached prompt is an exact prefix hit (the trie matches partial edges).
    assert res.counts.exact_prefix_tokens == len(prompts["a"])
    assert res.counts.new_tokens == len(prompts["a_ext"]) - len(prompts["a"])
    assert_close(res.logits, hf_last_logits(hf_models, yarn_model, prompts["a_ext"]))


def test_greedy_decode_matches_transformers(yarn_model, hf_models, prompts, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine_module, "_FIRST_OUTPUT_SLOTS", 2)  # the buffer must grow
    eng = make_engine(yarn_model, policy="full")
    ids = prompts["a"][:120]
    got = [o.token_id for o in eng.generate(ids, SamplingParams(max_new_tokens=8,
                                                                ignore_eos=True))]
    seq, want = list(ids), []
    for _ in range(8):  # the library's greedy loop, one full forward per token
        want.append(int(hf_last_logits(hf_models, yarn_model, seq).argmax()))
        seq.append(want[-1])
    assert got == want


def test_generated_tokens_become_exact_prefix(yarn_model, hf_models, prompts):  # noqa: F811
    eng = make_engine(yarn_model, policy="prefix")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    reply = [o.token_id for o in eng.generate(prompts["a"], params)]
    follow = np.concatenate([prompts["a"], reply, eng.tokenizer.encode("\nAnd then?\n")])
    res = eng.prefill(follow.astype(np.int32))
    # The prompt and the 5 output tokens fed back through the model (not the last one).
    assert res.counts.exact_prefix_tokens == len(prompts["a"]) + 5
    assert_close(res.logits, hf_last_logits(hf_models, yarn_model, follow))


@pytest.mark.parametrize("fixture", ["yarn_model", "plain_model"])
def test_pic_recomputing_every_token_equals_full(request, hf_models, prompts, fixture):
    model_dir = request.getfixturevalue(fixture)
    eng = make_engine(model_dir)
    eng.prefill(prompts["a"], anchors=prompts["anchors_a"])
    res = eng.prefill(prompts["b"], anchors=prompts["anchors_b"], policy_args={"k": 10_000})
    assert res.counts.chunks_hit > 0 and res.counts.reused_tokens == 0
    assert res.counts.recomputed_tokens > 0
    assert_close(res.logits, hf_last_logits(hf_models, model_dir, prompts["b"]))


def test_blend_recomputing_all_equals_full(yarn_model, hf_models, prompts):  # noqa: F811
    eng = make_engine(yarn_model, policy="blend")
    eng.prefill(prompts["a"], anchors=prompts["anchors_a"])
    res = eng.prefill(prompts["b"], anchors=prompts["anchors_b"], policy_args={"r": 1.0})
    assert res.counts.chunks_hit > 0 and res.counts.reused_tokens == 0
    assert_close(res.logits, hf_last_logits(hf_models, yarn_model, prompts["b"]))


@pytest.mark.parametrize("policy", ["pic", "blend"])
def test_shifted_prompt_reuses_and_decodes(yarn_model, hf_models, prompts, policy):  # noqa: F811
    eng = make_engine(yarn_model, policy=policy)
    eng.prefill(prompts["a"], anchors=prompts["anchors_a"])
    outs = list(eng.generate(prompts["b"], SamplingParams(max_new_tokens=6, ignore_eos=True),
                             anchors=prompts["anchors_b"]))
    c = outs[0].counts
    n = len(prompts["b"])
    assert c.prompt_tokens == n  # ReuseCounts itself checks that the four parts add up
    head = prompts["anchors_b"][1]
    # The headers share their first tokens (an exact partial-edge prefix hit); the rest of
    # the header is new, and the whole body sits in content-hit chunks.
    assert c.exact_prefix_tokens + c.new_tokens == head and c.exact_prefix_tokens > 0
    assert c.reused_tokens > 0 and c.chunks_hit == c.chunks_total - 1
    assert [o.finish_reason for o in outs] == [None] * 5 + ["length"]
    assert all(0 <= o.token_id < eng.runner.vocab_size for o in outs)
    approx = eng.prefill(prompts["b"], anchors=prompts["anchors_b"]).logits
    ref = hf_last_logits(hf_models, yarn_model, prompts["b"])
    diff = (approx - ref).abs().max().item()
    top = torch.topk(ref, 5).indices.tolist()
    print(f"\n{policy}: reused {c.reused_tokens}/{n}, recomputed {c.recomputed_tokens}, "
          f"new {c.new_tokens}; first-token logits max |approx - full| = {diff:.4f} "
          f"(logit scale {ref.abs().max().item():.2f}); argmax same: "
          f"{int(approx.argmax()) == top[0]}; approx argmax in full top-5: "
          f"{int(approx.argmax()) in top}")
    assert np.isfinite(diff)


def test_store_budget_and_pins(yarn_model, prompts):  # noqa: F811
    probe = make_engine(yarn_model)
    probe.prefill(prompts["a"], anchors=prompts["anchors_a"])
    budget = probe.store.stats().bytes  # exactly a's chunks
    eng = make_engine(yarn_model, cache_bytes=budget)
    eng.prefill(prompts["a"], anchors=prompts["anchors_a"])
    assert eng.store.stats().bytes == budget
    # b reuses a's body chunks, pinned while b runs, and a's header chunk is the root of a's
    # trie path: nothing can be evicted for b's new header chunk, so it is refused.
    c = eng.prefill(prompts["b"], anchors=prompts["anchors_b"]).counts
    assert c.reused_tokens > 0
    st = eng.store.stats()
    assert st.bytes <= budget and st.rejected > 0 and st.evictions == 0 and st.pinned == 0
    assert eng.prefill(prompts["a"], policy="prefix").counts.exact_prefix_tokens > 0
    eng.prefill(prompts["a_ext"][::-1].copy(), policy="full")  # unrelated prompt: evicts
    st = eng.store.stats()
    assert st.evictions > 0 and st.bytes <= budget


def test_colliding_keys_fall_back_to_compute(yarn_model, hf_models, prompts):  # noqa: F811
    eng = make_engine(yarn_model)
    ids = prompts["b"]
    chunks = eng.chunker.split(ids, anchors=prompts["anchors_b"],
                               model_fingerprint=eng.model_fingerprint)
    # Every chunk key of b now maps to KV of other tokens (a forged or corrupted store).
    for ref in chunks:
        n = ref.end - ref.start
        other = (ids[ref.start : ref.end] + 1) % eng.runner.vocab_size
        z = torch.randn(eng.runner.num_layers, n, eng.runner.rank)
        eng.store.put(ref.key, KVEntry(other, 0, z, z[..., : eng.runner.rope_dim].clone()))
    res = eng.prefill(ids, anchors=prompts["anchors_b"])
    assert res.counts.reused_tokens == 0 and res.counts.chunks_hit == 0
    assert eng.store.stats().collisions >= len(chunks)
    assert_close(res.logits, hf_last_logits(hf_models, yarn_model, ids))


def test_zero_token_generation_prewarms(yarn_model, prompts):  # noqa: F811
    eng = make_engine(yarn_model, policy="prefix")
    (out,) = list(eng.generate(prompts["a"], SamplingParams(max_new_tokens=0)))
    assert out.token_id is None and out.finish_reason == "length"
    assert out.counts.new_tokens == len(prompts["a"]) and out.prefill_seconds > 0
    again = eng.prefill(prompts["a"]).counts
    assert (again.exact_prefix_tokens, again.recomputed_tokens) == (len(prompts["a"]) - 1, 1)


def test_stop_tokens_and_sampling(yarn_model, prompts):  # noqa: F811
    eng = make_engine(yarn_model, policy="full")
    greedy = [o.token_id for o in eng.generate(prompts["a"], SamplingParams(max_new_tokens=4))]
    outs = list(eng.generate(prompts["a"], SamplingParams(max_new_tokens=4,
                                                          stop_token_ids=(greedy[0],))))
    assert [(o.token_id, o.finish_reason) for o in outs] == [(greedy[0], "stop")]
    sp = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    s1 = [o.token_id for o in eng.generate(prompts["a"], sp)]
    s2 = [o.token_id for o in eng.generate(prompts["a"], sp)]
    assert s1 == s2 and len(s1) == 5  # seeded sampling is reproducible


def test_annotation_used_only_when_it_matches(yarn_model, prompts):  # noqa: F811
    eng = make_engine(yarn_model)
    ids = prompts["a"]
    chunks = eng.chunker.split(ids, anchors=prompts["anchors_a"], namespace="t1",
                               model_fingerprint=eng.model_fingerprint)
    ann = Annotation(len(ids), seq_hash(ids), chunks, prompts["anchors_a"], namespace="t1",
                     model_fingerprint=eng.model_fingerprint)
    c = eng.prefill(ids, annotation=ann, namespace="t1").counts
    assert c.chunks_total == len(chunks)
    stale = eng.prefill(prompts["b"], annotation=ann, namespace="t1").counts  # made for a
    st = eng.stats()["engine"]
    assert (st["annotations_used"], st["annotations_ignored"]) == (1, 1)
    assert stale.prompt_tokens == len(prompts["b"])


def test_concurrent_generations_serialise(yarn_model, prompts):  # noqa: F811
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    solo = make_engine(yarn_model, policy="full")
    expected = {k: [o.token_id for o in solo.generate(prompts[k], params)] for k in ("a", "b")}
    eng = make_engine(yarn_model, policy="full")
    events: list[tuple[str, int]] = []
    got: dict[str, list[int]] = {}
    start = threading.Barrier(2)

    def worker(name):
        start.wait()
        got[name] = []
        for o in eng.generate(prompts[name], params):
            events.append((name, o.token_id))
            got[name].append(o.token_id)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected
    order = [name for name, _ in events]
    assert order in (["a"] * 5 + ["b"] * 5, ["b"] * 5 + ["a"] * 5)  # never interleaved


def test_bad_requests_are_refused(yarn_model):  # noqa: F811
    eng = make_engine(yarn_model, max_seq_len=64)
    for ids, match in [([], "non-empty"), ([5, 4096], "outside the vocabulary"),
                       ([-1], "outside"), (list(range(65)), "max_seq_len")]:
        with pytest.raises(ValueError, match=match):
            eng.generate(ids, SamplingParams())
    with pytest.raises(ValueError, match="unknown policy"):
        eng.prefill([1, 2, 3], policy="magic")
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)
