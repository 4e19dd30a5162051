"""`irminsul eval quality`: how far each reuse policy's output drifts from `full`.

For every case (quality_workloads.py) the earlier contexts are prefilled with ``full`` into a
scratch store, then every policy runs the new prompt against that same store (probe.py: the
engine's planner and prefill, nothing committed, so each policy sees the same store) and
decodes greedily. ``full`` on the same prompt is the reference. Per policy and workload:

* recompute ratio: recomputed / (reused + recomputed), the policy's carve-out of the tokens it
  could reuse (None when nothing was reusable), and compute ratio: (recomputed + new) / prompt;
* agreement: the fraction of the first N greedy tokens equal to full's, up to the first
  difference (probe.agreement); and of the cases that differ, how many differ where full's own
  choice was a near tie (its greedy token less than NEAR_TIE nats of log-probability above
  the runner-up): a flip that any small perturbation makes, not content lost;
* KL(full || policy) of the next-token distributions at the first generated position;
* retrieval (needle): how often the answer contains the value, relative to full's count;
* prefill time saved: 1 - policy prefill seconds / full prefill seconds, summed over cases.

On a random-weight model these figures test the harness, not the policies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import click

from ... import SHIPPED_MODEL_DIR
from .config import POLICIES
from .probe import PolicyRun, Prober, agreement, first_difference, kl_divergence
from .quality_workloads import WORKLOADS, Case
from .store import ChunkStore

# full's top-two log-probability gap (nats) under which a differing greedy token counts as a
# near tie: at 0.1 full's choice is at most ~10% likelier than the runner-up
NEAR_TIE = 0.1

DEFAULT_POLICIES = ("full", "prefix", "pic:k=0", "pic:k=4", "pic:k=16", "pic:k=32",
                    "blend:r=0.05", "blend:r=0.1", "blend:r=0.2",
                    "clip:r=0.05", "clip:r=0.1", "clip:r=0.2")


class PolicySpec(NamedTuple):
    label: str  # as given, e.g. "pic:k=4"
    policy: str
    args: dict  # {"k": int} / {"r": float}


def parse_policies(specs: Sequence[str], known: Sequence[str] = POLICIES
                   ) -> tuple[list[PolicySpec], list[str]]:
    """``["pic:k=4", "blend:r=10%", ...]`` as (specs the engine runs, messages for skipped
    ones). A policy the engine does not know is skipped with a message; a malformed spec of a
    known policy raises ValueError naming it. Duplicates are dropped."""
    out: list[PolicySpec] = []
    skipped: list[str] = []
    for raw in specs:
        label = raw.strip()
        if not label or label in {s.label for s in out}:
            continue
        name, _, rest = label.partition(":")
        if name not in known:
            skipped.append(f"{label}: policy {name!r} is not implemented by this engine "
                           f"(known: {', '.join(known)}); skipped")
            continue
        args: dict = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            try:
                if not eq or key not in ("k", "r"):
                    raise ValueError
                if key == "k":
                    args["k"] = int(value)
                else:
                    args["r"] = (float(value[:-1]) / 100 if value.endswith("%")
                                 else float(value))
            except ValueError:
                raise ValueError(f"policy {label!r}: expected NAME[:k=INT|:r=FRACTION or "
                                 f"PERCENT%], got {item!r}") from None
        out.append(PolicySpec(label, name, args))
    return out, skipped


class CaseResult(NamedTuple):
    case: str
    workload: str
    policy: str  # the spec's label
    prompt_tokens: int
    reused: int
    recomputed: int
    new: int
    exact_prefix: int
    kl: float
    agreement: float
    answer_hit: bool | None  # needle: the greedy answer contains the value
    full_hit: bool | None
    prefill_seconds: float
    full_seconds: float
    # full's top-two gap (nats) where the policy's greedy token first differs; None: no difference
    full_margin: float | None = None


class Cell(NamedTuple):
    """One policy on one workload, summed or averaged over its cases."""

    policy: str
    workload: str
    cases: int
    recompute_ratio: float | None  # recomputed / (reused + recomputed); None: nothing reusable
    compute_ratio: float  # (recomputed + new) / prompt tokens
    agreement: float  # mean over cases
    kl_mean: float
    kl_max: float
    answer_hits: int | None  # needle only
    full_hits: int | None
    retrieval: float | None  # answer_hits / full_hits; None when full found none
    prefill_seconds: float
    full_seconds: float
    time_saved: float  # 1 - prefill_seconds / full_seconds
    diverged: int = 0  # cases whose greedy tokens differ from full's within the window
    near_ties: int = 0  # of those, the ones where full's margin there was < NEAR_TIE


class QualityReport(NamedTuple):
    model: str
    device: str
    dtype: str
    new_tokens: int
    policies: tuple[str, ...]
    skipped: tuple[str, ...]
    cases: tuple[dict, ...]  # name, workload, warm and prompt token counts
    cells: tuple[Cell, ...]
    results: tuple[CaseResult, ...]

    def to_json(self) -> dict:
        return {**self._asdict(), "cells": [c._asdict() for c in self.cells],
                "results": [r._asdict() for r in self.results],
                "policies": list(self.policies), "skipped": list(self.skipped),
                "cases": list(self.cases)}


def evaluate(engine, cases: Sequence[Case], policies: Sequence[PolicySpec], new_tokens: int,
             skipped: Sequence[str] = (), progress: Callable[[str], None] | None = None,
             repeats: int = 1) -> QualityReport:
    """Run every policy on every case against ``full`` with ``engine``'s model and chunker;
    each run ``repeats`` times, keeping the fastest prefill (the outputs are deterministic).
    Uses scratch stores: the engine's own store and counters are not touched."""
    from .planner import policy_args

    prober = Prober.of(engine)

    def timed(store, prompt, policy, args) -> PolicyRun:
        runs = [prober.run(store, prompt.ids, prompt.anchors, policy, args, new_tokens)
                for _ in range(max(1, repeats))]
        return runs[0]._replace(prefill_seconds=min(r.prefill_seconds for r in runs))

    parsed = [(s, policy_args(s.policy, s.args, engine.defaults_for(s.policy)))
              for s in policies]
    decode = engine.tokenizer.decode
    first = cases[0].prompt if cases else None
    if first is not None:  # one untimed run first: the first call into torch is slow
        prober.run(ChunkStore(0), first.ids, first.anchors, "full", engine.defaults, 1)
    results: list[CaseResult] = []
    for case in cases:
        store = ChunkStore(1 << 40)
        for w in case.warm:
            prober.warm(store, w.ids, w.anchors)
        # After the warm-up, like the policies: a run right after other work is timed alike.
        ref = timed(store, case.prompt, "full", engine.defaults)
        for spec, args in parsed:
            got = timed(store, case.prompt, spec.policy, args)
            results.append(_case_result(case, spec.label, ref, got, decode))
        if progress is not None:
            progress(f"{case.name}: {len(case.prompt.ids)} tokens, {len(parsed)} policies")
    cells = tuple(_cell(p.label, w, [r for r in results if r.policy == p.label
                                     and r.workload == w])
                  for p in policies for w in dict.fromkeys(c.workload for c in cases))
    runner = engine.runner
    return QualityReport(
        engine.model_name, str(runner.device), str(runner.dtype).removeprefix("torch."),
        new_tokens, tuple(p.label for p in policies), tuple(skipped),
        tuple({"name": c.name, "workload": c.workload,
               "warm_tokens": [len(w.ids) for w in c.warm],
               "prompt_tokens": len(c.prompt.ids)} for c in cases),
        cells, tuple(results))


def _case_result(case: Case, label: str, ref: PolicyRun, got: PolicyRun, decode) -> CaseResult:
    c = got.counts
    hit = full_hit = None
    if case.answer is not None:
        hit = case.answer in decode(got.tokens)
        full_hit = case.answer in decode(ref.tokens)
    at = first_difference(ref.tokens, got.tokens)
    margin = ref.margins[at] if at is not None else None
    return CaseResult(case.name, case.workload, label, c.prompt_tokens, c.reused_tokens,
                      c.recomputed_tokens, c.new_tokens, c.exact_prefix_tokens,
                      kl_divergence(ref.logits, got.logits), agreement(ref.tokens, got.tokens),
                      hit, full_hit, got.prefill_seconds, ref.prefill_seconds, margin)


def _cell(label: str, workload: str, rows: list[CaseResult]) -> Cell:
    reusable = sum(r.reused + r.recomputed for r in rows)
    prompt = sum(r.prompt_tokens for r in rows)
    hits = [r.answer_hit for r in rows if r.answer_hit is not None]
    full_hits = [r.full_hit for r in rows if r.full_hit is not None]
    answer_hits = sum(hits) if hits else None
    n_full = sum(full_hits) if full_hits else None
    seconds, full = sum(r.prefill_seconds for r in rows), sum(r.full_seconds for r in rows)
    margins = [r.full_margin for r in rows if r.full_margin is not None]
    return Cell(
        label, workload, len(rows),
        sum(r.recomputed for r in rows) / reusable if reusable else None,
        sum(r.recomputed + r.new for r in rows) / prompt if prompt else math.nan,
        sum(r.agreement for r in rows) / len(rows) if rows else math.nan,
        sum(r.kl for r in rows) / len(rows) if rows else math.nan,
        max((r.kl for r in rows), default=math.nan),
        answer_hits, n_full, answer_hits / n_full if n_full else None,
        seconds, full, 1 - seconds / full if full > 0 else math.nan,
        len(margins), sum(m < NEAR_TIE for m in margins),
    )


# ---- the command ----------------------------------------------------------------------------

SHIPPED_MODEL = str(SHIPPED_MODEL_DIR)


@click.group("eval")
def eval_command():
    """Evaluate what KV reuse does to the model's output (quality, not speed)."""


@eval_command.command("quality")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True),
              default=SHIPPED_MODEL, show_default=True,
              help="Local DeepSeek-V2-family checkpoint (config.json, weights, tokenizer).")
@click.option("--policies", default=",".join(DEFAULT_POLICIES), show_default=True,
              help="Comma-separated policies compared with full: NAME, NAME:k=INT (pic: tokens "
                   "recomputed per reused chunk) or NAME:r=FRACTION|PERCENT% (blend, clip: "
                   "share of reused tokens recomputed). Policies the engine lacks are skipped "
                   "with a message.")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(WORKLOADS),
              help="Workload to run (repeatable) [default: all]: needle (a key -> value fact "
                   "in a moved document, question after it), agentic (trace sessions: new "
                   "header, reordered sections, compacted tool results), rag (documents in a "
                   "new order).")
@click.option("--cases", type=click.IntRange(min=1), default=2, show_default=True,
              help="Cases per workload.")
@click.option("--docs", type=click.IntRange(min=2), default=4, show_default=True,
              help="Documents per needle / rag prompt.")
@click.option("--doc-tokens", type=click.IntRange(min=20), default=120, show_default=True,
              help="Size of a document (needle, rag) or tool result (agentic), in words.")
@click.option("--turns", type=click.IntRange(min=2), default=3, show_default=True,
              help="Agentic: turns per session; all but the last warm the store.")
@click.option("--tokens", "new_tokens", type=click.IntRange(min=1), default=32,
              show_default=True, help="Greedy tokens generated per prompt (agreement window).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the workloads: the same seed gives the same prompts.")
@click.option("--device", type=click.Choice(("auto", "cuda", "cpu")), default="auto",
              show_default=True, help="Where the model runs.")
@click.option("--dtype", type=click.Choice(("auto", "bfloat16", "float32")), default="auto",
              show_default=True, help="Weights and KV dtype (auto: bfloat16 on cuda, else "
                                      "float32).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Also write the report as JSON to this file ('-' for stdout).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also plot agreement and KL against the recompute ratio (needs matplotlib).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per policy and case; the fastest prefill is kept (timing noise).")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def quality_command(model_dir, policies, workloads, cases, docs, doc_tokens, turns, new_tokens,
                    seed, device, dtype, json_path, plot_path, repeats, quiet):
    """Run every policy against `full` on seeded needle, agentic and RAG prompts and print
    recompute ratio, greedy agreement, first-token KL, needle retrieval and prefill time saved
    per policy and workload.

    Each case first prefills its earlier context(s) with full into a scratch store, then runs
    each policy on the new prompt against that same store. On a random-weight model the
    figures test the harness, not the policies.
    """
    from .config import EngineConfig
    from .engine import Engine
    from .quality_render import render_table, write_plot
    from .quality_workloads import WorkloadConfig, build_cases

    try:
        specs, skipped = parse_policies(policies.split(","))
        wcfg = WorkloadConfig(workloads=workloads or WORKLOADS, cases=cases, seed=seed,
                              docs=docs, doc_tokens=doc_tokens, turns=turns)
        engine = Engine(EngineConfig(model_dir=str(model_dir), device=device, dtype=dtype,
                                     self_check=False))
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from e
    if engine.clip is None:  # clip needs the auxiliary model: <model>/aux
        skipped += [f"{s.label}: no auxiliary model (no {Path(model_dir) / 'aux'} folder); "
                    "skipped" for s in specs if s.policy == "clip"]
        specs = [s for s in specs if s.policy != "clip"]
    if not specs:
        raise click.UsageError(f"no runnable policy in --policies {policies!r}")
    for line in skipped:
        click.echo(f"skipped {line}", err=True)
    say = None if quiet else (lambda m: click.echo(m, err=True))
    report = evaluate(engine, build_cases(engine.tokenizer, wcfg), specs, new_tokens, skipped,
                      progress=say, repeats=repeats)
    text = render_table(report)
    if json_path:
        out = json.dumps(report.to_json(), indent=1, allow_nan=False, default=str)
        if json_path == "-":
            click.echo(out)
        else:
            Path(json_path).write_text(out + "\n", encoding="utf-8")
    if json_path != "-":
        click.echo(text)
    if plot_path:
        try:
            write_plot(report, plot_path)
        except RuntimeError as e:
            raise click.ClickException(str(e)) from e
