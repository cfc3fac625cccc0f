"""The job database's schema: its tables, indexes and migrations, versioned with `PRAGMA user_version`.

MIGRATIONS[i] brings a database from version i to i + 1; gpujobd.daemon.store runs each in one
transaction and refuses a database written by a newer gpujobd. Released migrations are frozen: change the
schema only by appending a migration (tests/data/state-v1.sqlite3 must keep loading).

Only SQL text and the statements that apply it live here; the store owns the connection (and is the only
module that imports sqlite3), so a migration takes anything with an `execute(sql)` method.
"""

from __future__ import annotations

from typing import Any, Callable, List, Protocol


class Connection(Protocol):
    """What a migration needs of an sqlite3.Connection."""

    def execute(self, sql: str, /) -> Any: ...


_V1_STATEMENTS = (
    """
    CREATE TABLE jobs (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
        user               TEXT    NOT NULL,
        uid                INTEGER NOT NULL,
        gid                INTEGER NOT NULL,
        name               TEXT    NOT NULL DEFAULT '',
        argv               TEXT    NOT NULL,                   -- JSON array of strings
        cwd                TEXT    NOT NULL,
        env                TEXT    NOT NULL DEFAULT '{}',      -- JSON object string -> string
        properties         TEXT    NOT NULL DEFAULT '{}',      -- JSON object string -> string
        timeout_s          REAL,
        state              TEXT    NOT NULL,                   -- JobState value
        unit               TEXT    NOT NULL DEFAULT '',
        pid                INTEGER,
        created_at         REAL    NOT NULL,                   -- seconds since the epoch
        started_at         REAL,
        ended_at           REAL,
        reason             TEXT,                               -- EndReason value; NULL: no outcome yet
        exit_code          INTEGER,
        signal             INTEGER,
        detail             TEXT,
        leftover_processes INTEGER,
        stopped_by         TEXT,
        -- Background loops (a job re-run up to max_runs times, bound to a foreground job): reserved
        -- in v1, read and written from v2 on; per-run records go to the runs table.
        max_runs           INTEGER NOT NULL DEFAULT 1,
        restart_delay_s    REAL,
        stop_on_failure    INTEGER NOT NULL DEFAULT 0,         -- boolean
        bind_to            INTEGER                             -- a job id (no foreign key: pruning
                                                               -- the foreground job must not fail)
    )
    """,
    # The default list view (active jobs + recently ended ones) and the crash reconcile.
    "CREATE INDEX jobs_state ON jobs (state)",
    "CREATE INDEX jobs_ended_at ON jobs (ended_at)",
    # `list --user`; the implicit rowid in the index keeps each user's jobs in id order.
    "CREATE INDEX jobs_user ON jobs (user)",
    """
    CREATE TABLE runs (
        job_id     INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        run        INTEGER NOT NULL,                           -- 1, 2, ... within the job
        started_at REAL,
        ended_at   REAL,
        exit_code  INTEGER,
        signal     INTEGER,
        reason     TEXT,                                       -- EndReason value
        detail     TEXT,
        PRIMARY KEY (job_id, run)
    )
    """,
)


def _migrate_to_v1(conn: Connection) -> None:
    for statement in _V1_STATEMENTS:
        conn.execute(statement)


def _migrate_to_v2(conn: Connection) -> None:
    """Background loops: whether a job is one (its loop columns were reserved in v1)."""
    conn.execute("ALTER TABLE jobs ADD COLUMN background INTEGER NOT NULL DEFAULT 0")


_V3_COLUMNS = (
    "gpus_requested INTEGER NOT NULL DEFAULT 0",  # --gpus N
    "priority INTEGER NOT NULL DEFAULT 0",
    "after_ok TEXT NOT NULL DEFAULT '[]'",  # JSON array of job ids (--after)
    "after_any TEXT NOT NULL DEFAULT '[]'",  # JSON array of job ids (--after-any)
    "array_spec TEXT NOT NULL DEFAULT ''",  # --array as given (its %K is the array's limit)
    "stagger_s REAL",
    "array_id INTEGER",  # the first task's id; NULL: not in an array
    "array_index INTEGER",
    "gpus TEXT NOT NULL DEFAULT '[]'",  # JSON array of the allocated GPUs' UUIDs
    "resubmit_of INTEGER",  # the job this one is a resubmission of
    "gpu_check TEXT",  # off, refuse or wait: a queued job waits for strays again after a restart
)


def _migrate_to_v3(conn: Connection) -> None:
    """Scheduling: requested and allocated GPUs, priority, dependencies, arrays, resubmissions, and
    the daemon's settings that must survive it (drain)."""
    for column in _V3_COLUMNS:
        conn.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
    conn.execute("CREATE INDEX jobs_array_id ON jobs (array_id)")
    conn.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


# Append only. Index i migrates version i -> i + 1; each runs in one transaction.
MIGRATIONS: List[Callable[[Connection], None]] = [_migrate_to_v1, _migrate_to_v2, _migrate_to_v3]
SCHEMA_VERSION = len(MIGRATIONS)
