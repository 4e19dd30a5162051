"""`irminsul report --compare A B --plot FILE`: the figures it draws, the PNG it writes, and
its errors (no --compare, no matplotlib, an unknown run)."""

import pytest
from click.testing import CliRunner
from support.savings import make_row

from irminsul.proxy.report import ReportError, report_command
from irminsul.proxy.report_plot import INSTALL_HINT, read_plot_data
from irminsul.proxy.savings import SavingsLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def replay_row(run, session, turn, prompt, exact, reused, ttft, **kw):
    recomputed = 10 if reused else 0
    return make_row(source="replay", run=run, family="header", session=session, turn=turn,
                    ttft_ms=ttft, prompt_tokens=prompt, exact_prefix_tokens=exact,
                    reused_tokens=reused, recomputed_tokens=recomputed,
                    new_tokens=prompt - exact - reused - recomputed, **kw)


@pytest.fixture
def two_runs(tmp_path):
    """Two sessions of three turns, replayed once with a prefix cache, once with pic."""
    rows = []
    for s in ("s1", "s2"):
        rows += [replay_row("prefix", s, 0, 1000, 0, 0, 900.0),
                 replay_row("prefix", s, 1, 1100, 10, 0, 950.0),
                 replay_row("prefix", s, 2, 1200, 10, 0, 1000.0),
                 replay_row("pic", s, 0, 1000, 0, 0, 880.0),
                 replay_row("pic", s, 1, 1100, 10, 900, 150.0),
                 replay_row("pic", s, 2, 1200, 10, 1000, 170.0)]
    # counters unknown: left out of the token sums, its TTFT still counts
    rows.append(make_row(source="replay", run="pic", session="s3", turn=1, ttft_ms=50.0,
                         **dict.fromkeys(("prompt_tokens", "exact_prefix_tokens", "reused_tokens",
                                          "recomputed_tokens", "new_tokens"))))
    rows.append(replay_row("other", "s1", 0, 10, 0, 0, 1.0))  # another run: never read
    path = tmp_path / "runs.db"
    with SavingsLog(path) as log:
        log.write(rows)
    return path


def test_plot_data_sums_per_turn(two_runs):
    d = read_plot_data(two_runs, "prefix", "pic")
    assert [t.turn for t in d.turns] == [0, 1, 2]
    assert [tuple(t.a) for t in d.turns] == [(2, 2000, 0, 0), (2, 2200, 20, 0),
                                             (2, 2400, 20, 0)]
    assert [tuple(t.b) for t in d.turns] == [(2, 2000, 0, 0), (2, 2200, 20, 1800),
                                             (2, 2400, 20, 2000)]
    assert [t.recovered_tokens for t in d.turns] == [0, 1800, 2000]
    assert d.ttft_a == (900.0, 900.0, 950.0, 950.0, 1000.0, 1000.0)
    assert d.ttft_b == (50.0, 150.0, 150.0, 170.0, 170.0, 880.0, 880.0)
    with pytest.raises(ReportError, match="unknown run 'blend'"):
        read_plot_data(two_runs, "prefix", "blend")


def test_plot_writes_a_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp.png"
    res = CliRunner().invoke(report_command, ["--db", str(two_runs), "--compare", "prefix",
                                              "pic", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert "prefix" in res.stdout and "pic" in res.stdout  # the table is still printed
    assert f"plot written to {out}" in res.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # two drawn panels with text, not an empty canvas


def test_plot_needs_compare(two_runs, tmp_path):
    out = tmp_path / "cmp.png"
    res = CliRunner().invoke(report_command, ["--db", str(two_runs), "--plot", str(out)])
    assert res.exit_code == 2 and "--compare RUN_A RUN_B" in res.output
    assert not out.exists()


def test_missing_matplotlib_names_the_extra(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import now fails
    out = tmp_path / "cmp.png"
    res = CliRunner().invoke(report_command, ["--db", str(two_runs), "--compare", "prefix",
                                              "pic", "--plot", str(out)])
    assert res.exit_code == 1
    assert "needs matplotlib" in res.output and INSTALL_HINT in res.output
    assert not out.exists()


def test_plot_errors_name_the_problem(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    res = runner.invoke(report_command, ["--db", str(two_runs), "--compare", "prefix", "blend",
                                         "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "unknown run 'blend'" in res.output
    bad = tmp_path / "missing-dir" / "x.png"
    res = runner.invoke(report_command, ["--db", str(two_runs), "--compare", "prefix", "pic",
                                         "--plot", str(bad)])
    assert res.exit_code == 1 and f"cannot write the plot to {bad}" in res.output
