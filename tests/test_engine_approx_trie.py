"""The prefix trie's approximate tail (EngineConfig.approx_trie, store.py): a 3-turn session
where turn 2 reuses moved content and turn 3 repeats turn 2 and goes on. With the tail, turn 3
places turn 2's composed KV as it is (reused, not exact; no carve-outs) and computes only its
new tokens; its logits are what turn 2's composed KV gives. Without it (the engine before),
turn 3 pays turn 2's carve-outs again. prefix and full never see the tail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.models import plain_model, yarn_model  # noqa: F401  (fixtures)
from transformers import DeepseekV2ForCausalLM

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine

CHUNKER = ChunkerConfig(min_tokens=16, avg_tokens=32, max_tokens=96)
TEXT = (Path(__file__).resolve().parents[1] / "engine_adapter" / "contract.py").read_text()


def make_engine(model_dir, **kw) -> Engine:
    kw.setdefault("policy", "pic")
    return Engine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32",
                               chunker=CHUNKER, **kw))


@pytest.fixture(scope="module")
def session(yarn_model):  # noqa: F811
    """Three turns: turn 2 swaps turn 1's two documents, turn 3 is turn 2 plus new text.
    Anchors at every part's start, as a chat template's message boundaries would give."""
    tok = make_engine(yarn_model, self_check=False).tokenizer
    head = tok.encode("System: you are a careful reader of protocol files.\n")
    d1, d2 = tok.encode(TEXT[:900]), tok.encode(TEXT[900:1800])
    q1 = tok.encode("\nUser: what is the wire version?\n")
    q2 = tok.encode("\nUser: and which key carries the annotation?\n")
    more = tok.encode("\nAssistant: the irminsul key.\nUser: zebra quartz marmalade?\n")

    def turn(*parts):
        ids = np.concatenate(parts).astype(np.int32)
        anchors = tuple(np.cumsum([0, *map(len, parts[:-1])]).tolist())
        return ids, anchors

    t1, t2 = turn(head, d1, d2, q1), turn(head, d2, d1, q2)
    t3 = turn(head, d2, d1, q2, more)
    assert np.array_equal(t3[0][: len(t2[0])], t2[0])
    return t1, t2, t3


def run_turns(eng: Engine, session, capture: bool = False):
    """Turns 1 and 2 through ``eng``; with ``capture`` turn 2 keeps its KV buffer, sized for
    turn 3 (the engine's own prefill, with the store updated as prefill() does)."""
    (ids1, a1), (ids2, a2), (ids3, _) = session
    eng.prefill(ids1, anchors=a1)
    if not capture:
        return eng.prefill(ids2, anchors=a2), None
    outcome, plan, _, _ = eng._prefill(ids2, None, a2, "", "pic", eng.defaults,
                                       capacity=len(ids3))
    return plan, outcome.kv


def test_turn_three_places_turn_two_as_composed(yarn_model, session):  # noqa: F811
    _, (ids2, _), (ids3, a3) = session
    n2, n3 = len(ids2), len(ids3)
    on, off = make_engine(yarn_model), make_engine(yarn_model, approx_trie=False)
    c2 = run_turns(on, session)[0].counts
    plan2, kv2 = run_turns(off, session, capture=True)
    # turn 2 itself is the same either way, and reuses the moved documents by content
    assert c2 == plan2.counts and c2.reused_tokens > 0 and c2.recomputed_tokens > 0

    got = on.prefill(ids3, anchors=a3)
    before = off.prefill(ids3, anchors=a3)
    c3, b3 = got.counts, before.counts
    # exact means exact: the tail adds nothing to the exact prefix
    assert c3.exact_prefix_tokens == b3.exact_prefix_tokens < n2
    # turn 2 comes back whole, as reused KV; only the new tokens are computed
    assert c3.reused_tokens == n2 - c3.exact_prefix_tokens
    assert (c3.recomputed_tokens, c3.new_tokens) == (0, n3 - n2)
    # without the tail the same tokens are content hits, and the carve-outs come back
    assert b3.recomputed_tokens > 0 and b3.new_tokens == n3 - n2
    assert b3.reused_tokens + b3.recomputed_tokens == c3.reused_tokens
    assert on.store.stats().approx_tokens == c3.reused_tokens

    # the reference: turn 2's composed KV (the engine without the tail), new tokens on top
    runner = off.runner
    kv2.length = n3
    q = torch.arange(n2, n3)
    h = runner.run_layers(kv2, runner.embed(torch.from_numpy(ids3[n2:].astype(np.int64))), q,
                          0, runner.num_layers)
    ref = runner.logits(h[:, -1:])[0].cpu()
    assert torch.equal(got.logits, ref)
    assert not torch.equal(before.logits, ref)  # the re-carved tokens changed the KV


@pytest.mark.parametrize("policy", ["prefix", "full"])
def test_prefix_and_full_never_use_the_tail(yarn_model, session, policy):  # noqa: F811
    _, (ids2, _), (ids3, a3) = session
    eng = make_engine(yarn_model)
    run_turns(eng, session)
    assert eng.store.stats().approx_nodes > 0
    res = eng.prefill(ids3, anchors=a3, policy=policy)
    c = res.counts
    # the exact part of turn 2 (its header) at most; the rest computed
    assert c.reused_tokens == 0 and c.recomputed_tokens == 0
    assert c.exact_prefix_tokens < len(ids2)
    if policy == "full":
        assert c.new_tokens == len(ids3)
    # exact KV only: the library's own forward gives the same logits
    hf = DeepseekV2ForCausalLM.from_pretrained(yarn_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.as_tensor(ids3.astype(np.int64))[None]).logits[0, -1].float()
    assert (res.logits - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_blend_places_the_tail_without_choosing_over_it(yarn_model, session):  # noqa: F811
    _, (ids2, _), (ids3, a3) = session
    eng = make_engine(yarn_model, policy="blend")
    run_turns(eng, session)
    c = eng.prefill(ids3, anchors=a3).counts
    # every non-exact token of turn 2 comes from the tail; blend picks only among placed
    # content hits (none here), so nothing of turn 2 is recomputed
    assert c.reused_tokens == len(ids2) - c.exact_prefix_tokens
    assert c.recomputed_tokens == 0 and c.new_tokens == len(ids3) - len(ids2)


def test_forged_tail_entry_falls_back(yarn_model, session):  # noqa: F811
    _, _, (ids3, a3) = session
    eng, off = make_engine(yarn_model), make_engine(yarn_model, approx_trie=False)
    run_turns(eng, session)
    run_turns(off, session)
    # Corrupt the approximate edges that only the trie holds (turn 2's hit chunks, composed
    # at their new place): same keys, other token IDs (a forged or broken store).
    store = eng.store
    forged = [e for e in store._lru.values()
              if e.node is not None and e.node.approx and e.content_key is None]
    assert forged
    for e in forged:
        e.ids = ((e.ids + 1) % eng.runner.vocab_size).astype(np.int32)
    res = eng.prefill(ids3, anchors=a3)
    # nothing of the tail is used: the request plans as the engine without tails does
    assert res.counts == off.prefill(ids3, anchors=a3).counts
    assert store.stats().approx_tokens == 0 and store.stats().collisions > 0
