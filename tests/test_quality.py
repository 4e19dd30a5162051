"""The quality harness (`irminsul eval quality`) checks its own invariants on a tiny random
model: full against itself, pic recomputing every reused token, blend r=1 and clip r=1 must equal
full; the JSON report has every policy x workload cell. Random weights: no quality claims here."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from support.models import aux_model, yarn_model  # noqa: F401  (fixtures)

from irminsul.engine_adapter.embedded.config import EngineConfig
from irminsul.engine_adapter.embedded.engine import Engine
from irminsul.engine_adapter.embedded.probe import Prober, first_difference
from irminsul.engine_adapter.embedded.quality import (
    DEFAULT_POLICIES,
    NEAR_TIE,
    eval_command,
    evaluate,
    parse_policies,
)
from irminsul.engine_adapter.embedded.quality_render import render_table, write_plot
from irminsul.engine_adapter.embedded.quality_workloads import (
    WORKLOADS,
    WorkloadConfig,
    build_cases,
)
from irminsul.engine_adapter.embedded.store import ChunkStore

EXACT = ("full", "pic:k=100000", "blend:r=1.0", "prefix")
POLICIES = (*EXACT, "pic:k=0", "blend:r=10%")


@pytest.fixture(scope="module")
def engine(yarn_model):  # noqa: F811
    return Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", dtype="float32",
                               self_check=False))


@pytest.fixture(scope="module")
def report(engine):
    cases = build_cases(engine.tokenizer, WorkloadConfig(workloads=("needle",), cases=2,
                                                         docs=3, doc_tokens=40))
    specs, skipped = parse_policies(POLICIES)
    assert not skipped
    return evaluate(engine, cases, specs, new_tokens=8)


def cell(report, policy, workload="needle"):
    (c,) = [c for c in report.cells if c.policy == policy and c.workload == workload]
    return c


def test_full_against_itself_agrees_exactly(report):
    c = cell(report, "full")
    assert c.cases == 2 and c.agreement == 1.0 and c.kl_max == 0.0
    assert c.recompute_ratio is None and c.compute_ratio == 1.0


@pytest.mark.parametrize("policy", EXACT[1:])
def test_exact_policies_equal_full(report, policy):
    """pic with k >= every chunk, blend r=1 and the exact prefix compute what full computes:
    the same greedy tokens and a first-token KL within fp32 rounding."""
    c = cell(report, policy)
    assert c.agreement == 1.0
    assert c.kl_max < 1e-6
    rows = [r for r in report.results if r.policy == policy]
    assert all(r.reused == 0 for r in rows)
    if policy != "prefix":
        assert c.recompute_ratio == 1.0  # every reusable token was recomputed


def test_reuse_is_exercised_and_counted(report):
    """The invariants above mean something only if the cases do reuse: pic k=0 places the
    moved documents (recomputing only each run's last-token carve-out)."""
    c = cell(report, "pic:k=0")
    rows = [r for r in report.results if r.policy == "pic:k=0"]
    assert all(r.reused > 0 for r in rows)
    assert c.recompute_ratio < 0.1 and c.compute_ratio < 0.7
    assert all(r.reused + r.recomputed + r.new + r.exact_prefix == r.prompt_tokens
               for r in report.results)
    blend = cell(report, "blend:r=10%")
    assert 0.05 < blend.recompute_ratio < 0.2
    assert c.kl_mean > 0  # random weights: moved chunks do change the output


def test_needle_retrieval_is_relative_to_full(report):
    full = cell(report, "full")
    assert full.answer_hits == full.full_hits
    for c in report.cells:
        assert c.full_hits == full.full_hits
        assert c.retrieval == (c.answer_hits / c.full_hits if c.full_hits else None)


def test_differing_cases_carry_fulls_margin_there(report):
    """A case whose greedy tokens differ from full's records full's top-two gap at the first
    difference; the cells count those cases and the near ties among them. Random weights: the
    moved chunks of pic k=0 do change tokens, so the count is exercised."""
    for r in report.results:
        assert (r.full_margin is None) == (r.agreement == 1.0)
        assert r.full_margin is None or r.full_margin >= 0
    for c in report.cells:
        rows = [r for r in report.results if r.policy == c.policy and r.workload == c.workload]
        margins = [r.full_margin for r in rows if r.full_margin is not None]
        assert c.diverged == len(margins)
        assert c.near_ties == sum(m < NEAR_TIE for m in margins)
    assert cell(report, "full").diverged == 0
    assert cell(report, "pic:k=0").diverged > 0


def test_margins_are_the_greedy_tokens_lead(engine):
    """A run's margin at the first generated position is the top-two gap of the first-token
    distribution it also returns (computed here from those logits, independently)."""
    import torch

    ids = engine.tokenizer.encode("def add(a, b):\n    return a + b\n" * 8)
    run = Prober.of(engine).run(ChunkStore(0), ids, (), "full", engine.defaults, 4)
    assert len(run.margins) == 4 and all(m >= 0 for m in run.margins)
    lp = torch.log_softmax(run.logits.double(), -1)
    top = torch.topk(lp, 2).values
    assert run.margins[0] == pytest.approx(float(top[0] - top[1]), abs=1e-5)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([4], [5]) == 0
    assert first_difference([1, 2], [1]) is None  # no difference within the shorter


def test_parse_policies_skips_unknown_and_rejects_malformed():
    specs, skipped = parse_policies(["pic:k=4", "blend:r=10%", "magic:r=0.1", "pic:k=4", " ",
                                     "clip:r=5%"])
    assert [(s.label, s.policy, s.args) for s in specs] == [
        ("pic:k=4", "pic", {"k": 4}), ("blend:r=10%", "blend", {"r": 0.1}),
        ("clip:r=5%", "clip", {"r": 0.05})]
    assert len(skipped) == 1 and "magic" in skipped[0] and "not implemented" in skipped[0]
    for bad in ("pic:k=x", "blend:q=1", "pic:k"):
        with pytest.raises(ValueError, match="expected NAME"):
            parse_policies([bad])
    assert {s.split(":")[0] for s in DEFAULT_POLICIES} >= {"prefix", "pic", "blend", "clip"}


def test_table_and_missing_matplotlib(report, tmp_path, monkeypatch):
    text = render_table(report)
    for policy in POLICIES:
        assert f"needle   {policy}" in text
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match="needs matplotlib"):
        write_plot(report, str(tmp_path / "q.png"))


def test_cli_writes_json_table_and_plot(yarn_model, tmp_path):  # noqa: F811
    out, plot = tmp_path / "q.json", tmp_path / "q.png"
    args = ["quality", "--model", str(yarn_model), "--device", "cpu", "--dtype", "float32",
            "--policies", "full,pic:k=0,clip:r=0.1", "--cases", "1", "--docs", "2",
            "--doc-tokens", "20", "--turns", "2", "--tokens", "2", "--json", str(out),
            "--plot", str(plot)]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    cells = {(c["policy"], c["workload"]) for c in data["cells"]}
    assert cells == {(p, w) for p in ("full", "pic:k=0") for w in WORKLOADS}
    assert any("clip" in s for s in data["skipped"]) and "skipped clip" in result.output
    assert all(c["agreement"] == 1.0 for c in data["cells"] if c["policy"] == "full")
    assert plot.stat().st_size > 0
    for w in WORKLOADS:
        assert f"\n{w:<8} pic:k=0" in result.output
    bad = CliRunner().invoke(eval_command, ["quality", "--model", str(yarn_model),
                                            "--policies", "pic:k=x"])
    assert bad.exit_code == 2 and "pic:k=x" in bad.output


def test_engine_state_untouched(engine, report):
    stats = engine.stats()
    assert stats["engine"]["requests"] == 0 and stats["store"]["entries"] == 0


def test_workloads_are_seeded_and_move_the_needle(engine):
    cfg = WorkloadConfig(workloads=("needle", "rag"), cases=2, docs=3, doc_tokens=30)
    one, two = build_cases(engine.tokenizer, cfg), build_cases(engine.tokenizer, cfg)
    assert [c.name for c in one] == ["needle-0", "needle-1", "rag-0", "rag-1"]
    for a, b in zip(one, two):
        assert np.array_equal(a.prompt.ids, b.prompt.ids) and a.answer == b.answer
    other = build_cases(engine.tokenizer, WorkloadConfig(workloads=("needle",), seed=1))
    assert not np.array_equal(other[0].prompt.ids, one[0].prompt.ids)
    decode = engine.tokenizer.decode
    for case in one[:2]:
        warm, prompt = decode(case.warm[0].ids), decode(case.prompt.ids)
        fact = f"is {case.answer}."
        assert fact in warm and fact in prompt  # the needle sits in a reused document
        assert prompt.rindex("access code for project") > prompt.index(fact)  # question after
        assert warm.split("\n")[0] != prompt.split("\n")[0]  # a new header
    with pytest.raises(ValueError, match="workloads must be"):
        WorkloadConfig(workloads=("chat",))



def test_clip_rows_run_with_an_aux_model(yarn_model, aux_model):  # noqa: F811
    """With an auxiliary model the harness runs clip: r=1 equals full, r=10% recomputes about
    a tenth of the reusable tokens, and the invariants of every row hold."""
    eng = Engine(EngineConfig(model_dir=str(yarn_model), device="cpu", dtype="float32",
                              self_check=False, clip_model_dir=str(aux_model)))
    cases = build_cases(eng.tokenizer, WorkloadConfig(workloads=("needle", "agentic"), cases=1,
                                                      docs=3, doc_tokens=40, turns=2))
    specs, _ = parse_policies(["full", "clip:r=1.0", "clip:r=10%"])
    rep = evaluate(eng, cases, specs, new_tokens=4)
    for workload in ("needle", "agentic"):
        exact = cell(rep, "clip:r=1.0", workload)
        assert exact.agreement == 1.0 and exact.kl_max < 1e-6 and exact.recompute_ratio == 1.0
        assert 0.05 < cell(rep, "clip:r=10%", workload).recompute_ratio < 0.2
    assert all(r.reused > 0 for r in rep.results if r.policy == "clip:r=10%")
