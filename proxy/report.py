"""`irminsul report`: what the cache saved, read from the savings log.

Reads run in one SQLite read transaction, so the figures are one consistent snapshot even while
the proxy writes (the log is in WAL mode: readers and the writer do not block each other).
"""

from __future__ import annotations

import re
import sqlite3
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from irminsul.proxy.audits import audit_summary
from irminsul.proxy.report_model import (
    Comparison,
    FamilyComparison,
    GroupRow,
    MissCause,
    Report,
    RunSide,
    Totals,
    TtftSplit,
    percentiles,
)
from irminsul.proxy.report_render import FORMATS, render
from irminsul.proxy.savings import PART_FIELDS, SOURCES, SavingsLog

GROUP_KEYS = {
    "session": "session",
    "model": "model",
    "day": "substr(time, 1, 10)",  # UTC date: time is stored as ISO 8601 in UTC
    "run": "run",
    "family": "family",
}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_COMPLETE = " AND ".join(f"{c} IS NOT NULL" for c in ("prompt_tokens", *PART_FIELDS))
_POTENTIAL = ("potential_reuse_tokens IS NOT NULL AND prompt_tokens IS NOT NULL"
              " AND exact_prefix_tokens IS NOT NULL")
_TOTALS_SQL = f"""
    COUNT(*),
    COALESCE(SUM({_COMPLETE}), 0),
    COALESCE(SUM(status >= 400 OR error IS NOT NULL), 0),
    COALESCE(SUM(CASE WHEN {_COMPLETE} THEN prompt_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_COMPLETE} THEN exact_prefix_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_COMPLETE} THEN reused_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_COMPLETE} THEN recomputed_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_COMPLETE} THEN new_tokens END), 0),
    COALESCE(SUM({_POTENTIAL}), 0),
    COALESCE(SUM(CASE WHEN {_POTENTIAL} THEN potential_reuse_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_POTENTIAL} THEN prompt_tokens END), 0),
    COALESCE(SUM(CASE WHEN {_POTENTIAL} THEN prompt_tokens - exact_prefix_tokens END), 0),
    COALESCE(SUM(completion_tokens), 0),
    COUNT(flops_saved),
    COALESCE(SUM(flops_saved), 0.0),
    COALESCE(SUM(energy_saved_j), 0.0)
"""


class ReportError(ValueError):
    """A report that cannot be made: the message names the problem for the command line."""


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``1h``, ``2d``, ``1w`` back from ``now``, or an ISO date/time (UTC if no zone)."""
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * UNITS[m.group(2)])
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportError(f"--since {text!r} is neither a duration (30m, 1h, 2d, 1w) nor an "
                          "ISO date/time (2025-01-31 or 2025-01-31T12:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def build_report(db_path: str | Path, *, since: str | None = None, by: str = "session",
                 compare: tuple[str, str] | None = None, source: str | None = None,
                 now: datetime | None = None) -> Report:
    """Read the savings log at ``db_path`` into a Report. Changes nothing in the log (beyond
    migrating a log written by an older Irminsul). Raises ReportError with a clear message."""
    if by not in GROUP_KEYS:
        raise ReportError(f"cannot group by {by!r}; choose one of {', '.join(GROUP_KEYS)}")
    cutoff = parse_since(since, now) if since else None
    try:
        log = SavingsLog(db_path, create=False)
    except FileNotFoundError:
        raise ReportError(f"no savings database at {db_path} (the proxy and `irminsul replay`"
                          " write one; pass its path with --db)") from None
    except (ValueError, sqlite3.DatabaseError) as e:
        raise ReportError(f"cannot read {db_path}: {e}") from None
    if source is not None and source != "auto" and source not in SOURCES:
        raise ReportError(f"unknown source {source!r}; choose one of auto, {', '.join(SOURCES)}")
    if source == "auto":
        source = _auto_source(log) if compare is None and by != "run" else None
    clauses, params = ["1"], []
    if cutoff is not None:
        clauses.append("epoch >= ?")
        params.append(cutoff.timestamp())
    if source is not None:
        clauses.append("source = ?")
        params.append(source)
    where = " AND ".join(clauses)
    conn = log.db.conn
    try:
        conn.execute("BEGIN")  # one snapshot for every query below
        base = {"db": str(db_path), "since": cutoff.isoformat() if cutoff else None, "by": by,
                "source": source}
        if compare is not None:
            return Report(**base, comparison=_compare(conn, where, params, *compare))
        return Report(
            **base,
            totals=_totals(conn, where, params),
            ttft=_ttft_split(conn, where, params),
            miss_causes=_miss_causes(conn, where, params),
            groups=_groups(conn, where, params, GROUP_KEYS[by]),
            audits=audit_summary(conn, cutoff.timestamp() if cutoff else None),
        )
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        log.close()


def _auto_source(log: SavingsLog) -> str | None:
    """A replay through the proxy is logged twice, once by each (same requests, two sources):
    count proxy rows when there are any, else every row."""
    row = log.db.conn.execute("SELECT 1 FROM requests WHERE source = 'proxy' LIMIT 1").fetchone()
    return "proxy" if row else None


def _totals(conn, where, params) -> Totals:
    row = conn.execute(f"SELECT {_TOTALS_SQL} FROM requests WHERE {where}", params).fetchone()
    return Totals(*row)


def _ttft_split(conn, where, params) -> TtftSplit:
    rows = conn.execute(f"SELECT ttft_ms, reused_tokens > 0 FROM requests WHERE {where}"
                        " AND ttft_ms IS NOT NULL", params).fetchall()
    return TtftSplit(
        with_reuse=percentiles(t for t, r in rows if r == 1),
        without_reuse=percentiles(t for t, r in rows if r == 0),
        overall=percentiles(t for t, _ in rows),
    )


def _miss_causes(conn, where, params, limit: int = 10) -> tuple[MissCause, ...]:
    rows = conn.execute(
        f"""SELECT miss_cause, COUNT(*),
                   COALESCE(SUM(CASE WHEN {_COMPLETE} THEN prompt_tokens - exact_prefix_tokens
                                END), 0),
                   COALESCE(SUM(CASE WHEN {_COMPLETE} THEN reused_tokens END), 0)
            FROM requests WHERE {where} AND miss_cause IS NOT NULL
            GROUP BY miss_cause ORDER BY COUNT(*) DESC, miss_cause LIMIT {int(limit)}""",
        params).fetchall()
    return tuple(MissCause(*r) for r in rows)


def _groups(conn, where, params, key: str) -> tuple[GroupRow, ...]:
    rows = conn.execute(
        f"SELECT {key}, {_TOTALS_SQL} FROM requests WHERE {where}"
        f" GROUP BY {key} ORDER BY MIN(epoch), {key}", params).fetchall()
    ttft = defaultdict(list)
    for k, t in conn.execute(f"SELECT {key}, ttft_ms FROM requests WHERE {where}"
                             " AND ttft_ms IS NOT NULL", params):
        ttft[k].append(t)
    return tuple(GroupRow(r[0], Totals(*r[1:]), percentiles(ttft[r[0]])) for r in rows)


def _compare(conn, where, params, run_a: str, run_b: str) -> Comparison:
    known = [r[0] for r in conn.execute("SELECT DISTINCT run FROM requests WHERE run IS NOT NULL"
                                        " ORDER BY run")]
    for name in (run_a, run_b):
        if name not in known:
            raise ReportError(f"unknown run {name!r}; runs in the log: "
                              f"{', '.join(known) if known else '(none)'}")
    sides = {}
    for run in (run_a, run_b):
        sides[run] = {}
        rows = conn.execute(
            f"""SELECT family, COUNT(*), COALESCE(SUM({_COMPLETE}), 0),
                       COALESCE(SUM(CASE WHEN {_COMPLETE} THEN prompt_tokens END), 0),
                       COALESCE(SUM(CASE WHEN {_COMPLETE} THEN exact_prefix_tokens END), 0),
                       COALESCE(SUM(CASE WHEN {_COMPLETE} THEN reused_tokens END), 0)
                FROM requests WHERE {where} AND run = ? GROUP BY family""",
            [*params, run]).fetchall()
        ttft = defaultdict(list)
        for fam, t in conn.execute(f"SELECT family, ttft_ms FROM requests WHERE {where}"
                                   " AND run = ? AND ttft_ms IS NOT NULL", [*params, run]):
            ttft[fam].append(t)
        for fam, *sums in rows:
            sides[run][fam] = RunSide(*sums, percentiles(ttft[fam]))
        every = [t for ts in ttft.values() for t in ts]
        sides[run]["(all)"] = RunSide(
            *(sum(s[i] for s in sides[run].values()) for i in range(5)), percentiles(every))
    empty = RunSide(0, 0, 0, 0, 0, percentiles(()))
    families = sorted((set(sides[run_a]) | set(sides[run_b])) - {"(all)"},
                      key=lambda f: (f is None, f or ""))
    rows = tuple(FamilyComparison(f, sides[run_a].get(f, empty), sides[run_b].get(f, empty))
                 for f in families)
    total = FamilyComparison("(all)", sides[run_a]["(all)"], sides[run_b]["(all)"])
    return Comparison(run_a, run_b, rows, total)


def report_main(db: str | Path, since: str | None = None, by: str = "session",
                fmt: str = "table", compare: tuple[str, str] | None = None,
                source: str | None = None, plot: str | Path | None = None) -> str:
    """The text `irminsul report` prints; problems become click errors naming them.
    ``plot``: with ``compare``, also draw recovery per turn and TTFT into that image file."""
    if fmt not in FORMATS:
        raise click.BadParameter(f"choose one of {', '.join(FORMATS)}", param_hint="'--format'")
    if plot is not None:
        if not compare:
            raise click.UsageError("--plot draws a comparison: give --compare RUN_A RUN_B too")
        from irminsul.proxy.report_plot import load_pyplot

        load_pyplot()  # a missing matplotlib fails before any work
    try:
        report = build_report(db, since=since, by=by, source=source,
                              compare=tuple(compare) if compare else None)
        if plot is not None:
            from irminsul.proxy.report_plot import plot_comparison, read_plot_data

            plot_comparison(read_plot_data(db, *compare, since=since, source=source), plot)
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    return render(report, fmt)


@click.command("report")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default="irminsul.db",
              show_default=True, envvar="IRMINSUL_DB",
              help="Savings database written by the proxy or `irminsul replay` (env IRMINSUL_DB).")
@click.option("--since", metavar="WHEN",
              help="Only requests from WHEN on: a duration back from now (30m, 1h, 2d, 1w) or an"
                   " ISO date/time (UTC unless it names a zone).")
@click.option("--by", type=click.Choice(list(GROUP_KEYS)), default="session", show_default=True,
              help="Break the totals down by this key (day is the UTC date).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table for reading; json for everything, machine-readable; csv for the"
                   " per-group (or, with --compare, per-family) rows plus a total row.")
@click.option("--compare", nargs=2, metavar="RUN_A RUN_B", default=None,
              help="Compare two replay runs family by family: tokens RUN_B recovers above"
                   " RUN_A's exact prefix, and both runs' TTFT p50/p95 with their ratio.")
@click.option("--source", type=click.Choice(["auto", *SOURCES]), default="auto",
              show_default=True,
              help="Only requests logged by this source (proxy traffic, replay runs, or audit"
                   " requests). auto: the proxy's rows when it logged any (a replay through the"
                   " proxy logs each request twice), else all rows; all rows with --by run or"
                   " --compare.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="With --compare: also draw recovery per turn and the TTFT distribution of"
                   " both runs into FILE (PNG, or the format its suffix names). Needs"
                   " matplotlib: pip install 'irminsul[plot]'.")
def report_command(db, since, by, fmt, compare, source, plot):
    """Show what the cache saved: tokens served from the exact prefix and from content reuse,
    recomputed and new; what content reuse recovered of the prefix cache's misses; why the
    prefix missed; TTFT with and without reuse; estimated compute and energy saved.

    Token totals count only requests whose counters were all reported; every share names its
    denominator. Reads safely while the proxy is writing.
    """
    click.echo(report_main(db, since, by, fmt, compare, source, plot), nl=False)
    if plot is not None:
        click.echo(f"plot written to {plot}", err=True)
