"""The clip policy (CacheClip, engine_adapter/embedded/clip.py): window selection on hand-built
scores, the auxiliary model's attention against transformers' eager attention, the exact budget,
clip r=1 against transformers' logits, requests through the engine and its HTTP API, and the
errors when there is no usable auxiliary model. Random weights: no quality claims here."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from support.models import aux_model, yarn_model  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

from irminsul.chunking.config import ChunkerConfig
from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.engine_adapter.embedded.clip import AuxModel, select_windows
from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine, SamplingParams
from irminsul.engine_adapter.embedded.planner import (
    RECOMPUTED,
    REUSED,
    PolicyArgs,
    make_plan,
)
from irminsul.engine_adapter.embedded.prefill import run_prefill
from irminsul.engine_adapter.embedded.server import create_engine_app

CHUNKER = ChunkerConfig(min_tokens=16, avg_tokens=32, max_tokens=96)
BODY_FILE = Path(__file__).resolve().parents[1] / "engine_adapter" / "embedded" / "planner.py"


def make_engine(model_dir, **kw) -> Engine:
    kw.setdefault("self_check", False)
    return Engine(EngineConfig(model_dir=str(model_dir), device="cpu", dtype="float32",
                               chunker=CHUNKER, **kw))


def groups(positions: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions, as (first, last)."""
    out: list[tuple[int, int]] = []
    for p in positions.tolist():
        if out and p == out[-1][1] + 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


# ---- selection on hand-built scores ---------------------------------------------------------

# Candidates: positions 10..59 and 70..89 (a computed gap 60..69 between two placed runs).
CAND = np.concatenate([np.arange(10, 60), np.arange(70, 90)])


def hand_scores() -> np.ndarray:
    s = np.zeros(100, dtype=np.float32)
    s[0:10] = 50.0  # the sink / shared prefix: huge, but not a candidate
    s[30:34] = 5.0  # a cluster: window sum 20
    s[75:79] = 3.0  # a weaker cluster: 12
    s[50] = 10.0  # an isolated spike: any window holding it sums 10
    s[[58, 59, 70, 71]] = 4.0  # 16 if a window could span the gap; 8 on either side
    return s


def test_selection_takes_the_highest_scoring_windows():
    picked = select_windows(hand_scores(), CAND, count=8, window=4)
    assert picked.tolist() == [30, 31, 32, 33, 75, 76, 77, 78]
    # A third window goes to the best of what is left: 58..59|70..71 may not be joined, so
    # the spike's window (10) beats 56..59 and 70..73 (8 each).
    third = select_windows(hand_scores(), CAND, count=12, window=4)
    assert set(third.tolist()) - set(picked.tolist()) == {47, 48, 49, 50}  # ties: earliest


def test_selection_budget_is_exact_and_the_last_window_shrinks():
    picked = select_windows(hand_scores(), CAND, count=6, window=4)
    # One full window, then the best 2-token window: the spike with its left neighbour
    # (49..50 and 50..51 tie at 10; the earlier wins).
    assert picked.tolist() == [30, 31, 32, 33, 49, 50]
    assert select_windows(hand_scores(), CAND, count=0, window=4).size == 0
    assert select_windows(hand_scores(), CAND, count=500, window=4).tolist() == CAND.tolist()
    with pytest.raises(ValueError, match="window"):
        select_windows(hand_scores(), CAND, count=3, window=0)


@pytest.mark.parametrize("r", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("window", [1, 8, 16])
def test_selection_respects_the_budget_in_few_windows(r, window):
    rng = np.random.default_rng(7)
    # Placed runs of uneven length with computed gaps, as a plan has them.
    runs = [(40, 300), (310, 900), (905, 930), (1000, 1800)]
    cand = np.concatenate([np.arange(a, b) for a, b in runs])
    scores = rng.gamma(0.3, size=1900).astype(np.float32)
    count = math.ceil(r * len(cand))
    picked = select_windows(scores, cand, count, window)
    assert len(picked) == count == len(set(picked.tolist()))
    assert np.isin(picked, cand).all() and (np.diff(picked) > 0).all()
    assert len(picked) / len(cand) <= r + 1 / len(cand)
    # Grouped: no more separate stretches than windows (neighbouring windows merge).
    assert len(groups(picked)) <= math.ceil(count / window)
    # Each window is one of the best: the picked tokens outscore a random choice of windows.
    assert scores[picked].mean() > scores[cand].mean()


# ---- the auxiliary model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def aux(aux_model):  # noqa: F811
    return AuxModel(aux_model, vocab_size=4096, queries=8, window=4)


def test_aux_scores_are_the_librarys_last_layer_attention(aux, aux_model):  # noqa: F811
    ids = np.random.default_rng(0).integers(0, 4096, 200)
    ref_model = AutoModelForCausalLM.from_pretrained(aux_model, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    with torch.inference_mode():
        att = ref_model(torch.from_numpy(ids)[None], output_attentions=True).attentions[-1]
    want = att[0, :, -8:, :].sum((0, 1)).numpy()  # heads x the last 8 queries
    got = aux.scores(ids)
    assert got.shape == (200,) and np.abs(got - want).max() < 1e-5
    assert abs(float(got.sum()) - 2 * 8) < 1e-3  # 2 heads x 8 softmax rows
    job = aux.start(ids, background=True)  # the worker thread computes the same
    assert np.array_equal(job.scores(), got) and job.seconds > 0
    short = aux.scores(ids[:3])  # fewer tokens than queries: every position is a query
    assert short.shape == (3,) and abs(float(short.sum()) - 2 * 3) < 1e-4


# ---- through the engine ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_aux(tmp_path_factory, yarn_model, aux_model):  # noqa: F811
    """The tiny model with the auxiliary one in its aux/ folder (found by default)."""
    root = tmp_path_factory.mktemp("with-aux")
    for f in Path(yarn_model).iterdir():
        (root / f.name).symlink_to(f)
    (root / "aux").symlink_to(aux_model, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def engine(with_aux):
    return make_engine(with_aux, policy="clip", clip_r=0.25, clip_window=4)


@pytest.fixture(scope="module")
def prompts(engine):
    """A prompt, then its body after a longer header and with a question after it."""
    tok = engine.tokenizer
    body = tok.encode(BODY_FILE.read_text()[:1500])
    head_a, head_b = tok.encode("Header, run one.\n"), tok.encode("A longer header, run 2.\n")
    tail = tok.encode("\nQuestion: which tokens are recomputed?\n")
    a = np.concatenate([head_a, body]).astype(np.int32)
    b = np.concatenate([head_b, body, tail]).astype(np.int32)
    return a, (0, len(head_a)), b, (0, len(head_b), len(head_b) + len(body))


@pytest.fixture(scope="module")
def hf(yarn_model):  # noqa: F811
    return DeepseekV2ForCausalLM.from_pretrained(yarn_model, dtype=torch.float32).eval()


def test_clip_recomputing_everything_equals_transformers(engine, prompts, hf):
    a, anchors_a, b, anchors_b = prompts
    engine.flush_cache()
    engine.prefill(a, anchors=anchors_a)
    res = engine.prefill(b, anchors=anchors_b, policy_args={"r": 1.0})
    assert res.counts.policy == "clip" and res.counts.chunks_hit > 0
    assert res.counts.reused_tokens == 0 and res.counts.recomputed_tokens > 0
    with torch.inference_mode():
        ref = hf(torch.from_numpy(b.astype(np.int64))[None]).logits[0, -1].float()
    diff = (res.logits - ref).abs().max().item()
    assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), diff


def test_clip_plan_recomputes_exactly_its_budget_in_windows(engine, prompts):
    a, anchors_a, b, anchors_b = prompts
    engine.flush_cache()
    engine.prefill(a, anchors=anchors_a)
    chunks = engine.chunker.split(b, anchors=anchors_b, model_fingerprint=engine.model_fingerprint)
    for r in (0.1, 0.25):
        plan = make_plan(engine.store, b, chunks, policy="clip", args=PolicyArgs(r=r))
        try:
            job = engine.clip.start(b, background=True)
            out = run_prefill(engine.runner, plan, len(b), job)
        finally:
            engine.store.release(plan.entries)
        cand = plan.blend_candidates
        assert len(cand) > 100 and (plan.source[cand] == REUSED).all()
        picked = np.flatnonzero((out.source == RECOMPUTED) & (plan.source == REUSED))
        assert len(picked) == plan.blend_count == math.ceil(r * len(cand))
        assert plan.counts.recomputed_tokens - int((plan.source == RECOMPUTED).sum()) == len(
            picked)
        assert len(groups(picked)) <= math.ceil(len(picked) / 4)  # windows of clip_window
        # The picks are the selection on the auxiliary model's own scores.
        want = select_windows(engine.clip.scores(b), cand, plan.blend_count, 4)
        assert picked.tolist() == want.tolist()


def test_clip_requests_through_the_engine_api(engine, prompts):
    a, anchors_a, b, anchors_b = prompts
    engine.flush_cache()
    engine.prefill(a, anchors=anchors_a)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    outs = list(engine.generate(b, params, anchors=anchors_b))  # the engine's default: clip
    c = outs[0].counts
    assert c.policy == "clip" and c.reused_tokens > 0 and len(outs) == 5
    reusable = c.reused_tokens + c.recomputed_tokens
    # clip_r = 0.25 of the placed tokens, plus the last prompt token if it was placed.
    assert math.ceil(0.25 * (reusable - 1)) <= c.recomputed_tokens <= math.ceil(0.25 * reusable) + 1
    other = engine.prefill(b, anchors=anchors_b, policy="clip", policy_args={"r": 0.05}).counts
    assert other.recomputed_tokens < c.recomputed_tokens and other.policy == "clip"
    assert engine.prefill(b, anchors=anchors_b, policy="pic").counts.policy == "pic"


def test_clip_self_check_probes_clip(with_aux):
    eng = make_engine(with_aux, policy="clip", self_check=True)
    assert eng.check.ok and eng.check.requested_policy == "clip"
    assert eng.check.probe_reused > 0 and eng.check.probe_kl is not None


async def test_clip_over_http(aiohttp_server, engine):
    server = await aiohttp_server(create_engine_app(engine))
    doc = BODY_FILE.read_text()[:800]
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
        await http.post("/flush_cache")
        sp = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}
        async with http.post("/generate", json={"text": "# one\n" + doc,
                                                "sampling_params": sp}) as resp:
            assert resp.status == 200
        body = {"text": "# a second, longer header\n" + doc, "sampling_params": sp,
                "irminsul_policy": "clip", "irminsul_policy_args": {"r": 0.5}}
        async with http.post("/generate", json=body) as resp:
            assert resp.status == 200
            meta = (await resp.json())["meta_info"]
    counts = ReuseCounts.from_json(meta["irminsul"])
    assert counts.policy == "clip" and counts.reused_tokens > 0
    assert counts.recomputed_tokens >= counts.reused_tokens - 1  # r = 0.5


# ---- without a usable auxiliary model ----------------------------------------------------


def test_clip_without_an_aux_model_fails_at_start(yarn_model, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="policy clip needs an auxiliary model.*aux"):
        make_engine(yarn_model, policy="clip")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_engine(yarn_model, policy="pic", clip_model_dir=str(tmp_path / "nothing"))
    plain = make_engine(yarn_model, policy="pic")
    assert plain.clip is None
    with pytest.raises(ValueError, match="clip needs an auxiliary model"):
        plain.prefill([1, 2, 3], policy="clip")
    with pytest.raises(ValueError, match="clip_r"):
        EngineConfig(model_dir=str(yarn_model), clip_r=1.5)
    with pytest.raises(ValueError, match="clip_device"):
        EngineConfig(model_dir=str(yarn_model), clip_device="tpu")


def test_aux_model_must_share_the_tokenizer(yarn_model, aux_model, tmp_path):  # noqa: F811
    other = tmp_path / "other-tok"
    shutil.copytree(aux_model, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["an-extra-token"] = max(vocab.values()) + 1
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer other than the main model's"):
        make_engine(yarn_model, clip_model_dir=str(other))
    small = tmp_path / "small-vocab"
    shutil.copytree(aux_model, small)
    (small / "tokenizer.json").unlink()
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    with pytest.raises(ValueError, match="vocab_size 100"):
        make_engine(yarn_model, clip_model_dir=str(small))
