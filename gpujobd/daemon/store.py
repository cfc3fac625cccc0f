# (typing.Optional stays, as everywhere in gpujobd, for Python 3.9; UP045 belongs in pyproject's ignore.)
"""Durable job state in SQLite. The only module of gpujobd that imports sqlite3.

Every write runs in its own transaction and is committed (synchronous=FULL, WAL) before the call
returns, so a state change the daemon acknowledges survives a crash or a power cut. Rows come back as
the model's objects (Job, JobSpec, Outcome); a row this code cannot decode is an error naming the job,
never something silently skipped.

The schema and its migrations are in gpujobd.daemon.store_schema; this module runs them, each in one
transaction, and refuses a database written by a newer gpujobd (never downgrading it).

Only SQLite features of 3.22 and older are used (no RETURNING, no STRICT tables): Python 3.9 installs
often link an old SQLite.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from gpujobd.daemon import store_rows as rows_codec
from gpujobd.daemon import store_sql as queries
from gpujobd.daemon.store_schema import MIGRATIONS, SCHEMA_VERSION
from gpujobd.shared import errors
from gpujobd.shared.config import DaemonConfig
from gpujobd.shared.model import Job, JobSpec, unit_name
from gpujobd.shared.states import EndReason, JobState

# Jobs kept as read (Job is frozen): a job's lifecycle read it ~12 times between its writes, each a
# query and a 40-column decode. Every write of a job drops its entry first, so a failed write leaves
# nothing stale; the daemon is the database's only writer.
JOB_CACHE_SIZE = 1024
MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer
DB_FILE_MODE = 0o600


# ---------------------------------------------------------------------------------------------------
# SQLite errors -> gpujobd errors

# (substring of SQLite's message, what it means and what to do). First match wins.
_ERROR_ADVICE: Tuple[Tuple[str, str], ...] = (
    ("locked", "is locked by another process (is a second gpujobd running?); stop it and retry"),
    ("busy", "is locked by another process (is a second gpujobd running?); stop it and retry"),
    ("full", "cannot be written: the disk is full; free space on its file system and retry"),
    ("malformed", "is corrupt; stop gpujobd, move the file aside (and its -wal/-shm files) or "
                  "restore a backup, then start gpujobd again"),
    ("not a database", "is not an SQLite database; stop gpujobd, move the file aside or restore a "
                       "backup, then start gpujobd again"),
    ("readonly", "is read-only; check the file's owner and mode and that its file system is mounted "
                 "read-write"),
    ("unable to open", "cannot be opened; check that its directory exists and is writable by root"),
    ("i/o error", "could not be read or written (I/O error); check the disk (dmesg) and retry"),
)


RESERVE_SUFFIX = ".reserve"


def _is_disk_full(err: BaseException) -> bool:
    cause = err.__cause__
    return isinstance(cause, sqlite3.Error) and "full" in str(cause).lower()


def _describe(exc: sqlite3.Error) -> Optional[str]:
    message = str(exc).lower()
    for needle, advice in _ERROR_ADVICE:
        if needle in message:
            return advice
    return None


# ---------------------------------------------------------------------------------------------------
# The store

RunReason = Union[EndReason, str, None]


class Store:
    """The daemon's job table. One writer (the daemon's thread); open once, close at exit."""

    def __init__(self, path: Path, busy_timeout_s: float = DaemonConfig.db_busy_timeout_s) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._conn: Optional[sqlite3.Connection] = None
        self._jobs: collections.OrderedDict[int, Job] = collections.OrderedDict()
        self._check_directory()
        self._create_file()
        with self._errors("opening the job database"):
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (checkpointing the WAL). Calling it twice is harmless."""
        conn, self._conn = self._conn, None
        self._jobs.clear()
        if conn is not None:
            with self._errors("closing the job database"):
                conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_directory(self) -> None:
        if not self.path.parent.is_dir():
            raise errors.Unavailable(
                f"cannot open the job database {self.path}: directory {self.path.parent} does not exist;"
                " create it (mode 0700, owned by root) or fix the state directory setting"
            )

    def _create_file(self) -> None:
        """Create the database file 0600 before SQLite does (SQLite would honour the umask only)."""
        try:
            fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DB_FILE_MODE)
        except FileExistsError:
            return
        except OSError as exc:
            raise errors.Unavailable(f"cannot create the job database {self.path}: {exc.strerror}") from exc
        os.close(fd)

    def _setup(self) -> None:
        with self._errors("opening the job database"):
            version = self._user_version()
            self._refuse_newer(version)
            self._refuse_foreign(version)
            self._set_pragmas()
        self._migrate(version)

    def _set_pragmas(self) -> None:
        conn = self._connection()
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise errors.Unavailable(
                f"the job database {self.path} cannot use write-ahead logging (journal mode stays {mode});"
                " put the state directory on a local file system"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")

    def _user_version(self) -> int:
        return int(self._connection().execute("PRAGMA user_version").fetchone()[0])

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise errors.Unavailable(
                f"the job database {self.path} has schema version {version}, but this gpujobd supports"
                f" versions up to {SCHEMA_VERSION}: it was written by a newer gpujobd. Install that"
                " version again, or move the file aside to start with an empty job history"
            )

    def _refuse_foreign(self, version: int) -> None:
        if version != 0:
            return
        tables = self._connection().execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables:
            raise errors.Unavailable(
                f"{self.path} is an SQLite database without a gpujobd schema version; it is not a job"
                " database. Point gpujobd at another file or move this one aside"
            )

    def _migrate(self, version: int) -> None:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction(f"migrating the schema to version {target}") as conn:
                if self._user_version() >= target:  # another process migrated it meanwhile
                    continue
                MIGRATIONS[target - 1](conn)
                conn.execute(f"PRAGMA user_version = {int(target)}")

    # -- plumbing ----------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise errors.Internal(f"the job database {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SQLite's errors into gpujobd errors naming the file and what to do."""
        try:
            yield
        except sqlite3.Error as exc:
            advice = _describe(exc)
            if advice is not None:
                raise errors.Unavailable(f"job database {self.path} {advice} ({action}: {exc})") from exc
            raise errors.Internal(
                f"job database {self.path}: SQLite error while {action}: {exc}; please report this bug"
            ) from exc

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; anything raised inside rolls everything back."""
        with self._errors(action):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # keep the original error
                        conn.execute("ROLLBACK")
                raise

    def _query(self, action: str, sql: str, params: Sequence[Any] = ()) -> List[sqlite3.Row]:
        with self._errors(action):
            cursor = self._connection().execute(sql, tuple(params))
            cursor.row_factory = sqlite3.Row  # type: ignore[assignment]
            return cursor.fetchall()

    # -- jobs --------------------------------------------------------------------------------------

    def create(self, user: str, uid: int, gid: int, spec: JobSpec, created_at: float,
               state: JobState = JobState.STARTING, resubmit_of: Optional[int] = None) -> Job:
        """Insert a new job; its id (never reused) and unit name are set in the same transaction."""
        if state not in (JobState.QUEUED, JobState.STARTING):
            raise ValueError(f"a new job starts queued or starting, not {state.value}")
        draft = Job(id=0, user=user, uid=uid, gid=gid, spec=spec, state=state, created_at=created_at,
                    resubmit_of=resubmit_of)
        with self._transaction("creating a job") as conn:
            return self._insert(conn, draft)

    def create_array(self, user: str, uid: int, gid: int, spec: JobSpec, created_at: float,
                     indices: Sequence[int]) -> List[Job]:
        """Insert one queued job per index in one transaction; the array's id is its first task's."""
        if not indices:
            raise ValueError("an array has at least one index")
        jobs: List[Job] = []
        with self._transaction("creating an array of jobs") as conn:
            for index in indices:
                draft = Job(id=0, user=user, uid=uid, gid=gid, spec=spec, state=JobState.QUEUED,
                            created_at=created_at, array_index=index,
                            array_id=jobs[0].id if jobs else None)
                job = self._insert(conn, draft)
                if not jobs:
                    conn.execute("UPDATE jobs SET array_id = ? WHERE id = ?", (job.id, job.id))
                    job = dataclasses.replace(job, array_id=job.id)
                jobs.append(job)
        return jobs

    def _insert(self, conn: sqlite3.Connection, draft: Job) -> Job:
        job_id = conn.execute(queries.INSERT_JOB, rows_codec.job_values(draft)).lastrowid
        assert job_id is not None
        unit = unit_name(job_id)
        conn.execute("UPDATE jobs SET unit = ? WHERE id = ?", (unit, job_id))
        return dataclasses.replace(draft, id=job_id, unit=unit)

    def array_tasks(self, array_id: int) -> List[Job]:
        """The tasks of an array by id; [] when there is no such array."""
        rows = self._query(f"reading array {array_id}",
                           f"{queries.SELECT_JOBS} WHERE array_id = ? ORDER BY id", (array_id,))
        return [rows_codec.decode_job(row, self.path) for row in rows]

    def dependents(self, job_id: int) -> List[Job]:
        """Jobs whose --after or --after-any names this job (a scan: resubmit is rare)."""
        pattern = f"%{job_id}%"
        rows = self._query(f"finding the dependents of job {job_id}",
                           f"{queries.SELECT_JOBS} WHERE after_ok LIKE ? OR after_any LIKE ? ORDER BY id",
                           (pattern, pattern))
        jobs = [rows_codec.decode_job(row, self.path) for row in rows]
        return [job for job in jobs if job_id in job.spec.after or job_id in job.spec.after_any]

    def setting(self, key: str) -> Optional[str]:
        rows = self._query(f"reading setting {key}", "SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_setting(self, key: str, value: str) -> None:
        with self._transaction(f"writing setting {key}") as conn:
            conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def save(self, job: Job) -> None:
        """Write every field of an existing job. NotFound if there is no such row. On a full disk the
        reserve (keep_reserve) is given up and the write tried again: a job's end is never lost to
        another job's log having filled the disk."""
        try:
            self._save(job)
        except errors.Unavailable as err:
            if not (_is_disk_full(err) and self.release_reserve()):
                raise
            self._save(job)

    def _save(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        with self._transaction(f"saving job {job.id}") as conn:
            updated = conn.execute(queries.UPDATE_JOB, (*rows_codec.job_values(job), job.id)).rowcount
            if updated != 1:
                raise errors.NotFound(f"job {job.id} is not in the job database {self.path}")

    # -- the reserve: space kept for recording ends when the disk fills ----------------------------

    @property
    def reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + RESERVE_SUFFIX)

    def keep_reserve(self, size: int) -> bool:
        """Make sure a file of `size` bytes (allocated, not sparse) sits beside the database; whether
        it is there now. Called at start and whenever there is room again."""
        if size <= 0:
            return True
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size < size:
                os.posix_fallocate(fd, 0, size)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def release_reserve(self) -> bool:
        """Give the reserve's space back to the filesystem; whether there was one."""
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            return False
        return True

    def get(self, job_id: int) -> Optional[Job]:
        kept = self._jobs.get(job_id)
        if kept is not None:
            self._jobs.move_to_end(job_id)
            return kept
        if not 0 < job_id <= MAX_JOB_ID:  # a D-Bus uint64 may not fit an SQLite integer
            return None
        rows = self._query(f"reading job {job_id}", f"{queries.SELECT_JOBS} WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = rows_codec.decode_job(rows[0], self.path)
        self._jobs[job_id] = job
        if len(self._jobs) > JOB_CACHE_SIZE:
            self._jobs.popitem(last=False)
        return job

    def list_jobs(self, *, include_ended: bool, ended_since: Optional[float], user: Optional[str],
                  state: Optional[JobState], limit: int, after_id: Optional[int] = None) -> List[Job]:
        """Jobs in ascending id order, at most `limit`.

        Default view (include_ended false): every job in a non-final state plus the jobs that ended at
        or after `ended_since` (none when it is None); served from the state and ended_at indexes.
        include_ended: every job. Without after_id, the newest `limit` ones of either view; after_id
        pages forward: the first `limit` jobs with a larger id, in either view.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if after_id is not None and after_id >= MAX_JOB_ID:
            return []
        filters, params = queries.filters(user, state)
        if include_ended:
            sql, params = queries.all_view(filters, params, after_id, limit)
        else:
            sql, params = queries.default_view(filters, params, ended_since, after_id, limit)
        jobs = [rows_codec.decode_job(row, self.path) for row in self._query("listing jobs", sql, params)]
        return jobs if include_ended or after_id is not None else jobs[::-1]

    def active_jobs(self) -> List[Job]:
        """Every job in queued/starting/running/stopping, by id: what the crash reconcile examines."""
        sql = f"{queries.SELECT_JOBS} WHERE state IN ({queries.NON_FINAL_PLACEHOLDERS}) ORDER BY id"
        rows = self._query("listing active jobs", sql, queries.NON_FINAL_VALUES)
        return [rows_codec.decode_job(row, self.path) for row in rows]

    def count_active_jobs(self, uid: int) -> int:
        """How many jobs of this user are queued, starting, running or stopping."""
        sql = f"SELECT count(*) FROM jobs WHERE state IN ({queries.NON_FINAL_PLACEHOLDERS}) AND uid = ?"
        return int(self._query("counting a user's active jobs", sql, (*queries.NON_FINAL_VALUES, uid))[0][0])

    def ensure_ids_above(self, job_id: int) -> bool:
        """Make the next new job's id larger than `job_id` (after a lost database, files of old jobs
        remain); whether the sequence had to move."""
        with self._transaction("raising the job id sequence") as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
            current = max(int(row[0]) if row else 0,
                          int(conn.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0]))
            if current >= job_id:
                return False
            if row is None:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (job_id,))
            else:
                conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", (job_id,))
        return True

    def prunable_job_ids(self, ended_before: float, limit: int) -> List[int]:
        """Ids of final jobs that ended before `ended_before`, oldest first, at most `limit`."""
        sql = (f"SELECT id FROM jobs WHERE state NOT IN ({queries.NON_FINAL_PLACEHOLDERS}) AND ended_at < ? "
               "ORDER BY id LIMIT ?")
        rows = self._query("finding jobs to prune", sql, (*queries.NON_FINAL_VALUES, ended_before, limit))
        return [int(row[0]) for row in rows]

    def delete_jobs(self, job_ids: Sequence[int]) -> int:
        """Delete final jobs and their runs; a job that is not final is left alone."""
        marks = ", ".join("?" * len(job_ids))
        for job_id in job_ids:
            self._jobs.pop(job_id, None)
        with self._transaction(f"pruning {len(job_ids)} jobs") as conn:
            not_final = queries.NON_FINAL_PLACEHOLDERS
            select = f"SELECT id FROM jobs WHERE id IN ({marks}) AND state NOT IN ({not_final})"
            final = [int(row[0]) for row in conn.execute(select, (*job_ids, *queries.NON_FINAL_VALUES))]
            final_marks = ", ".join("?" * len(final))
            conn.execute(f"DELETE FROM runs WHERE job_id IN ({final_marks})", final)
            conn.execute(f"DELETE FROM jobs WHERE id IN ({final_marks})", final)
        return len(final)

    def count_jobs(self) -> int:
        return int(self._query("counting jobs", "SELECT count(*) FROM jobs")[0][0])

    # -- runs of background loops ------------------------------------------------------------------

    def record_run(self, job_id: int, run: int, started_at: Optional[float], ended_at: Optional[float],
                   exit_code: Optional[int], signal: Optional[int], reason: RunReason,
                   detail: Optional[str]) -> None:
        """Store one run of a job; a run already stored is left as it is (re-ingesting is harmless).
        On a full disk, as `save`, the reserve is given up and the write tried again."""
        try:
            self._record_run(job_id, run, started_at, ended_at, exit_code, signal, reason, detail)
        except errors.Unavailable as err:
            if not (_is_disk_full(err) and self.release_reserve()):
                raise
            self._record_run(job_id, run, started_at, ended_at, exit_code, signal, reason, detail)

    def _record_run(self, job_id: int, run: int, started_at: Optional[float], ended_at: Optional[float],
                    exit_code: Optional[int], signal: Optional[int], reason: RunReason,
                    detail: Optional[str]) -> None:
        reason_value = EndReason(reason).value if reason is not None else None
        self._jobs.pop(job_id, None)  # its runs_done is counted from the runs
        with self._transaction(f"recording run {run} of job {job_id}") as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise errors.NotFound(f"job {job_id} is not in the job database {self.path}")
            conn.execute(
                "INSERT OR IGNORE INTO runs (job_id, run, started_at, ended_at, exit_code, signal, reason,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, run, started_at, ended_at, exit_code, signal, reason_value, detail),
            )

    def runs(self, job_id: int) -> List[Dict[str, Any]]:
        """The recorded runs of a job by run number: dicts with the record_run fields (reason as
        EndReason or None)."""
        rows = self._query(
            f"reading the runs of job {job_id}",
            "SELECT job_id, run, started_at, ended_at, exit_code, signal, reason, detail FROM runs"
            " WHERE job_id = ? ORDER BY run",
            (job_id,),
        )
        return [rows_codec.decode_run(row, self.path) for row in rows]
