"""A busy server's history for the history section: `n` ended jobs written straight into the database.

One job is written through gpujobd's own Store, as a real one leaves it (`true` run in /, succeeded,
exit code 0, created/started/ended set, its unit); SQLite then copies that row `n - 1` times in one
transaction, each copy with its own id, unit and times. The jobs ended `interval_s` apart, the newest
`interval_s` before `now`, oldest first (ascending ids). 100 000 take a second or two.

Run it only while gpujobd is stopped: the job database has one writer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator, List, Tuple

from gpujobd.daemon.store import Store
from gpujobd.shared.model import JobSpec, Outcome, transition, unit_name
from gpujobd.shared.states import EndReason, JobState

PER_COPY = ("id", "unit", "created_at", "started_at", "ended_at")  # what each copy sets itself


def seed_ended_jobs(path: Path, n: int, user: str, uid: int, gid: int, now: float,
                    interval_s: float = 10.0) -> None:
    if n < 1:
        return
    with Store(path) as store:
        first = _write_first(store, user, uid, gid, _times(now, n, interval_s))
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_copy_sql(conn), _copies(first, n, now, interval_s))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _times(now: float, age_steps: int, interval_s: float) -> Tuple[float, float, float]:
    """created_at, started_at, ended_at of the job that ended `age_steps` intervals before now."""
    ended_at = now - age_steps * interval_s
    started_at = ended_at - interval_s / 2
    return started_at - 0.1, started_at, ended_at


def _write_first(store: Store, user: str, uid: int, gid: int, times: Tuple[float, float, float]) -> int:
    created_at, started_at, ended_at = times
    job = store.create(user, uid, gid, JobSpec(argv=("true",), cwd="/"), created_at)
    job = transition(job, JobState.RUNNING, started_at=started_at, pid=1)
    job = transition(job, JobState.SUCCEEDED, ended_at=ended_at, pid=None,
                     outcome=Outcome(EndReason.EXIT_CODE, exit_code=0))
    store.save(job)
    return job.id


def _copy_sql(conn: sqlite3.Connection) -> str:
    """INSERT ... SELECT of every column of the first job but those each copy sets itself."""
    columns: List[str] = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    kept = ", ".join(column for column in columns if column not in PER_COPY)
    return (f"INSERT INTO jobs ({', '.join(PER_COPY)}, {kept}) "
            f"SELECT {', '.join('?' * len(PER_COPY))}, {kept} FROM jobs WHERE id = ?")


def _copies(first: int, n: int, now: float, interval_s: float) -> Iterator[Tuple[object, ...]]:
    for k in range(1, n):
        job_id = first + k
        yield (job_id, unit_name(job_id), *_times(now, n - k, interval_s), first)
