"""The quality report as a terminal table and as a plot (quality vs recompute ratio)."""

from __future__ import annotations

import math

from .quality import NEAR_TIE


def _num(v, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def render_table(report) -> str:
    """Rows per workload, then policy: the cell figures in fixed-width columns."""
    head = (f"{'workload':<8} {'policy':<13} {'cases':>5} {'recomp':>7} {'computed':>8} "
            f"{'agree':>6} {'differ':>9} {'KL mean':>9} {'KL max':>9} {'retrieval':>11} "
            f"{'saved':>7}")
    lines = [(f"model {report.model} on {report.device} ({report.dtype}); agreement over the "
             f"first {report.new_tokens} greedy tokens; KL(full || policy) in nats at the first "
             "generated position"), head, "-" * len(head)]
    workloads = list(dict.fromkeys(c.workload for c in report.cells))
    for w in workloads:
        for c in (c for c in report.cells if c.workload == w):
            if c.answer_hits is None:
                retrieval = "-"
            elif c.retrieval is None:
                retrieval = f"{c.answer_hits}/{c.full_hits} n/a"
            else:
                retrieval = f"{c.retrieval:.2f} ({c.answer_hits}/{c.full_hits})"
            lines.append(
                f"{w:<8} {c.policy:<13} {c.cases:>5} {_num(c.recompute_ratio, '7.1%')} "
                f"{_num(c.compute_ratio, '8.1%')} {_num(c.agreement, '6.3f')} "
                f"{f'{c.diverged} ({c.near_ties})':>9} {_num(c.kl_mean, '9.4f')} "
                f"{_num(c.kl_max, '9.4f')} {retrieval:>11} {_num(c.time_saved, '7.1%')}")
    lines += ["", ("recomp: recomputed / (reused + recomputed) tokens ('-': nothing reusable); "
              "computed: (recomputed + new) / prompt; differ: cases whose greedy tokens differ "
              f"from full's (in brackets: at a near tie, full's top two < {NEAR_TIE:g} nats "
              "apart); retrieval: needle answers containing the value, relative to full's (n/a "
              "when full found none); saved: 1 - prefill seconds / full's.")]
    for case in report.cases:
        lines.append(f"case {case['name']}: warm {case['warm_tokens']} tokens, prompt "
                     f"{case['prompt_tokens']} tokens")
    lines += [f"skipped {s}" for s in report.skipped]
    return "\n".join(lines)


def write_plot(report, path: str) -> None:
    """Agreement and KL against the recompute ratio, one series per workload, points labelled
    by policy; policies without reuse (full, prefix) sit at ratio 1. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed "
                           "(pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for w in dict.fromkeys(c.workload for c in report.cells):
        cells = [c for c in report.cells if c.workload == w]
        xs = [1.0 if c.recompute_ratio is None else c.recompute_ratio for c in cells]
        series = ((axes[0], [c.agreement for c in cells]), (axes[1], [c.kl_mean for c in cells]))
        for ax, ys in series:
            ax.scatter(xs, ys, label=w)
            for x, y, c in zip(xs, ys, cells):
                ax.annotate(c.policy, (x, y), fontsize=6, alpha=0.7)
    axes[0].set_ylabel(f"greedy agreement with full (first {report.new_tokens} tokens)")
    axes[1].set_ylabel("KL(full || policy), nats, first position")
    for ax in axes:
        ax.set_xlabel("recompute ratio (recomputed / reusable; 1 = no reuse)")
        ax.legend()
    fig.suptitle(f"{report.model}: quality vs recompute ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
