"""The savings log: one SQLite row per request the proxy (or a replay, or an audit) served.

``SavingsLog`` opens the database (WAL, so ``irminsul report`` reads while the proxy writes) and
applies pending migrations; ``SavingsWriter`` takes rows from the event loop and writes them in
batches from a background thread, one transaction per batch.

Token counters follow the engine's accounting (engine_adapter.contract.ReuseCounts): exact
prefix, content-reused, recomputed and new are disjoint and add up to the prompt. A counter the
upstream did not report stays NULL; nothing is estimated to fill it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import queue
import re
import sqlite3
import threading
import time as _time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from sqlite_utils import Database

from irminsul.engine_adapter.contract import ReuseCounts
from irminsul.proxy.audits import AuditRow
from irminsul.proxy.migrations import migrate

log = logging.getLogger(__name__)

SOURCES = ("proxy", "replay", "audit")
UPSTREAM_MODES = ("stock", "irminsul", "embedded")
PART_FIELDS = ("exact_prefix_tokens", "reused_tokens", "recomputed_tokens", "new_tokens")
COUNT_FIELDS = (
    "id", "turn", "prompt_tokens", *PART_FIELDS, "potential_reuse_tokens", "chunks_total",
    "chunks_hit", "completion_tokens", "diverge_offset", "diverge_message",
)  # fmt: skip
FLOAT_FIELDS = ("ttft_ms", "total_ms", "flops_saved", "energy_saved_j")
ERROR_MAX_CHARS = 300
_TENANT_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, kw_only=True)
class RequestRow:
    """One request. Checked on construction: a row that exists is consistent.

    ``time``/``epoch`` default to now (either one given fills the other). ``tenant`` must be a
    ``tenant_hash()`` digest, so an API key cannot be logged by mistake. ``error`` is cut to
    ``ERROR_MAX_CHARS``.
    """

    table: ClassVar[str] = "requests"

    session: str
    model: str
    endpoint: str
    upstream_mode: str
    id: int | None = None  # assigned by SQLite on insert
    source: str = "proxy"
    time: str | None = None
    epoch: float | None = None
    run: str | None = None
    family: str | None = None
    turn: int | None = None
    tenant: str | None = None
    stream: bool = False
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    exact_prefix_tokens: int | None = None
    reused_tokens: int | None = None
    recomputed_tokens: int | None = None
    new_tokens: int | None = None
    potential_reuse_tokens: int | None = None
    chunks_total: int | None = None
    chunks_hit: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    diverge_offset: int | None = None
    diverge_message: int | None = None
    miss_cause: str | None = None
    miss_detail: str | None = None
    flops_saved: float | None = None
    energy_saved_j: float | None = None
    policy: str | None = None
    prompt: str | None = None

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: fill the derived fields once, here
        self._fill_time()
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.upstream_mode not in UPSTREAM_MODES:
            raise ValueError(f"upstream_mode must be one of {UPSTREAM_MODES}, got "
                             f"{self.upstream_mode!r}")
        if not self.session:
            raise ValueError("session must be a non-empty string")
        if self.tenant is not None and not _TENANT_RE.fullmatch(self.tenant):
            raise ValueError("tenant must be a tenant_hash() digest (32 hex), never a raw key")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status, got {self.status}")
        if self.error is not None and len(self.error) > ERROR_MAX_CHARS:
            set_(self, "error", self.error[: ERROR_MAX_CHARS - 1] + "…")
        for name in COUNT_FIELDS:  # numpy integers become ints: sqlite3 cannot bind them
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer or None, got {v!r}")
            set_(self, name, int(v))
        for name in FLOAT_FIELDS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number or None, got {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
            set_(self, name, float(v))
        self._check_counts()

    def _fill_time(self) -> None:
        # Stored as UTC ISO 8601 (the report's --by day takes its first 10 characters) plus
        # the epoch (what --since compares).
        if self.time is None:
            t = (datetime.now(timezone.utc) if self.epoch is None
                 else datetime.fromtimestamp(self.epoch, timezone.utc))
        else:
            t = datetime.fromisoformat(self.time)
            if t.tzinfo is None:
                raise ValueError(f"time must carry a UTC offset, got {self.time!r}")
            if self.epoch is not None and abs(t.timestamp() - self.epoch) > 0.002:
                raise ValueError(f"time {self.time!r} and epoch {self.epoch} disagree")
        utc = t.astimezone(timezone.utc).isoformat(timespec="milliseconds")
        object.__setattr__(self, "time", utc)
        if self.epoch is None:
            object.__setattr__(self, "epoch", t.timestamp())

    def _check_counts(self) -> None:
        parts = [getattr(self, n) for n in PART_FIELDS]
        known = sum(p for p in parts if p is not None)
        prompt = self.prompt_tokens
        if prompt is not None:
            if None not in parts and known != prompt:
                raise ValueError(f"token counts do not add up: exact + reused + recomputed + new"
                                 f" = {known} != prompt_tokens {prompt}")
            if known > prompt:
                raise ValueError(f"token counts exceed the prompt: {known} > {prompt}")
            if self.potential_reuse_tokens is not None and self.potential_reuse_tokens > prompt:
                raise ValueError("potential_reuse_tokens exceeds prompt_tokens")
        if self.chunks_total is not None and (self.chunks_hit or 0) > self.chunks_total:
            raise ValueError(f"chunks_hit {self.chunks_hit} > chunks_total {self.chunks_total}")

    def to_record(self) -> dict[str, Any]:
        """The row as the ``requests`` table stores it (``id`` None: SQLite assigns one)."""
        d = asdict(self)
        d["stream"] = int(bool(self.stream))
        return d

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RequestRow:
        """A row read back from the ``requests`` table (columns added later are ignored)."""
        values = {k: record[k] for k in ROW_COLUMNS if k in record}
        values["stream"] = bool(values.get("stream", False))
        return cls(**values)


def counts_fields(counts: ReuseCounts | None) -> dict[str, Any]:
    """RequestRow keyword arguments for an engine's ReuseCounts (empty for None)."""
    if counts is None:
        return {}
    return {
        "prompt_tokens": counts.prompt_tokens,
        "exact_prefix_tokens": counts.exact_prefix_tokens,
        "reused_tokens": counts.reused_tokens,
        "recomputed_tokens": counts.recomputed_tokens,
        "new_tokens": counts.new_tokens,
        "chunks_total": counts.chunks_total,
        "chunks_hit": counts.chunks_hit,
        "policy": counts.policy or None,
    }


ROW_COLUMNS = tuple(f.name for f in fields(RequestRow))  # the table's columns, id included


class SavingsLog:
    """A savings database file: WAL mode, migrated on open. Not thread-safe: one user at a time.

    ``create=False`` opens only an existing savings database: FileNotFoundError for a missing
    file, ValueError for a file that is some other database (it is then left untouched).
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no savings database at {self.path}")
        # check_same_thread=False: a SavingsWriter opens the log in the caller's thread (so that
        # a bad path fails there) and then uses it only from its own thread.
        conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        try:
            self.db = Database(conn)
            if not create and "_migrations" not in self.db.table_names():
                raise ValueError(f"{self.path} is not an Irminsul savings database")
            self.db.enable_wal()
            # NORMAL is durable across process crashes in WAL mode; only an OS crash or power
            # loss can drop the last transactions, acceptable for a log and much faster.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.applied = migrate(self.db)
        except BaseException:
            conn.close()
            raise

    def write(self, rows: Sequence[RequestRow | AuditRow]) -> None:
        """Insert ``rows`` (each into its type's table) in one transaction: all of them, or
        none if any fails."""
        if not rows:
            return
        tables: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            tables.setdefault(r.table, []).append(r.to_record())
        # BEGIN IMMEDIATE takes the write lock first (waiting out the busy timeout). A deferred
        # BEGIN would read the schema under a snapshot, then fail at once with "database is
        # locked" if another process (a proxy and a replay share one log) committed meanwhile.
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, records in tables.items():
                self.db[table].insert_all(records, batch_size=200)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def count(self) -> int:
        """Number of rows in the log."""
        return self.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class WriterConfig:
    batch_size: int = 256  # rows per transaction at most
    flush_interval_s: float = 0.2  # how long a submitted row may wait for its batch to fill
    max_queue: int = 100_000  # rows held in memory while the disk lags; beyond, rows are dropped

    def __post_init__(self):
        if self.batch_size < 1 or self.max_queue < 1:
            raise ValueError("batch_size and max_queue must be >= 1")
        if not self.flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {self.flush_interval_s}")


class WriterStats(NamedTuple):
    submitted: int
    written: int
    batches: int
    failed: int  # rows in batches whose transaction failed (logged, not retried)
    dropped: int  # rows refused because the queue was full


_STOP = object()


ROW_TYPES = (RequestRow, AuditRow)  # what a SavingsWriter takes


class SavingsWriter:
    """Writes RequestRows (and the engine's AuditRows) from a background thread in batches; ``submit`` never blocks.

    A batch is written when it holds ``batch_size`` rows or its first row has waited
    ``flush_interval_s``. A failed batch is logged and counted, and the writer goes on.
    Pass a path (the writer opens and closes its own SavingsLog) or a SavingsLog that nothing
    else uses meanwhile.
    """

    def __init__(self, log_or_path: SavingsLog | str | Path, config: WriterConfig = WriterConfig()):
        self.config = config
        self._owns_log = not isinstance(log_or_path, SavingsLog)
        self.log = SavingsLog(log_or_path) if self._owns_log else log_or_path
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self._lock = threading.Lock()
        self._counts = {"submitted": 0, "written": 0, "batches": 0, "failed": 0, "dropped": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="irminsul-savings", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(**self._counts)

    def submit(self, row: RequestRow | AuditRow) -> None:
        """Queue ``row`` for writing (thread-safe, non-blocking). Raises after close()."""
        if not isinstance(row, ROW_TYPES):
            raise TypeError(f"expected a RequestRow or AuditRow, got {type(row).__name__}")
        with self._lock:
            if self._closed:
                raise RuntimeError("SavingsWriter is closed")
            self._counts["submitted"] += 1
            try:
                self._queue.put_nowait(row)
            except queue.Full:
                self._counts["dropped"] += 1
                dropped = self._counts["dropped"]
            else:
                return
        if dropped == 1 or dropped % 1000 == 0:
            log.error("savings log queue full (%d rows): %d rows dropped so far",
                      self.config.max_queue, dropped)

    def flush_sync(self, timeout: float | None = None) -> bool:
        """Block until every row submitted before this call is written (or failed)."""
        with self._lock:
            if self._closed:
                return True  # close_sync() wrote everything
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    async def flush(self) -> None:
        """Await flush_sync() without blocking the event loop."""
        await asyncio.to_thread(self.flush_sync)

    def close_sync(self) -> None:
        """Write everything submitted, stop the thread, close an owned log. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)  # blocks if full: the thread is draining it
        self._thread.join()
        if self._owns_log:
            self.log.close()

    async def close(self) -> None:
        """close_sync() from the event loop."""
        await asyncio.to_thread(self.close_sync)

    def _run(self) -> None:
        batch: list[RequestRow | AuditRow] = []
        deadline = 0.0
        while True:
            timeout = max(0.0, deadline - _time.monotonic()) if batch else None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None  # the oldest row waited flush_interval_s
            if isinstance(item, ROW_TYPES):
                if not batch:
                    deadline = _time.monotonic() + self.config.flush_interval_s
                batch.append(item)
                if len(batch) < self.config.batch_size and _time.monotonic() < deadline:
                    continue
            self._write(batch)
            batch = []
            if isinstance(item, threading.Event):
                item.set()
            elif item is _STOP:
                return

    def _write(self, batch: list[RequestRow | AuditRow]) -> None:
        if not batch:
            return
        try:
            self.log.write(batch)
        except Exception:
            log.exception("savings log: could not write a batch of %d rows", len(batch))
            with self._lock:
                self._counts["failed"] += len(batch)
        else:
            with self._lock:
                self._counts["written"] += len(batch)
                self._counts["batches"] += 1
