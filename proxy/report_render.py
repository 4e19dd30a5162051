"""Render a Report as a table (for people), JSON (everything) or CSV (the grouped rows)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from irminsul.proxy.report_model import (
    MISSES,
    PROMPT,
    FamilyComparison,
    GroupRow,
    Percentiles,
    Report,
    RunSide,
    Share,
    Totals,
)

FORMATS = ("table", "json", "csv")


def render(report: Report, fmt: str) -> str:
    """The report as text in ``fmt`` (one of FORMATS), ending with a newline."""
    if fmt == "json":
        return json.dumps(to_json(report), indent=2) + "\n"
    if fmt == "csv":
        return _csv(report)
    if fmt == "table":
        return _table(report)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ---- JSON --------------------------------------------------------------------------------


def _share_json(s: Share) -> dict[str, Any]:
    return {"name": s.name, "numerator": s.numerator, "denominator": s.denominator, "of": s.of,
            "value": s.value}


def _totals_json(t: Totals) -> dict[str, Any]:
    return {**t._asdict(), "missed_tokens": t.missed_tokens,
            "shares": [_share_json(s) for s in t.shares()]}


def _side_json(s: RunSide) -> dict[str, Any]:
    return {**s._asdict(), "ttft": s.ttft._asdict()}


def _family_json(f: FamilyComparison) -> dict[str, Any]:
    p50, p95 = f.ttft_ratios()
    return {"family": f.family, "a": _side_json(f.a), "b": _side_json(f.b),
            "recovered_tokens": f.recovered_tokens, "prompts_match": f.prompts_match,
            "shares": [_share_json(s) for s in f.shares()],
            "ttft_p50_ratio_a_over_b": p50, "ttft_p95_ratio_a_over_b": p95}


def to_json(r: Report) -> dict[str, Any]:
    """The whole report as JSON-ready data."""
    out: dict[str, Any] = {"db": r.db, "since": r.since, "source": r.source}
    if r.comparison is not None:
        c = r.comparison
        out["comparison"] = {"run_a": c.run_a, "run_b": c.run_b,
                             "families": [_family_json(f) for f in c.families],
                             "total": _family_json(c.total)}
        return out
    out.update(
        by=r.by,
        totals=_totals_json(r.totals),
        ttft_ms={k: v._asdict() for k, v in r.ttft._asdict().items()},
        miss_causes=[m._asdict() for m in r.miss_causes],
        groups=[{"key": g.key, **_totals_json(g.totals), "ttft_ms": g.ttft._asdict()}
                for g in r.groups],
    )
    if r.audits:
        out["audits"] = [a._asdict() for a in r.audits]
    return out


# ---- CSV ---------------------------------------------------------------------------------


def _csv(r: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if r.comparison is not None:
        w.writerow(["family", "requests_a", "requests_b", "counted_a", "counted_b",
                    "prompt_tokens_a", "prompt_tokens_b", "exact_prefix_tokens_a",
                    "exact_prefix_tokens_b", "reused_tokens_a", "reused_tokens_b",
                    "recovered_tokens", "recovered_share_of_prompt_a",
                    "recovered_share_of_misses_a", "ttft_p50_ms_a", "ttft_p50_ms_b",
                    "ttft_p50_ratio_a_over_b", "ttft_p95_ms_a", "ttft_p95_ms_b",
                    "ttft_p95_ratio_a_over_b", "prompts_match"])
        for f in (*r.comparison.families, r.comparison.total):
            of_prompt, of_misses = f.shares()
            p50, p95 = f.ttft_ratios()
            w.writerow(_cells([f.family, f.a.requests, f.b.requests, f.a.counted, f.b.counted,
                               f.a.prompt_tokens, f.b.prompt_tokens, f.a.exact_prefix_tokens,
                               f.b.exact_prefix_tokens, f.a.reused_tokens, f.b.reused_tokens,
                               f.recovered_tokens, of_prompt.value, of_misses.value,
                               f.a.ttft.p50, f.b.ttft.p50, p50, f.a.ttft.p95, f.b.ttft.p95, p95,
                               f.prompts_match]))
        return buf.getvalue()
    w.writerow([r.by, *Totals._fields, "exact_share_of_prompt", "reused_share_of_prompt",
                "reused_share_of_misses", "ttft_requests", "ttft_p50_ms", "ttft_p95_ms"])
    rows = [*r.groups, GroupRow("(total)", r.totals, r.ttft.overall)]
    for g in rows:
        exact, reused, reused_m, *_ = g.totals.shares()
        w.writerow(_cells([g.key, *g.totals, exact.value, reused.value, reused_m.value,
                           g.ttft.requests, g.ttft.p50, g.ttft.p95]))
    return buf.getvalue()


def _cells(values) -> list:
    return ["" if v is None else v for v in values]


# ---- table -------------------------------------------------------------------------------


def _n(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _share_line(s: Share) -> str:
    if s.value is None:
        return f"{s.name}: {_n(s.numerator)} (no {s.of})"
    return f"{s.name}: {_n(s.numerator)} = {_pct(s.value)} of {s.of} ({_n(s.denominator)})"


def _grid(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells) -> str:  # first column left-aligned (labels), the rest right (numbers)
        text = (str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths)))
        return (indent + "  ".join(text)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _perc_row(label: str, p: Percentiles) -> list[str]:
    return [label, _n(p.requests), _ms(p.p50), _ms(p.p95)]


def _table(r: Report) -> str:
    when = f"since {r.since}" if r.since else "all time"
    if r.source:
        when += f", source {r.source} only"
    out = [f"Irminsul savings: {r.db} ({when})"]
    if r.comparison is not None:
        return "\n".join(out + _compare_lines(r)) + "\n"
    t = r.totals
    out += [
        (f"requests: {_n(t.requests)} ({_n(t.counted)} with every token counter reported,"
         f" {_n(t.failed)} failed)"),
        f"tokens, over the {_n(t.counted)} requests with every counter:",
        *_grid(["", "tokens"], [["prompt", _n(t.prompt_tokens)],
                                ["exact prefix", _n(t.exact_prefix_tokens)],
                                ["content reused", _n(t.reused_tokens)],
                                ["recomputed", _n(t.recomputed_tokens)],
                                ["new", _n(t.new_tokens)]]),
        "shares:",
        *("  " + _share_line(s) for s in t.shares()),
    ]
    if t.flops_requests:
        out.append(f"compute saved (estimated for {_n(t.flops_requests)} requests):"
                   f" {t.flops_saved:.3e} FLOPs, {_n(t.energy_saved_j)} J")
    else:
        out.append("compute saved: no request carries an estimate")
    out += ["", "TTFT (ms):", *_grid(["", "requests", "p50", "p95"], [
        _perc_row("with content reuse (reused > 0)", r.ttft.with_reuse),
        _perc_row("without content reuse (reused = 0)", r.ttft.without_reuse),
        _perc_row("all requests with a TTFT", r.ttft.overall),
    ])]
    out += ["", "miss causes (how a request departs from its session's previous one):"]
    if r.miss_causes:
        out += _grid(["cause", "requests", "prefix misses (tokens)", "reused (tokens)"],
                     [[m.cause, _n(m.requests), _n(m.missed_tokens), _n(m.reused_tokens)]
                      for m in r.miss_causes])
    else:
        out.append("  none recorded")
    out += ["", f"by {r.by}:"]
    out += _grid([r.by, "requests", "prompt", "exact", "reused", "recomputed", "new",
                  "reused/prompt", "reused/misses", "ttft p50", "ttft p95"],
                 [[_key(g.key), _n(g.totals.requests), _n(g.totals.prompt_tokens),
                   _n(g.totals.exact_prefix_tokens), _n(g.totals.reused_tokens),
                   _n(g.totals.recomputed_tokens), _n(g.totals.new_tokens),
                   _pct(g.totals.shares()[1].value), _pct(g.totals.shares()[2].value),
                   _ms(g.ttft.p50), _ms(g.ttft.p95)] for g in r.groups])
    out.append(f"  reused/prompt = content-reused / {PROMPT}; reused/misses = content-reused"
               f" / {MISSES}")
    if r.audits:
        out += ["", ("quality audits (served requests re-run with full; KL(full || served)"
                     " at the first generated position, greedy agreement over up to 32 tokens):")]
        out += _grid(["model", "policy", "audits", "KL mean", "KL max", "agree mean",
                      "agree min", "failed", "fallbacks"],
                     [[a.model, a.policy, _n(a.audits), f"{a.kl_mean:.4f}", f"{a.kl_max:.4f}",
                       f"{a.agreement_mean:.3f}", f"{a.agreement_min:.3f}", _n(a.failed),
                       _n(a.fallbacks)] for a in r.audits])
    return "\n".join(out) + "\n"


def _key(k: str | None) -> str:
    return "(none)" if k is None else str(k)


def _compare_lines(r: Report) -> list[str]:
    c = r.comparison
    rows = []
    for f in (*c.families, c.total):
        of_prompt, of_misses = f.shares()
        p50, p95 = f.ttft_ratios()
        rows.append([_key(f.family), _n(f.a.requests), _n(f.b.requests), _n(f.a.prompt_tokens),
                     _n(f.a.exact_prefix_tokens), _n(f.b.exact_prefix_tokens),
                     _n(f.b.reused_tokens), _n(f.recovered_tokens), _pct(of_prompt.value),
                     _pct(of_misses.value), _ms(f.a.ttft.p50), _ms(f.b.ttft.p50), _ratio(p50),
                     _ms(f.a.ttft.p95), _ms(f.b.ttft.p95), _ratio(p95)])
    out = [f"compare: A = {c.run_a}, B = {c.run_b}",
           *_grid(["family", "req A", "req B", "prompt A", "exact A", "exact B", "reused B",
                   "recovered", "rec/prompt A", "rec/misses A", "p50 A", "p50 B", "p50 A/B",
                   "p95 A", "p95 B", "p95 A/B"], rows),
           "  recovered = B's exact prefix + reused - A's exact prefix",
           "  rec/prompt A = recovered / run A's prompt tokens",
           "  rec/misses A = recovered / run A's exact-prefix misses (prompt - exact prefix)",
           "  p50, p95 = TTFT in ms; A/B = A's TTFT / B's (above 1: B is faster)"]
    differ = [f for f in c.families if not f.prompts_match]
    for f in differ:
        out.append(f"  note: family {_key(f.family)}: prompt tokens differ between the runs"
                   f" (A {_n(f.a.prompt_tokens)}, B {_n(f.b.prompt_tokens)}): not the same"
                   " trace, or requests missing from one run")
    return out
