"""`irminsul report --compare RUN_A RUN_B --plot out.png`: recovery per turn and TTFT, drawn.

Two panels: per turn (the trace's turn index, all sessions and families together), the share
of the prompt tokens each run served from cache (exact prefix + reused) and what run B
recovered above run A's exact prefix, every share of run A's prompt tokens at that turn; and
the empirical distribution of both runs' TTFT. matplotlib is the optional extra ``plot`` and
is imported only here, only when a plot is asked for.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import click

from irminsul.proxy.report import ReportError, parse_since
from irminsul.proxy.savings import PART_FIELDS, SavingsLog

INSTALL_HINT = "pip install 'irminsul[plot]'"
_COMPLETE = " AND ".join(f"{c} IS NOT NULL" for c in ("prompt_tokens", *PART_FIELDS))


class TurnSide(NamedTuple):
    """One run's token sums at one turn, over requests whose counters were all reported."""

    requests: int
    prompt_tokens: int
    exact_prefix_tokens: int
    reused_tokens: int

    @property
    def served(self) -> int:
        return self.exact_prefix_tokens + self.reused_tokens


class TurnRecovery(NamedTuple):
    turn: int
    a: TurnSide
    b: TurnSide

    @property
    def recovered_tokens(self) -> int:
        """B's exact prefix + reused minus A's exact prefix, as in the --compare table."""
        return self.b.served - self.a.exact_prefix_tokens


class PlotData(NamedTuple):
    run_a: str
    run_b: str
    turns: tuple[TurnRecovery, ...]  # turns either run has, ascending; rows without a turn left out
    ttft_a: tuple[float, ...]  # ms, every request of the run with a TTFT, ascending
    ttft_b: tuple[float, ...]


def read_plot_data(db_path: str | Path, run_a: str, run_b: str, *, since: str | None = None,
                   source: str | None = None, now: datetime | None = None) -> PlotData:
    """What the plot draws, read from the savings log in one snapshot; changes nothing.
    Raises ReportError for a missing log or an unknown run."""
    try:
        log = SavingsLog(db_path, create=False)
    except FileNotFoundError:
        raise ReportError(f"no savings database at {db_path}") from None
    except (ValueError, sqlite3.DatabaseError) as e:
        raise ReportError(f"cannot read {db_path}: {e}") from None
    where, params = "run = ?", []
    if since:
        where += " AND epoch >= ?"
        params.append(parse_since(since, now).timestamp())
    if source not in (None, "auto"):
        where += " AND source = ?"
        params.append(source)
    conn = log.db.conn
    try:
        conn.execute("BEGIN")
        known = {r[0] for r in conn.execute("SELECT DISTINCT run FROM requests")}
        for name in (run_a, run_b):
            if name not in known:
                raise ReportError(f"unknown run {name!r}")
        sides, ttfts = [], []
        for run in (run_a, run_b):
            rows = conn.execute(
                f"""SELECT turn, COUNT(*), SUM(prompt_tokens), SUM(exact_prefix_tokens),
                           SUM(reused_tokens)
                    FROM requests WHERE {where} AND turn IS NOT NULL AND {_COMPLETE}
                    GROUP BY turn""", [run, *params]).fetchall()
            sides.append({t: TurnSide(*sums) for t, *sums in rows})
            ttfts.append(tuple(t for (t,) in conn.execute(
                f"SELECT ttft_ms FROM requests WHERE {where} AND ttft_ms IS NOT NULL"
                " ORDER BY ttft_ms", [run, *params])))
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        log.close()
    empty = TurnSide(0, 0, 0, 0)
    turns = tuple(TurnRecovery(t, sides[0].get(t, empty), sides[1].get(t, empty))
                  for t in sorted(set(sides[0]) | set(sides[1])))
    return PlotData(run_a, run_b, turns, *ttfts)


def load_pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a click error saying how to get
    it (the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: the plot only goes to a file
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(
            f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return plt


def _share(num: int, den: int) -> float:
    return 100.0 * num / den if den else float("nan")  # nan: matplotlib leaves a gap


def plot_comparison(data: PlotData, path: str | Path) -> Path:
    """Draw ``data`` into the image file ``path`` (format from its suffix, PNG by default)."""
    plt = load_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    turns = [t.turn for t in data.turns]
    a_prompt = [t.a.prompt_tokens for t in data.turns]
    left.bar(turns, [_share(t.recovered_tokens, p) for t, p in zip(data.turns, a_prompt)],
             color="tab:green", alpha=0.35, label=f"recovered by {data.run_b} above "
             f"{data.run_a}'s exact prefix")
    left.plot(turns, [_share(t.a.served, p) for t, p in zip(data.turns, a_prompt)], "o-",
              color="tab:blue", label=f"{data.run_a}: exact prefix + reused")
    left.plot(turns, [_share(t.b.served, p) for t, p in zip(data.turns, a_prompt)], "s-",
              color="tab:orange", label=f"{data.run_b}: exact prefix + reused")
    left.set(xlabel="turn", ylabel=f"% of {data.run_a}'s prompt tokens at that turn",
             title="Served from cache, per turn", ylim=(0, 105))
    if turns:
        left.set_xticks(turns)
    # below the axes: inside, it would hide bars or points whatever the data
    left.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15))
    for name, values, color in ((data.run_a, data.ttft_a, "tab:blue"),
                                (data.run_b, data.ttft_b, "tab:orange")):
        if not values:
            continue
        ys = [0.0, *(100.0 * (i + 1) / len(values) for i in range(len(values)))]
        right.step([values[0], *values], ys, where="post", color=color,
                   label=f"{name} ({len(values)} requests)")
    right.set(xlabel="time to first token, ms", ylabel="% of requests at or below",
              title="TTFT distribution", ylim=(0, 102))
    if data.ttft_a or data.ttft_b:
        right.set_xscale("log")
        right.legend(fontsize="small", loc="lower right")
    out = Path(path)
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as e:  # a bad directory or an unknown image format
        raise click.ClickException(f"cannot write the plot to {out}: {e}") from None
    finally:
        plt.close(fig)
    return out
