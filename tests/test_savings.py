"""The savings log: row checks, migrations, atomic writes, and the batching writer thread."""

import dataclasses
import logging
import sqlite3
import threading
import time
from datetime import datetime

import numpy as np
import pytest
import sqlite_utils
from support.savings import make_row, wait_until

from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.proxy import migrations
from irminsul.proxy.identity import tenant_hash
from irminsul.proxy.savings import (
    ROW_COLUMNS,
    RequestRow,
    SavingsLog,
    SavingsWriter,
    WriterConfig,
    counts_fields,
)


def rows_in(path):
    return list(sqlite_utils.Database(path).query("SELECT * FROM requests ORDER BY id"))


# ---- RequestRow ----------------------------------------------------------------------------


def test_time_and_epoch_fill_each_other():
    r = make_row(epoch=1_700_000_000.25)
    assert r.time == "2023-11-14T22:13:20.250+00:00"
    r2 = make_row(time="2023-11-14T22:13:20.250+00:00")
    assert r2.epoch == pytest.approx(1_700_000_000.25)
    now = make_row()
    assert datetime.fromisoformat(now.time).timestamp() == pytest.approx(now.epoch, abs=1e-3)
    with pytest.raises(ValueError, match="UTC offset"):
        make_row(time="2023-11-14T22:13:20")
    paris = make_row(time="2023-11-14T23:13:20.250+01:00")  # stored in UTC
    assert (paris.time, paris.epoch) == (r.time, r.epoch)
    with pytest.raises(ValueError, match="disagree"):
        make_row(time=r.time, epoch=r.epoch + 60)


def test_token_counts_must_add_up_when_all_known():
    with pytest.raises(ValueError, match="do not add up"):
        make_row(prompt_tokens=100, new_tokens=21)
    with pytest.raises(ValueError, match="exceed the prompt"):
        make_row(prompt_tokens=50, exact_prefix_tokens=60, reused_tokens=None,
                 recomputed_tokens=None, new_tokens=None)
    # Unknown parts stay NULL: a stock upstream reports only the exact prefix.
    r = make_row(exact_prefix_tokens=40, reused_tokens=None, recomputed_tokens=None,
                 new_tokens=None)
    assert (r.reused_tokens, r.new_tokens) == (None, None)
    with pytest.raises(ValueError, match="potential_reuse_tokens"):
        make_row(potential_reuse_tokens=101)
    with pytest.raises(ValueError, match="chunks_hit"):
        make_row(chunks_total=2, chunks_hit=3)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("source", "web", "source"),
        ("upstream_mode", "sglang", "upstream_mode"),
        ("status", 42, "HTTP status"),
        ("session", "", "session"),
        ("turn", -1, "turn"),
        ("prompt_tokens", 100.0, "prompt_tokens"),
        ("chunks_total", True, "chunks_total"),
        ("ttft_ms", float("nan"), "ttft_ms"),
        ("total_ms", -3.0, "total_ms"),
    ],
)
def test_row_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        make_row(**{field: value})


def test_tenant_must_be_a_digest_not_a_key():
    with pytest.raises(ValueError, match="never a raw key"):
        make_row(tenant="sk-live-0123456789abcdef")
    assert make_row(tenant=tenant_hash("sk-live-0123456789abcdef")).tenant is not None


def test_numpy_counts_become_ints_and_errors_are_cut(tmp_path):
    r = make_row(prompt_tokens=np.int64(100), exact_prefix_tokens=np.int32(40),
                 ttft_ms=np.float32(12.5), error="x" * 1000)
    assert type(r.prompt_tokens) is int and type(r.ttft_ms) is float
    assert len(r.error) == 300
    with SavingsLog(tmp_path / "s.db") as log:
        log.write([r])
    assert rows_in(tmp_path / "s.db")[0]["prompt_tokens"] == 100


def test_counts_fields_maps_reuse_counts():
    counts = ReuseCounts(prompt_tokens=10, exact_prefix_tokens=4, reused_tokens=3,
                         recomputed_tokens=1, new_tokens=2, chunks_total=5, chunks_hit=2,
                         policy="pic")
    r = make_row(**counts_fields(counts))
    assert (r.prompt_tokens, r.exact_prefix_tokens, r.reused_tokens, r.recomputed_tokens,
            r.new_tokens, r.chunks_total, r.chunks_hit, r.policy) == (10, 4, 3, 1, 2, 5, 2, "pic")
    assert counts_fields(None) == {}


# ---- SavingsLog ----------------------------------------------------------------------------


def test_migrations_run_once_and_reopening_is_idempotent(tmp_path):
    path = tmp_path / "s.db"
    names = [m.__name__ for m in migrations.MIGRATIONS]
    with SavingsLog(path) as log:
        assert log.applied == names
        assert log.db.journal_mode == "wal"
        assert set(log.db["requests"].columns_dict) == set(ROW_COLUMNS)
        log.write([make_row()])
    with SavingsLog(path) as log:
        assert log.applied == []
        assert migrations.applied_migrations(log.db) == names
        assert log.count() == 1


def test_a_migration_added_later_is_applied_once(tmp_path, monkeypatch):
    path = tmp_path / "s.db"
    SavingsLog(path).close()
    calls = []

    def m999_add_notes(db):
        calls.append(1)
        db.execute("ALTER TABLE requests ADD COLUMN note TEXT")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, m999_add_notes])
    with SavingsLog(path) as log:
        assert log.applied == ["m999_add_notes"]
        assert "note" in log.db["requests"].columns_dict
    SavingsLog(path).close()
    assert calls == [1]


def test_a_failing_migration_leaves_nothing_behind(tmp_path, monkeypatch):
    def m999_broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, m999_broken])
    with pytest.raises(RuntimeError, match="boom"):
        SavingsLog(tmp_path / "s.db")
    db = sqlite_utils.Database(tmp_path / "s.db")
    assert "half_done" not in db.table_names() and "requests" not in db.table_names()


def test_write_round_trips_every_field(tmp_path):
    row = make_row(source="replay", run="r1", family="header", turn=3, stream=True,
                   tenant=tenant_hash("k"), error="upstream timeout", potential_reuse_tokens=7,
                   chunks_total=4, chunks_hit=2, completion_tokens=9, ttft_ms=12.5,
                   total_ms=80.0, diverge_offset=12, diverge_message=0,
                   miss_cause="system_changed", miss_detail="header", flops_saved=1e12,
                   energy_saved_j=1.75, policy="pic", prompt="hello")
    with SavingsLog(tmp_path / "s.db") as log:
        log.write([row])
    (stored,) = rows_in(tmp_path / "s.db")
    assert stored == {**row.to_record(), "id": 1, "stream": 1}
    assert RequestRow.from_record(stored) == dataclasses.replace(row, id=1)


def test_write_is_all_or_nothing(tmp_path):
    bad = make_row(session="bad")
    object.__setattr__(bad, "source", "web")  # past the dataclass check: the SQL CHECK refuses
    with SavingsLog(tmp_path / "s.db") as log:
        with pytest.raises(sqlite3.IntegrityError):
            log.write([make_row(), bad, make_row()])
        assert log.count() == 0
        inconsistent = make_row()
        object.__setattr__(inconsistent, "new_tokens", 999)
        with pytest.raises(sqlite3.IntegrityError):
            log.write([inconsistent])
        log.write([make_row(), make_row()])
        assert log.count() == 2


def test_open_existing_only(tmp_path):
    with pytest.raises(FileNotFoundError):
        SavingsLog(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    other = tmp_path / "other.db"
    sqlite_utils.Database(other)["t"].insert({"x": 1})
    with pytest.raises(ValueError, match="not an Irminsul savings database"):
        SavingsLog(other, create=False)
    assert sqlite_utils.Database(other).table_names() == ["t"]


# ---- SavingsWriter -------------------------------------------------------------------------


async def test_writer_batches_by_size_and_close_flushes(tmp_path):
    writer = SavingsWriter(tmp_path / "s.db", WriterConfig(batch_size=10, flush_interval_s=60))
    for i in range(25):
        writer.submit(make_row(turn=i))
    wait_until(lambda: writer.stats.written == 20)
    assert writer.stats.batches == 2  # the last 5 wait for a full batch or 60 s
    start = time.monotonic()
    await writer.close()
    assert time.monotonic() - start < 30  # close() wrote them without waiting out the 60 s
    assert writer.stats == (25, 25, 3, 0, 0)
    assert [r["turn"] for r in rows_in(tmp_path / "s.db")] == list(range(25))


async def test_writer_flushes_a_partial_batch_after_the_interval(tmp_path):
    writer = SavingsWriter(tmp_path / "s.db", WriterConfig(batch_size=1000, flush_interval_s=0.2))
    try:
        for i in range(3):
            writer.submit(make_row(turn=i))
        took = wait_until(lambda: writer.stats.written == 3)
        assert took < 5  # well before close(): the timer, not the batch size, flushed it
        assert writer.stats.batches == 1
        with SavingsLog(tmp_path / "s.db") as reader:  # another connection sees the rows
            assert reader.count() == 3
    finally:
        await writer.close()


async def test_writer_loses_nothing_under_concurrent_submits(tmp_path):
    writer = SavingsWriter(tmp_path / "s.db", WriterConfig(batch_size=64, flush_interval_s=0.05))
    n_threads, per_thread = 6, 250

    def submit_many(t):
        for i in range(per_thread):
            writer.submit(make_row(session=f"t{t}", turn=i))

    threads = [threading.Thread(target=submit_many, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for i in range(per_thread):  # the event loop submits too
        writer.submit(make_row(session="loop", turn=i))
    for th in threads:
        th.join()
    await writer.close()
    total = (n_threads + 1) * per_thread
    assert writer.stats.written == total and writer.stats.failed == 0
    seen = {(r["session"], r["turn"]) for r in rows_in(tmp_path / "s.db")}
    assert len(seen) == total == len(rows_in(tmp_path / "s.db"))


async def test_a_failed_batch_is_logged_and_the_writer_goes_on(tmp_path, caplog):
    log = SavingsLog(tmp_path / "s.db")
    real_write, calls = log.write, []

    def flaky_write(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_write(rows)

    log.write = flaky_write
    writer = SavingsWriter(log, WriterConfig(batch_size=5, flush_interval_s=60))
    with caplog.at_level(logging.ERROR, logger="irminsul.proxy.savings"):
        for i in range(5):
            writer.submit(make_row(turn=i))
        assert writer.flush_sync(timeout=10)
        for i in range(5, 8):
            writer.submit(make_row(turn=i))
        await writer.close()
    assert "could not write a batch of 5 rows" in caplog.text
    assert writer.stats.failed == 5 and writer.stats.written == 3
    log.close()
    assert [r["turn"] for r in rows_in(tmp_path / "s.db")] == [5, 6, 7]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(make_row())


async def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    log = SavingsLog(tmp_path / "s.db")
    entered, release = threading.Event(), threading.Event()
    real_write = log.write

    def slow_write(rows):
        entered.set()
        release.wait(10)
        real_write(rows)

    log.write = slow_write
    writer = SavingsWriter(log, WriterConfig(batch_size=1, max_queue=3))
    writer.submit(make_row(turn=0))
    assert entered.wait(10)  # the thread holds row 0; the queue is empty again
    for i in range(1, 5):
        writer.submit(make_row(turn=i))  # rows 1-3 fit, row 4 is dropped
    assert writer.stats.dropped == 1
    release.set()
    await writer.close()
    log.close()
    assert writer.stats == (5, 4, 4, 0, 1)
    assert [r["turn"] for r in rows_in(tmp_path / "s.db")] == [0, 1, 2, 3]


def test_two_processes_write_one_log_without_losing_rows(tmp_path):
    # A proxy and `irminsul replay` log to the same file from two processes at once.
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "shared.db"
    SavingsLog(path).close()
    script = textwrap.dedent(f"""
        from irminsul.proxy.savings import SavingsLog, RequestRow
        log = SavingsLog({str(path)!r})
        for i in range(150):
            log.write([RequestRow(source="proxy", session=f"s{{i}}", model="m",
                                  endpoint="/v1/chat/completions", upstream_mode="stock",
                                  status=200)])
        log.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
             for _ in range(3)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with SavingsLog(path) as log:
        assert log.count() == 450
