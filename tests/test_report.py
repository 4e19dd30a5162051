"""`irminsul report`: exact figures on hand-made logs, the three formats, --compare, the CLI's
errors, and reading while another connection writes."""

import csv
import io
import json
import threading
import time
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner
from support.savings import make_row

from irminsul.proxy.report import ReportError, build_report, parse_since, report_command
from irminsul.proxy.savings import SavingsLog, SavingsWriter, WriterConfig

DAY1 = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()
DAY2 = DAY1 + 86400


def counts(prompt, exact, reused=0, recomputed=0, new=None):
    new = prompt - exact - reused - recomputed if new is None else new
    return {"prompt_tokens": prompt, "exact_prefix_tokens": exact, "reused_tokens": reused,
            "recomputed_tokens": recomputed, "new_tokens": new}


UNKNOWN = dict.fromkeys(
    ("prompt_tokens", "exact_prefix_tokens", "reused_tokens", "recomputed_tokens", "new_tokens"))


@pytest.fixture
def proxy_db(tmp_path):
    """Six proxy requests over two days; the figures below are worked out from these."""
    rows = [
        make_row(session="s1", model="m-a", epoch=DAY1, ttft_ms=500.0,
                 miss_cause="first_request", **counts(1000, 0)),
        make_row(session="s1", model="m-a", epoch=DAY1 + 60, ttft_ms=100.0,
                 miss_cause="system_changed", flops_saved=2e12, energy_saved_j=3.5,
                 **counts(1200, 200, 800, 50)),
        make_row(session="s2", model="m-b", epoch=DAY1 + 120, ttft_ms=50.0,
                 miss_cause="new_content_only", **counts(400, 300)),
        make_row(session="s2", model="m-b", epoch=DAY2 + 10, ttft_ms=80.0,
                 miss_cause="history_rewritten", flops_saved=1e12, energy_saved_j=1.75,
                 **counts(600, 100, 400, 20)),
        # stock upstream: only the exact prefix is known; the proxy saw 300 reusable tokens
        make_row(session="s3", model="m-a", epoch=DAY2 + 20, ttft_ms=300.0, upstream_mode="stock",
                 miss_cause="system_changed", potential_reuse_tokens=300,
                 **{**UNKNOWN, "prompt_tokens": 500, "exact_prefix_tokens": 100}),
        make_row(session="s3", model="m-a", epoch=DAY2 + 30, status=502, error="upstream down",
                 **UNKNOWN),
    ]
    path = tmp_path / "proxy.db"
    with SavingsLog(path) as log:
        log.write(rows)
    return path


def test_totals_shares_ttft_and_causes(proxy_db):
    r = build_report(proxy_db)
    t = r.totals
    assert (t.requests, t.counted, t.failed) == (6, 4, 1)
    assert (t.prompt_tokens, t.exact_prefix_tokens, t.reused_tokens, t.recomputed_tokens,
            t.new_tokens) == (3200, 600, 1200, 70, 1330)
    assert (t.potential_requests, t.potential_reuse_tokens, t.potential_prompt_tokens,
            t.potential_missed_tokens) == (1, 300, 500, 400)
    assert (t.flops_requests, t.flops_saved, t.energy_saved_j) == (2, 3e12, 5.25)
    shares = [(s.numerator, s.denominator, s.of) for s in t.shares()]
    assert shares == [
        (600, 3200, "prompt tokens"),
        (1200, 3200, "prompt tokens"),
        (1200, 2600, "exact-prefix misses (prompt - exact-prefix tokens)"),
        (1800, 3200, "prompt tokens"),
        (300, 500, "prompt tokens of requests with a potential"),
        (300, 400, "exact-prefix misses of requests with a potential"),
    ]
    assert t.shares()[2].value == pytest.approx(1200 / 2600)
    # with reuse: 100, 80; without: 500, 50; all: 50, 80, 100, 300, 500 (linear interpolation)
    assert r.ttft.with_reuse == (2, 90.0, pytest.approx(99.0))
    assert r.ttft.without_reuse == (2, 275.0, pytest.approx(477.5))
    assert r.ttft.overall == (5, 100.0, pytest.approx(460.0))
    assert [tuple(m) for m in r.miss_causes] == [
        ("system_changed", 2, 1000, 800),  # the stock row's counters are incomplete
        ("first_request", 1, 1000, 0),
        ("history_rewritten", 1, 500, 400),
        ("new_content_only", 1, 100, 0),
    ]


def test_grouping_keys(proxy_db):
    by_session = {g.key: g for g in build_report(proxy_db, by="session").groups}
    assert list(by_session) == ["s1", "s2", "s3"]
    s1 = by_session["s1"].totals
    assert (s1.requests, s1.prompt_tokens, s1.exact_prefix_tokens, s1.reused_tokens) == (
        2, 2200, 200, 800)
    assert by_session["s1"].ttft == (2, 300.0, pytest.approx(480.0))
    assert by_session["s3"].totals[:3] == (2, 0, 1)
    by_model = build_report(proxy_db, by="model").groups
    assert [(g.key, g.totals.requests, g.totals.prompt_tokens) for g in by_model] == [
        ("m-a", 4, 2200), ("m-b", 2, 1000)]
    by_day = build_report(proxy_db, by="day").groups
    assert [(g.key, g.totals.requests) for g in by_day] == [("2025-01-01", 3), ("2025-01-02", 3)]
    (by_run,) = build_report(proxy_db, by="run").groups
    assert by_run.key is None and by_run.totals.requests == 6


def test_since(proxy_db):
    now = datetime.fromtimestamp(DAY2 + 100, timezone.utc)
    assert parse_since("1h", now).timestamp() == DAY2 + 100 - 3600
    assert parse_since("2d", now).timestamp() == DAY2 + 100 - 2 * 86400
    assert parse_since("2025-01-02").timestamp() == DAY2  # no zone: UTC
    assert parse_since("2025-01-02T01:00:00+01:00").timestamp() == DAY2
    assert build_report(proxy_db, since="1h", now=now).totals.requests == 3
    assert build_report(proxy_db, since="2025-01-01T00:01:00Z").totals.requests == 5
    with pytest.raises(ReportError, match="--since 'yesterday'"):
        build_report(proxy_db, since="yesterday")


def test_source_filter(proxy_db):
    with SavingsLog(proxy_db) as log:
        log.write([make_row(source="audit", **counts(1000, 0))])
    assert build_report(proxy_db).totals.requests == 7
    proxy_only = build_report(proxy_db, source="proxy")
    assert (proxy_only.totals.requests, proxy_only.totals.prompt_tokens) == (6, 3200)
    out = CliRunner().invoke(report_command, ["--db", str(proxy_db), "--source", "audit"])
    assert out.exit_code == 0 and "requests: 1 (1 with every" in out.output
    assert "source audit only" in out.output


def test_json_and_csv_parse_with_the_same_figures(proxy_db):
    runner = CliRunner()
    out = runner.invoke(report_command, ["--db", str(proxy_db), "--format", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["totals"]["reused_tokens"] == 1200 and data["totals"]["missed_tokens"] == 2600
    assert data["totals"]["shares"][2] == {
        "name": "content-reused tokens", "numerator": 1200, "denominator": 2600,
        "of": "exact-prefix misses (prompt - exact-prefix tokens)", "value": 1200 / 2600}
    assert data["ttft_ms"]["with_reuse"]["p50"] == 90.0
    assert [g["key"] for g in data["groups"]] == ["s1", "s2", "s3"]

    out = runner.invoke(report_command, ["--db", str(proxy_db), "--format", "csv", "--by", "day"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert [r["day"] for r in rows] == ["2025-01-01", "2025-01-02", "(total)"]
    total = rows[-1]
    assert int(total["prompt_tokens"]) == 3200 and float(total["reused_share_of_prompt"]) == 0.375
    assert float(total["reused_share_of_misses"]) == pytest.approx(1200 / 2600)
    assert float(total["ttft_p50_ms"]) == 100.0
    assert int(rows[0]["prompt_tokens"]) == 2600  # day 1: 1000 + 1200 + 400


def test_table_names_every_denominator(proxy_db):
    out = CliRunner().invoke(report_command, ["--db", str(proxy_db)])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "content-reused tokens: 1,200 = 37.5% of prompt tokens (3,200)" in text
    assert ("content-reused tokens: 1,200 = 46.2% of exact-prefix misses (prompt - exact-prefix"
            " tokens) (2,600)") in text
    assert "potential content reuse: 300 = 75.0% of exact-prefix misses of requests" in text
    assert "compute saved (estimated for 2 requests): 3.000e+12 FLOPs, 5.2 J" in text
    assert "reused/misses = content-reused / exact-prefix misses" in text


@pytest.fixture
def runs_db(tmp_path):
    """Two replays of one trace: a stock exact-prefix cache (A) and content reuse (B)."""
    spec = [
        ("stock", "header", counts(1000, 600), 200.0),
        ("stock", "header", counts(1000, 500), 300.0),
        ("stock", "reorder", counts(800, 100), 400.0),
        ("pic", "header", counts(1000, 600, 350, 20), 100.0),
        ("pic", "header", counts(1000, 500, 400, 20), 120.0),
        ("pic", "reorder", counts(800, 100, 600, 40), 100.0),
    ]
    path = tmp_path / "runs.db"
    with SavingsLog(path) as log:
        log.write([make_row(source="replay", run=run, family=fam, ttft_ms=ttft, **c)
                   for run, fam, c, ttft in spec])
    return path


def test_compare_runs(runs_db):
    c = build_report(runs_db, compare=("stock", "pic")).comparison
    header, reorder = c.families
    assert header.family == "header" and header.prompts_match
    assert header.recovered_tokens == (600 + 500 + 350 + 400) - (600 + 500) == 750
    of_prompt, of_misses = header.shares()
    assert (of_prompt.numerator, of_prompt.denominator) == (750, 2000)
    assert (of_misses.numerator, of_misses.denominator, of_misses.of) == (
        750, 900, "run A's exact-prefix misses")
    assert (header.a.ttft.p50, header.b.ttft.p50) == (250.0, 110.0)
    assert header.ttft_ratios()[0] == pytest.approx(250 / 110)
    assert header.ttft_ratios()[1] == pytest.approx(295 / 119)
    assert reorder.recovered_tokens == 600 and reorder.shares()[1].value == pytest.approx(600 / 700)
    assert reorder.ttft_ratios() == (4.0, 4.0)
    total = c.total
    assert total.recovered_tokens == 1350 and total.shares()[1].denominator == 1600
    assert (total.a.ttft.p50, total.b.ttft.p50) == (300.0, 100.0)
    assert total.ttft_ratios()[1] == pytest.approx(390 / 118)


def test_compare_outputs_and_errors(runs_db):
    runner = CliRunner()
    out = runner.invoke(report_command, ["--db", str(runs_db), "--compare", "stock", "pic",
                                         "--format", "csv"])
    assert out.exit_code == 0, out.output
    rows = {r["family"]: r for r in csv.DictReader(io.StringIO(out.output))}
    assert list(rows) == ["header", "reorder", "(all)"]
    assert float(rows["(all)"]["recovered_share_of_misses_a"]) == 1350 / 1600
    assert float(rows["reorder"]["ttft_p50_ratio_a_over_b"]) == 4.0

    out = runner.invoke(report_command, ["--db", str(runs_db), "--compare", "stock", "pic"])
    assert "rec/misses A = recovered / run A's exact-prefix misses" in out.output
    assert "note:" not in out.output

    out = runner.invoke(report_command, ["--db", str(runs_db), "--compare", "stock", "blend"])
    assert out.exit_code == 1
    assert "unknown run 'blend'; runs in the log: pic, stock" in out.output

    with SavingsLog(runs_db) as log:  # one more request in B only: the prompts now differ
        log.write([make_row(source="replay", run="pic", family="header", **counts(500, 0))])
    out = runner.invoke(report_command, ["--db", str(runs_db), "--compare", "stock", "pic"])
    assert "note: family header: prompt tokens differ between the runs (A 2,000, B 2,500)" in (
        out.output)


def test_cli_errors_name_the_problem(tmp_path, proxy_db):
    runner = CliRunner()
    out = runner.invoke(report_command, ["--db", str(tmp_path / "nope.db")])
    assert out.exit_code == 1 and "no savings database at" in out.output
    assert not (tmp_path / "nope.db").exists()
    out = runner.invoke(report_command, ["--db", str(proxy_db), "--since", "soon"])
    assert out.exit_code == 1 and "--since 'soon'" in out.output
    out = runner.invoke(report_command, ["--db", str(proxy_db), "--by", "colour"])
    assert out.exit_code == 2 and "--by" in out.output
    (tmp_path / "junk.db").write_bytes(b"not a database at all, just some bytes" * 100)
    out = runner.invoke(report_command, ["--db", str(tmp_path / "junk.db")])
    assert out.exit_code == 1 and "cannot read" in out.output


def test_empty_log_reports_zeros_without_dividing_by_zero(tmp_path):
    SavingsLog(tmp_path / "empty.db").close()
    out = CliRunner().invoke(report_command, ["--db", str(tmp_path / "empty.db")])
    assert out.exit_code == 0, out.output
    assert "content-reused tokens: 0 (no prompt tokens)" in out.output


def test_report_reads_while_a_write_transaction_is_open(proxy_db):
    with SavingsLog(proxy_db) as writer:
        writer.db.conn.execute("BEGIN IMMEDIATE")
        writer.db["requests"].insert(make_row(session="late").to_record())
        assert build_report(proxy_db).totals.requests == 6  # the open write is not seen
        writer.db.conn.execute("COMMIT")
    assert build_report(proxy_db).totals.requests == 7


def test_report_is_a_consistent_snapshot_while_the_writer_thread_writes(tmp_path):
    path = tmp_path / "live.db"
    writer = SavingsWriter(path, WriterConfig(batch_size=7, flush_interval_s=0.01))
    seen: list[int] = []
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set() and i < 20_000:
            writer.submit(make_row(session=f"s{i % 5}", turn=i))
            i += 1
            if i % 7 == 0:
                writer.flush_sync(timeout=10)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        deadline = time.monotonic() + 20
        while len(set(seen)) < 6 and time.monotonic() < deadline:
            r = build_report(path)
            # one snapshot: the groups add up to the totals, whatever was committed meanwhile
            assert sum(g.totals.requests for g in r.groups) == r.totals.requests
            assert sum(g.totals.prompt_tokens for g in r.groups) == r.totals.prompt_tokens
            assert not seen or r.totals.requests >= seen[-1]
            seen.append(r.totals.requests)
    finally:
        stop.set()
        producer.join()
    writer.close_sync()
    assert len({n for n in seen if n > 0}) >= 5, seen  # it read between several writes
    assert build_report(path).totals.requests == writer.stats.written == writer.stats.submitted
