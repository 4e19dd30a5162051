"""Numbered schema migrations of the savings database, applied in order, each exactly once.

A ``_migrations`` table records the name of every migration applied. New migrations are
appended to ``MIGRATIONS`` (never edited or reordered once released), so a database written by
an older Irminsul is brought up to date when a newer one opens it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from sqlite_utils import Database

MIGRATIONS: list[Callable[[Database], None]] = []


def migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    """Append ``fn`` to the ordered list of migrations; its name is its identity."""
    if any(m.__name__ == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"duplicate migration name {fn.__name__}")
    MIGRATIONS.append(fn)
    return fn


def applied_migrations(db: Database) -> list[str]:
    """Names of the migrations already applied to ``db``, oldest first."""
    if "_migrations" not in db.table_names():
        return []
    return [r["name"] for r in db.query("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(db: Database) -> list[str]:
    """Apply every pending migration in one write transaction; returns the names applied.

    The pending list is read again after taking the write lock (BEGIN IMMEDIATE), so two
    processes opening a new database at once cannot both apply a migration.
    """
    done = set(applied_migrations(db))
    if all(m.__name__ in done for m in MIGRATIONS):
        return []
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
        done = set(applied_migrations(db))
        applied = []
        for m in MIGRATIONS:
            if m.__name__ in done:
                continue
            m(db)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (m.__name__, datetime.now(timezone.utc).isoformat(timespec="seconds")),
            )
            applied.append(m.__name__)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


@migration
def m001_requests(db: Database) -> None:
    # Written as SQL rather than through Table.create() for the CHECK constraints: a row that
    # breaks them fails its whole batch instead of landing half-valid in the log.
    db.execute(
        """
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            epoch REAL NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('proxy', 'replay', 'audit')),
            run TEXT,
            family TEXT,
            turn INTEGER,
            session TEXT NOT NULL,
            tenant TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            upstream_mode TEXT NOT NULL CHECK (upstream_mode IN ('stock', 'irminsul', 'embedded')),
            stream INTEGER NOT NULL CHECK (stream IN (0, 1)),
            status INTEGER,
            error TEXT,
            prompt_tokens INTEGER,
            exact_prefix_tokens INTEGER,
            reused_tokens INTEGER,
            recomputed_tokens INTEGER,
            new_tokens INTEGER,
            potential_reuse_tokens INTEGER,
            chunks_total INTEGER,
            chunks_hit INTEGER,
            completion_tokens INTEGER,
            ttft_ms REAL,
            total_ms REAL,
            diverge_offset INTEGER,
            diverge_message INTEGER,
            miss_cause TEXT,
            miss_detail TEXT,
            flops_saved REAL,
            energy_saved_j REAL,
            policy TEXT,
            prompt TEXT,
            CHECK (prompt_tokens IS NULL OR exact_prefix_tokens IS NULL OR reused_tokens IS NULL
                   OR recomputed_tokens IS NULL OR new_tokens IS NULL
                   OR exact_prefix_tokens + reused_tokens + recomputed_tokens + new_tokens
                      = prompt_tokens)
        )
        """
    )


@migration
def m002_request_indexes(db: Database) -> None:
    # The report filters by time and groups by run/family, session and model.
    db.execute("CREATE INDEX idx_requests_epoch ON requests (epoch)")
    db.execute("CREATE INDEX idx_requests_run_family ON requests (run, family)")
    db.execute("CREATE INDEX idx_requests_session ON requests (session)")
    db.execute("CREATE INDEX idx_requests_model ON requests (model)")


@migration
def m003_audits(db: Database) -> None:
    # The engine's quality audits (proxy/audits.py): a served request re-run with `full`.
    db.execute(
        """
        CREATE TABLE audits (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            epoch REAL NOT NULL,
            request_id TEXT NOT NULL,
            model TEXT NOT NULL,
            policy TEXT NOT NULL,
            args TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            exact_prefix_tokens INTEGER NOT NULL,
            reused_tokens INTEGER NOT NULL,
            recomputed_tokens INTEGER NOT NULL,
            new_tokens INTEGER NOT NULL,
            compared_tokens INTEGER NOT NULL CHECK (compared_tokens >= 1),
            kl REAL NOT NULL CHECK (kl >= 0),
            agreement REAL NOT NULL CHECK (agreement BETWEEN 0 AND 1),
            verdict TEXT NOT NULL CHECK (verdict IN ('pass', 'fail', 'fallback')),
            audit_ms REAL NOT NULL,
            CHECK (exact_prefix_tokens + reused_tokens + recomputed_tokens + new_tokens
                   = prompt_tokens)
        )
        """
    )
    db.execute("CREATE INDEX idx_audits_epoch ON audits (epoch)")
