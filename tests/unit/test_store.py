"""gpujobd.daemon.store: the SQLite job table (tmp_path only; fast)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from gpujobd.daemon import store, store_schema, store_sql
from gpujobd.daemon.store import Store
from gpujobd.shared import errors
from gpujobd.shared.model import Job, JobSpec, Outcome, transition, unit_name
from gpujobd.shared.states import EndReason, JobState

FIXTURE_V1 = Path(__file__).resolve().parent.parent / "data" / "state-v1.sqlite3"
NOW = 1_750_000_000.0
HOUR = 3600.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.sqlite3"


@pytest.fixture
def db(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as opened:
        yield opened


def spec(*argv: str, **fields: object) -> JobSpec:
    return JobSpec(argv=argv or ("true",), cwd="/home/alice", **fields)  # type: ignore[arg-type]


def start(db: Store, user: str = "alice", created_at: float = NOW, **spec_fields: object) -> Job:
    job = db.create(user, 1000, 1000, spec(**spec_fields), created_at)
    job = transition(job, JobState.RUNNING, started_at=created_at + 1, pid=4242)
    db.save(job)
    return job


def finish(db: Store, job: Job, ended_at: float, exit_code: int = 0) -> Job:
    outcome = Outcome(EndReason.EXIT_CODE, exit_code=exit_code)
    state = JobState.SUCCEEDED if exit_code == 0 else JobState.FAILED
    job = transition(job, state, ended_at=ended_at, outcome=outcome, pid=None)
    db.save(job)
    return job


def ids(jobs: List[Job]) -> List[int]:
    return [job.id for job in jobs]


def default_view(db: Store, ended_since: Optional[float] = NOW - HOUR, **filters: object) -> List[Job]:
    options = {"user": None, "state": None, "limit": 1000, **filters}
    return db.list_jobs(include_ended=False, ended_since=ended_since, **options)  # type: ignore[arg-type]


def all_view(db: Store, **filters: object) -> List[Job]:
    options = {"user": None, "state": None, "limit": 1000, "ended_since": None, **filters}
    return db.list_jobs(include_ended=True, **options)  # type: ignore[arg-type]


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


# -- opening -----------------------------------------------------------------------------------------


def test_new_database_is_private_wal_and_current(db: Store, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    conn = raw(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_schema.SCHEMA_VERSION
    reserved = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert {"max_runs", "restart_delay_s", "stop_on_failure", "bind_to"} <= reserved
    conn.close()


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable, match="does not exist"):
        Store(tmp_path / "nope" / "state.sqlite3")


def test_newer_schema_is_refused_with_a_clear_message(db_path: Path) -> None:
    Store(db_path).close()
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {store_schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(errors.Unavailable) as caught:
        Store(db_path)
    message = str(caught.value)
    assert str(db_path) in message
    assert f"schema version {store_schema.SCHEMA_VERSION + 1}" in message
    assert f"up to {store_schema.SCHEMA_VERSION}" in message


def test_garbage_file_is_refused_naming_the_file(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an sqlite database, just text " * 100)
    with pytest.raises(errors.Unavailable, match="not an SQLite database") as caught:
        Store(db_path)
    assert str(db_path) in str(caught.value)


def test_foreign_sqlite_database_is_refused(db_path: Path) -> None:
    conn = raw(db_path)
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(errors.Unavailable, match="not a job database"):
        Store(db_path)


def test_the_busy_timeout_is_the_configured_one(db_path: Path) -> None:
    from gpujobd.shared.config import DaemonConfig

    with Store(db_path, busy_timeout_s=0.25) as db:
        assert db._connection().execute("PRAGMA busy_timeout").fetchone()[0] == 250
    with Store(db_path) as db:
        assert db._connection().execute("PRAGMA busy_timeout").fetchone()[0] == \
            int(DaemonConfig.db_busy_timeout_s * 1000)


def test_locked_database_is_unavailable(db_path: Path) -> None:
    db = Store(db_path, busy_timeout_s=0.05)
    locker = raw(db_path)
    locker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(errors.Unavailable, match="locked") as caught:
            db.create("alice", 1000, 1000, spec(), NOW)
        assert str(db_path) in str(caught.value)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        db.close()
    with Store(db_path) as reopened:
        assert reopened.count_jobs() == 0


# -- create / get / save -----------------------------------------------------------------------------


def test_create_allocates_id_and_unit(db: Store) -> None:
    job = db.create("alice", 1000, 1001, spec("echo", "hi"), NOW)
    assert job.id == 1
    assert job.unit == unit_name(1)
    assert job.state is JobState.STARTING
    assert db.get(job.id) == job
    queued = db.create("bob", 1002, 1002, spec(), NOW, state=JobState.QUEUED)
    assert db.get(queued.id) == queued
    with pytest.raises(ValueError):
        db.create("bob", 1002, 1002, spec(), NOW, state=JobState.RUNNING)


def test_round_trip_of_every_field(db: Store) -> None:
    rich = JobSpec(
        argv=("./run me.sh", "données d'entrée", "日本語", "", "a\nb", "\udcff"),
        cwd="/home/alice/mes projets",
        env={"LANG": "C.UTF-8", "SPACED": "a = b", "EMPTY": ""},
        name="ünïcode",
        properties={"MemoryMax": "8G", "CPUQuota": "200%"},
        timeout_s=90.5,
    )
    job = db.create("alice", 1000, 1001, rich, NOW)
    job = transition(job, JobState.RUNNING, started_at=NOW + 0.125, pid=777)
    db.save(job)
    assert db.get(job.id) == job
    job = transition(job, JobState.STOPPING, stopped_by="carol")
    db.save(job)
    assert db.get(job.id) == job
    outcome = Outcome(EndReason.STOPPED, exit_code=None, signal=15, detail="stopped by carol",
                      leftover_processes=3)
    job = transition(job, JobState.STOPPED, ended_at=NOW + 9.75, outcome=outcome, pid=None)
    db.save(job)
    stored = db.get(job.id)
    assert stored == job
    assert stored is not None and stored.outcome == outcome
    assert isinstance(stored.spec.argv, tuple)
    assert stored.state is JobState.STOPPED and stored.outcome.reason is EndReason.STOPPED


def test_round_trip_of_none_and_empty_fields(db: Store) -> None:
    job = db.create("bob", 0, 0, JobSpec(argv=("x",), cwd="/"), NOW)
    stored = db.get(job.id)
    assert stored == job
    assert stored is not None
    assert (stored.pid, stored.started_at, stored.ended_at, stored.outcome, stored.stopped_by) == (
        None, None, None, None, None)
    assert stored.spec.timeout_s is None and stored.spec.env == {} and stored.spec.properties == {}
    ended = transition(job, JobState.FAILED, ended_at=NOW,
                       outcome=Outcome(EndReason.EXEC_FAILED, exit_code=None, detail=""))
    db.save(ended)
    assert db.get(job.id) == ended


def test_get_unknown_id_is_none(db: Store) -> None:
    assert db.get(42) is None
    assert db.get(0) is None
    assert db.get(2**64 - 1) is None  # the largest D-Bus uint64
    assert all_view(db, after_id=2**64 - 1) == []


def test_save_of_nonexistent_job_errors(db: Store) -> None:
    job = db.create("alice", 1000, 1000, spec(), NOW)
    with pytest.raises(errors.NotFound, match="job 99"):
        db.save(dataclasses.replace(job, id=99))
    assert db.count_jobs() == 1


def test_ids_increase_and_are_never_reused(db: Store, db_path: Path) -> None:
    first = [db.create("alice", 1000, 1000, spec(), NOW).id for _ in range(3)]
    assert first == [1, 2, 3]
    conn = raw(db_path)
    conn.execute("DELETE FROM jobs WHERE id = 3")
    conn.close()
    assert db.create("alice", 1000, 1000, spec(), NOW).id == 4
    db.close()
    with Store(db_path) as reopened:
        assert reopened.create("alice", 1000, 1000, spec(), NOW).id == 5


def test_unknown_state_or_reason_names_the_job(db: Store, db_path: Path) -> None:
    bad_state = db.create("alice", 1000, 1000, spec(), NOW)
    bad_reason = finish(db, start(db), NOW + 5)
    conn = raw(db_path)
    conn.execute("UPDATE jobs SET state = 'hibernating' WHERE id = ?", (bad_state.id,))
    conn.execute("UPDATE jobs SET reason = 'cosmic-ray' WHERE id = ?", (bad_reason.id,))
    conn.close()
    with pytest.raises(errors.Internal, match=rf"job {bad_state.id} .*'hibernating'"):
        db.get(bad_state.id)
    with pytest.raises(errors.Internal, match=rf"job {bad_reason.id} .*'cosmic-ray'"):
        db.get(bad_reason.id)
    with pytest.raises(errors.Internal, match=rf"job {bad_state.id}"):
        all_view(db)


def test_failed_write_leaves_nothing_behind(db: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_unit_name(job_id: int) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(store, "unit_name", broken_unit_name)
    with pytest.raises(RuntimeError):
        db.create("alice", 1000, 1000, spec(), NOW)
    assert db.count_jobs() == 0
    monkeypatch.undo()
    assert db.create("alice", 1000, 1000, spec(), NOW).unit == unit_name(db.count_jobs())


def test_full_disk_is_unavailable_and_leaves_no_row(db: Store, db_path: Path) -> None:
    kept = db.create("alice", 1000, 1000, spec(), NOW)
    conn = db._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's way to simulate a full disk
    with pytest.raises(errors.Unavailable, match="disk is full") as caught:
        db.create("alice", 1000, 1000, spec("x" * 100_000), NOW)
    assert str(db_path) in str(caught.value)
    assert ids(all_view(db)) == [kept.id]
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert db.create("alice", 1000, 1000, spec(), NOW).id == kept.id + 1


def _statements(db: Store) -> List[str]:
    """The SQL the store runs from now on (sqlite3's trace callback)."""
    ran: List[str] = []
    db._connection().set_trace_callback(ran.append)
    return ran


def test_a_job_read_again_costs_no_query_until_it_is_written(db: Store) -> None:
    job = start(db)
    assert db.get(job.id) == job
    ran = _statements(db)
    assert db.get(job.id) == job and ran == []  # kept from the first read
    ended = finish(db, job, NOW + 30)
    assert db.get(job.id) == ended  # the save dropped what was kept
    db.record_run(job.id, 1, NOW, NOW + 1, 0, None, EndReason.EXIT_CODE, "")
    assert db.get(job.id).runs_done == 1  # counted from the runs: recording one drops it too
    db.delete_jobs([job.id])
    assert db.get(job.id) is None


def test_a_failed_save_leaves_the_stored_job_readable_as_stored(db: Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    job = start(db)
    assert db.get(job.id) == job
    monkeypatch.setattr(store.rows_codec, "job_values", lambda _job: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        db.save(transition(job, JobState.STOPPING, stopped_by="alice"))
    monkeypatch.undo()
    assert db.get(job.id) == job


def test_reopening_keeps_everything(db_path: Path) -> None:
    with Store(db_path) as first:
        active = start(first, created_at=NOW)
        ended = finish(first, start(first, user="bob"), NOW + 30, exit_code=2)
        first.record_run(ended.id, 1, NOW, NOW + 1, 2, None, EndReason.EXIT_CODE, "")
    with Store(db_path) as second:
        assert second.get(active.id) == active
        assert second.get(ended.id) == dataclasses.replace(ended, runs_done=1)  # counted from runs
        assert len(second.runs(ended.id)) == 1
        assert second.count_jobs() == 2


# -- listing -----------------------------------------------------------------------------------------


@pytest.fixture
def mixed(db: Store) -> List[Job]:
    """1 old succeeded (alice), 2 running (alice), 3 recent failed (bob), 4 queued (bob),
    5 starting (carol), 6 recent succeeded (carol), 7 old failed (bob)."""
    jobs = [finish(db, start(db, "alice"), NOW - 2 * HOUR)]
    jobs.append(start(db, "alice"))
    jobs.append(finish(db, start(db, "bob"), NOW - HOUR / 2, exit_code=1))
    jobs.append(db.create("bob", 1001, 1001, spec(), NOW, state=JobState.QUEUED))
    jobs.append(db.create("carol", 1002, 1002, spec(), NOW))
    jobs.append(finish(db, start(db, "carol"), NOW - HOUR))  # exactly at the cutoff: included
    jobs.append(finish(db, start(db, "bob"), NOW - 3 * HOUR, exit_code=1))
    return jobs


def test_default_view_is_active_plus_recently_ended(db: Store, mixed: List[Job]) -> None:
    assert ids(default_view(db)) == [2, 3, 4, 5, 6]
    assert default_view(db)[1] == mixed[2]
    assert ids(default_view(db, ended_since=None)) == [2, 4, 5]
    assert ids(default_view(db, limit=2)) == [5, 6]  # the newest two (`list --limit 2`), oldest first
    assert ids(default_view(db, after_id=3, limit=2)) == [4, 5]


def test_list_filters_by_user_and_state(db: Store, mixed: List[Job]) -> None:
    assert ids(default_view(db, user="bob")) == [3, 4]
    assert ids(default_view(db, state=JobState.FAILED)) == [3]
    assert ids(default_view(db, user="alice", state=JobState.FAILED)) == []
    assert ids(all_view(db, user="bob")) == [3, 4, 7]
    assert ids(all_view(db, state=JobState.SUCCEEDED)) == [1, 6]
    assert ids(all_view(db, user="bob", state=JobState.FAILED)) == [3, 7]
    assert ids(all_view(db, user="nobody")) == []


def test_all_with_limit_returns_newest_in_ascending_order(db: Store, mixed: List[Job]) -> None:
    assert ids(all_view(db)) == [1, 2, 3, 4, 5, 6, 7]
    assert ids(all_view(db, limit=3)) == [5, 6, 7]
    assert ids(all_view(db, limit=2, user="alice")) == [1, 2]
    assert ids(all_view(db, limit=2, after_id=2)) == [3, 4]


def test_limit_must_be_positive(db: Store) -> None:
    with pytest.raises(ValueError):
        default_view(db, limit=0)


def test_active_jobs_are_every_non_final_state(db: Store, mixed: List[Job]) -> None:
    assert ids(db.active_jobs()) == [2, 4, 5]
    assert [job.state for job in db.active_jobs()] == [JobState.RUNNING, JobState.QUEUED,
                                                        JobState.STARTING]


def test_count_jobs(db: Store, mixed: List[Job]) -> None:
    assert db.count_jobs() == 7


def plan(db_path: Path, **filters: object) -> str:
    """EXPLAIN QUERY PLAN of the default view's SQL, as one string."""
    user, state = filters.get("user"), filters.get("state")
    clauses, params = store_sql.filters(user, state)  # type: ignore[arg-type]
    sql, params = store_sql.default_view(clauses, params, NOW - HOUR, filters.get("after_id"), 100)  # type: ignore[arg-type]
    conn = raw(db_path)
    try:
        return "\n".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        conn.close()


@pytest.mark.parametrize("filters", [{}, {"user": "bob"}, {"state": JobState.RUNNING}, {"after_id": 3}])
def test_default_view_uses_indexes_not_a_table_scan(db: Store, db_path: Path, mixed: List[Job],
                                                    filters: dict) -> None:
    text = plan(db_path, **filters)
    assert "jobs_state" in text and "jobs_ended_at" in text, text
    assert "SCAN" not in text, text  # neither the table nor a whole index is scanned


# -- runs --------------------------------------------------------------------------------------------


def test_record_run_is_idempotent(db: Store) -> None:
    job = start(db)
    for _ in range(2):
        db.record_run(job.id, 1, NOW, NOW + 1, 0, None, EndReason.EXIT_CODE, "")
        db.record_run(job.id, 2, NOW + 2, None, None, 9, "signal", "killed")
    runs = db.runs(job.id)
    assert [run["run"] for run in runs] == [1, 2]
    assert runs[0] == {"job_id": job.id, "run": 1, "started_at": NOW, "ended_at": NOW + 1,
                       "exit_code": 0, "signal": None, "reason": EndReason.EXIT_CODE, "detail": ""}
    assert runs[1]["reason"] is EndReason.SIGNAL and runs[1]["signal"] == 9
    assert db.runs(999) == []


def test_record_run_of_unknown_job_errors(db: Store) -> None:
    with pytest.raises(errors.NotFound, match="job 5"):
        db.record_run(5, 1, NOW, NOW, 0, None, EndReason.EXIT_CODE, "")


# -- schema freeze -----------------------------------------------------------------------------------

T0 = 1_700_000_000.0
# id: (user, state, reason, exit_code, signal, detail, leftover_processes, stopped_by)
FROZEN_V1 = {
    1: ("alice", JobState.QUEUED, None, None, None, None, None, None),
    2: ("bob", JobState.STARTING, None, None, None, None, None, None),
    3: ("alice", JobState.RUNNING, None, None, None, None, None, None),
    4: ("bob", JobState.STOPPING, None, None, None, None, None, "carol"),
    5: ("alice", JobState.SUCCEEDED, EndReason.EXIT_CODE, 0, None, "", 0, None),
    6: ("bob", JobState.FAILED, EndReason.EXIT_CODE, 3, None, "exited with status 3", 0, None),
    7: ("alice", JobState.FAILED, EndReason.OOM_KILL, None, 9, "the OOM killer ended python3 (pid 5007)",
        0, None),
    8: ("alice", JobState.STOPPED, EndReason.STOPPED, None, 15, "", 1, "alice"),
    9: ("bob", JobState.TIMED_OUT, EndReason.TIMEOUT, None, 15, "RuntimeMaxSec=2s reached", 2, None),
    10: ("carol", JobState.LOST, EndReason.LOST, None, None, "the daemon restarted and the scope was gone",
         0, None),
    11: ("alice", JobState.FAILED, EndReason.EXEC_FAILED, 203, None, "./run me.sh: not found", 0, None),
}


@pytest.fixture
def frozen_v1(tmp_path: Path) -> Iterator[Store]:
    copy = tmp_path / "state-v1.sqlite3"
    shutil.copyfile(FIXTURE_V1, copy)
    conn = raw(copy)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1, "the fixture must stay version 1"
    conn.close()
    with Store(copy) as opened:
        yield opened


def summary(job: Job) -> tuple:
    outcome = job.outcome
    if outcome is None:
        return (job.user, job.state, None, None, None, None, None, job.stopped_by)
    return (job.user, job.state, outcome.reason, outcome.exit_code, outcome.signal, outcome.detail,
            outcome.leftover_processes, job.stopped_by)


def test_frozen_v1_database_still_loads(frozen_v1: Store) -> None:
    jobs = all_view(frozen_v1)
    assert {job.id: summary(job) for job in jobs} == FROZEN_V1
    for job in jobs:
        assert job.unit == unit_name(job.id)
        assert job.created_at == T0 + job.id
        assert job.uid == job.gid == {"alice": 1000, "bob": 1001, "carol": 1002}[job.user]
        assert (job.ended_at is not None) == job.state.is_final
    assert ids(frozen_v1.active_jobs()) == [1, 2, 3, 4]
    assert frozen_v1.get(3).pid == 4242  # type: ignore[union-attr]
    assert frozen_v1.get(3).spec.timeout_s == 3600.0  # type: ignore[union-attr]
    assert frozen_v1.get(9).elapsed_s == 2.25  # type: ignore[union-attr]


def test_frozen_v1_unicode_job_and_runs(frozen_v1: Store) -> None:
    job = frozen_v1.get(11)
    assert job is not None
    assert job.spec == JobSpec(
        argv=("./run me.sh", "données d'entrée.txt", "--label=日本語", ""),
        cwd="/home/alice/mes projets",
        env={"LANG": "C.UTF-8", "GREETING": "héllo wörld = 1", "EMPTY": ""},
        name="ünïcode job",
        properties={"MemoryMax": "8G", "CPUQuota": "200%"},
        timeout_s=90.5,
    )
    assert (job.started_at, job.ended_at, job.pid) == (None, T0 + 11.5, None)
    runs = frozen_v1.runs(5)
    assert [(run["run"], run["reason"], run["exit_code"], run["signal"]) for run in runs] == [
        (1, EndReason.EXIT_CODE, 0, None), (2, EndReason.SIGNAL, None, 9)]


def test_frozen_v1_database_accepts_new_jobs(frozen_v1: Store) -> None:
    job = frozen_v1.create("dave", 1003, 1003, spec(), NOW)
    assert job.id == 12
    assert frozen_v1.get(12) == job


def load_fixture_script() -> object:
    script = FIXTURE_V1.parent / "make_state_v1.py"
    module_spec = importlib.util.spec_from_file_location("make_state_v1", script)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_fixture_script_refuses_to_overwrite(tmp_path: Path) -> None:
    script = load_fixture_script()
    target = tmp_path / "state-v1.sqlite3"
    target.write_bytes(b"precious")
    assert script.main([str(target)]) == 1  # type: ignore[attr-defined]
    assert target.read_bytes() == b"precious"
    if store_schema.SCHEMA_VERSION != 1:
        pytest.skip("the code is past schema version 1; the script no longer writes the fixture")
    assert script.main([str(target), "--force"]) == 0  # type: ignore[attr-defined]
    with Store(target) as regenerated:
        assert {job.id: summary(job) for job in all_view(regenerated)} == FROZEN_V1


# --- schema v3: scheduling ------------------------------------------------------------------------


def test_frozen_v1_jobs_get_the_scheduling_defaults(frozen_v1: Store) -> None:
    job = frozen_v1.get(3)
    assert job is not None
    assert (job.spec.gpus, job.spec.priority, job.spec.after, job.spec.after_any, job.spec.array) == (
        0, 0, (), (), "")
    assert (job.gpus, job.array_id, job.array_index, job.resubmit_of) == ((), None, None, None)
    assert frozen_v1.setting("draining") is None


def test_scheduling_fields_round_trip(db: Store) -> None:
    asked = spec("python", "train.py", gpus=2, priority=-3, after=(4, 5), after_any=(6,), gpu_check="wait")
    job = db.create("alice", 1000, 1000, asked, NOW, state=JobState.QUEUED, resubmit_of=9)
    moved = transition(job, JobState.STARTING, gpus=("GPU-a", "GPU-b"))
    db.save(moved)
    assert db.get(job.id) == moved and moved.resubmit_of == 9 and moved.spec.gpu_check == "wait"


def test_an_array_is_created_at_once_with_consecutive_ids_and_its_first_tasks_id(db: Store) -> None:
    start(db)
    tasks = db.create_array("alice", 1000, 1000, spec("sh", array="1,3,5%2", stagger_s=2.0), NOW, [1, 3, 5])
    assert [task.id for task in tasks] == [2, 3, 4]
    assert [(task.array_id, task.array_index, task.state) for task in tasks] == [
        (2, 1, JobState.QUEUED), (2, 3, JobState.QUEUED), (2, 5, JobState.QUEUED)]
    assert db.array_tasks(2) == tasks and db.array_tasks(1) == []


def test_dependents_are_the_jobs_naming_a_job_exactly(db: Store) -> None:
    first = start(db)
    for _ in range(10):
        start(db)
    after = db.create("alice", 1000, 1000, spec("x", after=(first.id,)), NOW, state=JobState.QUEUED)
    any_of = db.create("alice", 1000, 1000, spec("x", after_any=(11, first.id)), NOW, state=JobState.QUEUED)
    db.create("alice", 1000, 1000, spec("x", after=(11,)), NOW, state=JobState.QUEUED)  # "11" holds "1"
    assert [job.id for job in db.dependents(first.id)] == [after.id, any_of.id]


def test_settings_are_kept(db: Store) -> None:
    assert db.setting("draining") is None
    db.set_setting("draining", "1")
    db.set_setting("draining", "0")
    assert db.setting("draining") == "0"
