"""gpujobd.daemon.manager, driven through small stateful fakes of its ports and a real SQLite store.

The fakes keep state the way their real counterparts do (systemd: units and their ActiveState,
pending start jobs, scope results; the files: logs, exit records, runs; the scheduler: armed timers)
and the tests move that state the way systemd, the supervisor and time would. Tests assert what the
manager leaves behind (rows in the store, units asked to stop, gates released or aborted), not the
sequence of calls it made; where an order is the contract (commit before signal before release),
each fake notes what the store held when it was touched.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest

from gpujobd.daemon.adapters import users
from gpujobd.daemon.manager import ALIVE_UNIT_STATES, Caller, Manager
from gpujobd.daemon.ports import User
from gpujobd.daemon.store import Store
from gpujobd.shared import api
from gpujobd.shared.config import Config
from gpujobd.shared.config_toml import config_from_mapping
from gpujobd.shared.errors import InvalidArgument, NotFound, PermissionDenied
from gpujobd.shared.model import Job, JobSpec, Outcome, unit_name
from gpujobd.shared.states import EndReason, JobState

NOW = 1_750_000_000.0
NOBODY = pwd.getpwnam("nobody")
OWNER = Caller(uid=NOBODY.pw_uid, user="nobody", gid=NOBODY.pw_gid, admin=lambda: False)
DAEMON_USER = pwd.getpwnam("daemon")
SECOND = Caller(uid=DAEMON_USER.pw_uid, user="daemon", gid=DAEMON_USER.pw_gid, admin=lambda: False)
ROOT = Caller(uid=0, user="root", gid=0, admin=lambda: True)
OTHER = Caller(uid=1001, user="mallory", gid=1001, admin=lambda: False)
ADMIN = Caller(uid=1002, user="carol", gid=1002, admin=lambda: True)


# ---------------------------------------------------------------------------------------------------
# The fakes.


class Journal:
    """What the store held for a job when each port was touched: (event, job id, committed state)."""

    def __init__(self, store: Store):
        self._store = store
        self.entries: List[Tuple[str, int, Optional[JobState]]] = []

    def note(self, event: str, job_id: int) -> None:
        job = self._store.get(job_id)
        self.entries.append((event, job_id, job.state if job else None))

    def events(self, job_id: int) -> List[Tuple[str, Optional[JobState]]]:
        return [(event, state) for event, jid, state in self.entries if jid == job_id]

    def drop(self, job_id: int, event: str) -> None:
        self.entries = [entry for entry in self.entries if entry[:2] != (event, job_id)]


class FakeClock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeGate:
    def __init__(self, pid: int, job_id: int, journal: Journal):
        self.pid = pid
        self.job_id = job_id
        self.released = False
        self.aborts = 0
        self._journal = journal

    @property
    def aborted(self) -> bool:
        return self.aborts > 0

    def release(self) -> None:
        assert not self.aborted, "a gate is never released after it was aborted"
        self.released = True
        self._journal.note("release", self.job_id)

    def abort(self) -> None:
        self.aborts += 1
        self._journal.note("abort", self.job_id)


class FakeSpawner:
    """spawn(spec, log_fd, on_gate, on_error): a gate handed to on_gate at once, as if the zygote had
    answered within the call; with `defer`, only when the test calls `answer` (or `fail_fork`). The
    supervisor a gate stands for blocks until released."""

    def __init__(self, journal: Journal):
        self._journal = journal
        self.gates: Dict[int, FakeGate] = {}
        self.specs: Dict[int, Dict[str, Any]] = {}
        self.fail: Optional[Exception] = None
        self.defer = False
        self.unanswered: Dict[int, Tuple[Callable[[FakeGate], None], Callable[[str], None]]] = {}
        self._next_pid = 4000

    def __call__(self, spec: Dict[str, Any], log_fd: int, on_gate: Callable[[FakeGate], None],
                 on_error: Callable[[str], None]) -> None:
        job_id = spec["job_id"]
        self._journal.note("spawn", job_id)
        os.fstat(log_fd)  # the log is open while the supervisor is asked for
        if self.fail is not None:
            raise self.fail
        self.specs[job_id] = spec
        self.unanswered[job_id] = (on_gate, on_error)
        if not self.defer:
            self.answer(job_id)

    def answer(self, job_id: int) -> FakeGate:
        on_gate, _ = self.unanswered.pop(job_id)
        self._next_pid += 1
        gate = FakeGate(self._next_pid, job_id, self._journal)
        self.gates[job_id] = gate
        on_gate(gate)
        return gate

    def fail_fork(self, job_id: int, error: str) -> None:
        _, on_error = self.unanswered.pop(job_id)
        on_error(error)


class FakeSystemd:
    """A systemd holding job units: ActiveState per unit, pending start jobs, scope Results."""

    def __init__(self, journal: Journal):
        self._journal = journal
        self.units: Dict[str, str] = {}  # unit -> ActiveState, as ListUnitsByPatterns reports
        self.results: Dict[str, str] = {}  # unit -> the scope's Result property
        self.pending: Dict[str, Callable[[str], None]] = {}  # unit -> on_done of its start job
        self.scopes: Dict[str, Tuple[int, List[Any]]] = {}  # unit -> (PID, extra properties)
        self.stop_requests: List[str] = []
        self.watched: Set[str] = set()  # units whose changes the manager asked for (reconcile)
        self.fail_start: Optional[Exception] = None
        self.manager: Optional[Manager] = None  # where unit signals go

    # -- the port --------------------------------------------------------------------------------
    def start_scope(self, job: Job, pid: int, properties: Sequence[Any],
                    on_done: Callable[[str], None]) -> None:
        self._journal.note("start_scope", job.id)
        if self.fail_start is not None:
            raise self.fail_start
        self.units[job.unit] = "inactive"  # loaded, its start job queued
        self.watched.add(job.unit)  # as the real adapter: a scope's changes are asked for as it starts
        self.pending[job.unit] = on_done
        self.scopes[job.unit] = (pid, list(properties))

    def stop_unit(self, unit: str) -> None:
        self.stop_requests.append(unit)  # like the real adapter, a unit that is not there is no error
        if self.units.get(unit) in ("active", "activating"):
            self.units[unit] = "deactivating"

    def watch_units(self, units: Sequence[str]) -> None:
        self.watched.update(units)

    def unwatch_unit(self, unit: str) -> None:
        self.watched.discard(unit)

    def list_job_units(self) -> Dict[str, str]:
        return dict(self.units)

    def scope_result(self, unit: str) -> Optional[str]:
        return self.results.get(unit)

    # -- driven by the tests ---------------------------------------------------------------------
    def finish_start_job(self, unit: str, result: str = "done") -> None:
        on_done = self.pending.pop(unit)
        if result == "done":
            self.units[unit] = "active"
        on_done(result)

    def scope_ends(self, unit: str, result: str = "success", *, send_result: bool = True) -> None:
        """The scope's cgroup is empty or its stop is over: PropertiesChanged of the Scope interface
        (Result), then of the Unit interface (ActiveState), in the order systemd sends them."""
        state = "inactive" if result == "success" else "failed"
        self.units[unit] = state
        self.results[unit] = result
        assert self.manager is not None
        if send_result:
            self.manager.on_unit_changed(unit, {"Result": result})
        self.manager.on_unit_changed(unit, {"ActiveState": state, "SubState": "dead"})

    def collect(self, unit: str) -> None:
        """CollectMode=inactive-or-failed: the unit is unloaded, UnitRemoved is sent."""
        self.units.pop(unit, None)
        self.results.pop(unit, None)
        assert self.manager is not None
        self.manager.on_unit_removed(unit)

    def was_stopped(self, unit: str) -> bool:
        return unit in self.stop_requests


class FakeFiles:
    """Logs, exit records and runs, in memory; tests write records as the supervisor would."""

    def __init__(self, journal: Journal):
        self._journal = journal
        self.logs: Dict[int, bytearray] = {}
        self.log_owners: Dict[int, Tuple[int, int]] = {}
        self.records: Dict[int, Dict[str, Any]] = {}
        self.runs: Dict[int, List[Dict[str, Any]]] = {}
        self.discarded: List[int] = []
        self.reads: List[Tuple[int, int, int]] = []
        self.during_read: Optional[Callable[[], None]] = None
        self.free: Dict[str, int] = {"/var/log/gpujobd/jobs": 1 << 40, "/var/lib/gpujobd/exits": 1 << 40}
        self.log_pipes: Dict[int, int] = {}  # job id -> read end of the pipe whose write end was the log fd

    def create_log(self, job_id: int, uid: int, gid: int) -> int:
        self._journal.note("create_log", job_id)
        self.logs[job_id] = bytearray()
        self.log_owners[job_id] = (uid, gid)
        read_end, write_end = os.pipe()
        self.log_pipes[job_id] = read_end
        return write_end

    def log_fd_closed(self, job_id: int) -> bool:
        """The manager closed its copy of the log fd: the pipe reads end-of-file."""
        os.set_blocking(self.log_pipes[job_id], False)
        try:
            return os.read(self.log_pipes[job_id], 1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        for fd in self.log_pipes.values():
            os.close(fd)

    def log_path(self, job_id: int) -> str:
        return f"/var/log/gpujobd/jobs/{job_id}.log"

    def read_log(self, job_id: int, offset: int, max_bytes: int,
                 owner_uid: Optional[int] = None) -> Tuple[bytes, int]:
        self.reads.append((job_id, offset, max_bytes))
        if owner_uid is not None and job_id in self.log_owners and self.log_owners[job_id][0] != owner_uid:
            raise PermissionDenied(f"the log file of job {job_id} is not its user's")
        if self.during_read is not None:
            self.during_read()
        data = bytes(self.logs.get(job_id, b""))[offset:offset + max_bytes]
        return data, offset + len(data)

    def record_path(self, job_id: int) -> str:
        return f"/var/lib/gpujobd/exits/{job_id}.json"

    def free_space(self) -> Dict[str, int]:
        return dict(self.free)

    def remove_log(self, job_id: int) -> bool:
        return self.logs.pop(job_id, None) is not None

    def runs_path(self, job_id: int) -> str:
        return f"/var/lib/gpujobd/exits/{job_id}.runs"

    def read_exit_record(self, job_id: int) -> Optional[Dict[str, Any]]:
        record = self.records.get(job_id)
        return dict(record) if record is not None else None

    def read_runs(self, job_id: int) -> List[Dict[str, Any]]:
        return [dict(run) for run in self.runs.get(job_id, [])]

    def discard_records(self, job_id: int) -> None:
        self.records.pop(job_id, None)
        self.runs.pop(job_id, None)
        self.discarded.append(job_id)

    def record_job_ids(self) -> List[int]:
        return sorted(set(self.records) | set(self.runs))

    # -- driven by the tests: what the supervisor writes -------------------------------------------
    def write_record(self, job_id: int, *, started_at: Optional[float] = NOW, ended_at: float = NOW + 60,
                     exit_code: Optional[int] = 0, signal: Optional[int] = None,
                     reason: str = "exit-code", detail: str = "", leftover_processes: int = 0,
                     leftovers_counted: bool = True, terminated_by_signal: Optional[int] = None,
                     stop_signal_phase: Optional[str] = None,
                     stop_signal_after_s: Optional[float] = None) -> Dict[str, Any]:
        if terminated_by_signal is not None and stop_signal_phase is None:
            stop_signal_phase = "run"
        record = {"job_id": job_id, "started_at": started_at, "ended_at": ended_at,
                  "exit_code": exit_code, "signal": signal, "reason": reason, "detail": detail,
                  "leftover_processes": leftover_processes, "leftovers_counted": leftovers_counted,
                  "runs": 1, "max_runs": 1,
                  "terminated_by_signal": terminated_by_signal, "stop_signal_phase": stop_signal_phase,
                  "stop_signal_after_s": stop_signal_after_s}
        self.records[job_id] = record
        self.runs.setdefault(job_id, []).append(
            {"run": 1, "started_at": started_at, "ended_at": ended_at, "exit_code": exit_code,
             "signal": signal, "reason": reason, "detail": detail})
        return record


class FakeScheduler:
    def __init__(self) -> None:
        self.timers: Dict[int, Tuple[float, Callable[[], None]]] = {}
        self._next = 0

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]:
        self._next += 1
        token = self._next
        self.timers[token] = (seconds, callback)
        return lambda: self.timers.pop(token, None)

    def fire_all(self) -> None:
        for token in sorted(self.timers):
            _, callback = self.timers.pop(token)
            callback()

    def run_soon(self) -> None:
        """What the main loop does once the event being handled returns: the zero-delay callbacks
        (a plan asked for by a submit), and any they ask for in turn."""
        while True:
            due = sorted(token for token, (seconds, _) in self.timers.items() if seconds == 0)
            if not due:
                return
            for token in due:
                _, callback = self.timers.pop(token)
                callback()


# ---------------------------------------------------------------------------------------------------
# The rig: a Manager over the fakes and a real Store.


@dataclasses.dataclass
class Rig:
    config: Config
    store: Store
    journal: Journal
    clock: FakeClock
    systemd: FakeSystemd
    files: FakeFiles
    spawner: FakeSpawner
    scheduler: FakeScheduler
    manager: Manager = dataclasses.field(init=False)
    changes: List[Tuple[int, JobState, Optional[JobState]]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.manager = self._new_manager()

    def _new_manager(self) -> Manager:
        manager = Manager(self.config, self.store, self.systemd, self.files, self.spawner, self.scheduler,
                          self._changed, users=users, clock=self.clock)
        self.systemd.manager = manager
        return manager

    def _changed(self, job: Job) -> None:
        committed = self.store.get(job.id)
        self.changes.append((job.id, job.state, committed.state if committed else None))
        self.journal.note(f"changed:{job.state.value}", job.id)

    def restart(self) -> Manager:
        """The daemon died and starts again: same store, systemd and files; no gates, timers or
        pending start-job callbacks survive (they belonged to the dead process)."""
        self.systemd.pending.clear()
        self.systemd.watched.clear()  # its match rules died with its bus connection
        self.scheduler.timers.clear()
        self.spawner.gates.clear()
        self.manager = self._new_manager()
        return self.manager

    # -- shortcuts ---------------------------------------------------------------------------------
    def submit(self, caller: Caller = OWNER, **fields: Any) -> Job:
        """Submit; the queue starts it at once (free GPUs, no dependency). Its queued -> starting
        signal and journal entry are dropped here (test_queue.py asserts them), so the tests of what
        follows see the job as they did before there was a queue."""
        before = len(self.changes)
        submitted = self.manager.submit(caller, spec(**fields))
        self.scheduler.run_soon()
        self.changes[before:] = [change for change in self.changes[before:]
                                 if change[:2] != (submitted.id, JobState.STARTING)]
        self.journal.drop(submitted.id, "changed:starting")
        return self.job(submitted.id)

    def start(self, caller: Caller = OWNER, **fields: Any) -> Job:
        """Submit, and let systemd's start job finish: a RUNNING job."""
        job = self.submit(caller, **fields)
        self.systemd.finish_start_job(job.unit, "done")
        return self.job(job.id)

    def job(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def states(self, job_id: int) -> List[JobState]:
        return [state for jid, state, _ in self.changes if jid == job_id]

    def gate(self, job_id: int) -> FakeGate:
        return self.spawner.gates[job_id]


def spec(**fields: Any) -> JobSpec:
    base: Dict[str, Any] = {"argv": ("python", "train.py"), "cwd": "/srv/work"}
    base.update(fields)
    if isinstance(base["argv"], list):
        base["argv"] = tuple(base["argv"])
    return JobSpec(**base)


MakeRig = Callable[..., Rig]
# Jobs without --gpus as they were before the scheduler (no device cgroup, no CUDA_VISIBLE_DEVICES):
# the tests of the lifecycle see exactly the properties and environment they ask for.
LEGACY: Dict[str, Dict[str, Any]] = {"scheduler": {"jobs_without_gpus": "unrestricted"}}


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[MakeRig]:
    opened: List[Rig] = []

    def make(**sections: Dict[str, Any]) -> Rig:
        store = Store(tmp_path / f"state-{len(opened)}.sqlite3")
        journal = Journal(store)
        rig = Rig(config=config_from_mapping({**LEGACY, **sections}), store=store,
                  journal=journal, clock=FakeClock(), systemd=FakeSystemd(journal),
                  files=FakeFiles(journal), spawner=FakeSpawner(journal), scheduler=FakeScheduler())
        opened.append(rig)
        return rig

    yield make
    for rig in opened:
        rig.files.close()
        rig.store.close()


@pytest.fixture
def rig(make_rig: MakeRig) -> Rig:
    return make_rig()


def assert_final(job: Job, state: JobState, reason: EndReason) -> Outcome:
    assert job.state is state, job
    assert job.outcome is not None and job.outcome.reason is reason, job.outcome
    assert job.ended_at is not None and job.pid is None
    return job.outcome


# ---------------------------------------------------------------------------------------------------
# Submit: validation.


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"argv": ()}, "argv (the command) is empty"),
    ({"argv": ("",)}, "argv (the command) is empty"),
    ({"argv": ("python", "a\0b")}, "NUL"),
    ({"argv": ("x" * (api.MAX_ARG_BYTES + 1),)}, f"at most {api.MAX_ARG_BYTES} are allowed"),
    ({"cwd": "relative/dir"}, "cwd (--cwd) is 'relative/dir': give an absolute path"),
    ({"cwd": ""}, "give an absolute path"),
    ({"cwd": "/srv\0x"}, "give an absolute path"),
    ({"env": {"A=B": "1"}}, "env (--env) has 'A=B'"),
    ({"env": {"": "1"}}, "env (--env) has ''"),
    ({"env": {"A": "1\0"}}, "env (--env) has 'A'"),
    ({"name": "n" * (api.MAX_NAME_LENGTH + 1)}, "name (--name) is 129 characters long"),
    ({"properties": {"MemoryMax": "lots"}}, "--property MemoryMax=lots: expected a size"),
    ({"properties": {"CPUQuota": "150"}}, "--property CPUQuota=150: expected a percentage"),
    ({"properties": {"Bogus": "1"}}, "--property Bogus: not allowed here; allowed: "),
    ({"properties": {"MemoryLow": "1G"}}, "--property MemoryLow: not allowed here"),
    ({"timeout_s": 0.0}, "timeout_s (--timeout) is 0.0: give a positive number of seconds"),
    ({"timeout_s": -5.0}, "timeout_s (--timeout) is -5.0: give a positive"),
    ({"timeout_s": float("nan")}, "timeout_s (--timeout) is nan: give a positive"),
    ({"gpu_check": "later"}, "gpu_check (--gpu-check) is 'later': give one of off, refuse, wait"),
])
def test_a_refused_submit_creates_nothing(rig: Rig, fields: Dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        rig.submit(**fields)
    assert fragment in str(caught.value)
    assert rig.store.count_jobs() == 0
    assert rig.journal.entries == [] and rig.files.logs == {} and rig.systemd.scopes == {}
    assert rig.scheduler.timers == {} and rig.changes == []
    assert rig.submit().id == 1, "a refused submit uses up no job id"


def test_a_timeout_above_the_servers_limit_is_refused(make_rig: MakeRig) -> None:
    rig = make_rig(jobs={"max_timeout_s": 3600})
    with pytest.raises(InvalidArgument) as caught:
        rig.submit(timeout_s=3600.5)
    assert "timeout_s (--timeout) is 3600.5: above this server's limit of 3600.0 s (jobs.max_timeout_s)" \
        in str(caught.value)
    assert rig.store.count_jobs() == 0
    assert rig.submit(timeout_s=3600.0).spec.timeout_s == 3600.0


def test_without_a_limit_any_positive_timeout_is_accepted(rig: Rig) -> None:
    assert rig.submit(timeout_s=10 * 365 * 86400.0).state is JobState.STARTING


@pytest.mark.parametrize("timeout", [float("inf"), 1e300])
def test_a_timeout_systemd_cannot_take_is_refused(rig: Rig, timeout: float) -> None:
    with pytest.raises(InvalidArgument):
        rig.submit(timeout_s=timeout)
    assert rig.store.count_jobs() == 0


def test_root_may_not_submit(rig: Rig) -> None:
    with pytest.raises(PermissionDenied, match="never runs a job as root"):
        rig.submit(ROOT)
    assert rig.store.count_jobs() == 0 and rig.journal.entries == []


def test_every_problem_is_reported_at_once(rig: Rig) -> None:
    with pytest.raises(InvalidArgument) as caught:
        rig.submit(argv=(), cwd="rel", env={"A=B": "x"}, timeout_s=-1.0,
                   properties={"MemoryMax": "lots", "Nope": "1"})
    message = str(caught.value)
    for fragment in ("argv (the command) is empty", "cwd (--cwd) is 'rel'", "env (--env) has 'A=B'",
                     "timeout_s (--timeout) is -1.0",
                     "--property MemoryMax=lots", "--property Nope"):
        assert fragment in message
    assert rig.store.count_jobs() == 0


# ---------------------------------------------------------------------------------------------------
# Submit: starting.


def test_a_good_submit_commits_a_starting_row_before_anything_else(rig: Rig) -> None:
    job = rig.submit(name="sweep", env={"SEED": "1"}, properties={"MemoryMax": "4G"}, timeout_s=60.0)
    assert job.state is JobState.STARTING and job.unit == unit_name(job.id) == "gpujob-1.scope"
    assert (job.user, job.uid, job.gid) == ("nobody", OWNER.uid, OWNER.gid)
    assert job.created_at == NOW and job.started_at is None and job.pid is None
    assert rig.store.get(job.id) == job
    # Each port was first touched with the row already committed as starting.
    assert rig.journal.events(job.id) == [("create_log", JobState.STARTING), ("spawn", JobState.STARTING),
                                          ("start_scope", JobState.STARTING)]
    assert rig.changes == []  # creation is not a transition; nothing is released yet
    assert not rig.gate(job.id).released and not rig.gate(job.id).aborted


def test_submit_hands_systemd_the_supervisor_and_the_encoded_properties(rig: Rig) -> None:
    job = rig.submit(properties={"MemoryMax": "4G", "CPUQuota": "150%"})
    pid, properties = rig.systemd.scopes[job.unit]
    assert pid == rig.gate(job.id).pid
    assert properties == [("MemoryMax", "t", 4 << 30), ("CPUQuotaPerSecUSec", "t", 1_500_000)]
    assert rig.files.log_owners[job.id] == (OWNER.uid, OWNER.gid)
    assert rig.files.log_fd_closed(job.id), "the daemon keeps no copy of the job's log fd"
    [(seconds, _)] = rig.scheduler.timers.values()
    assert seconds == rig.config.daemon.start_timeout_s


def test_the_supervisor_spec_has_a_safe_environment(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUJOBD_TEST_DAEMON_SECRET", "hunter2")
    job = rig.submit(env={"PATH": "/opt/bin", "GPUJOB_ID": "999", "GPUJOB_PARENT": "1", "USER": "root",
                          "FOO": "bar"})
    sent = rig.spawner.specs[job.id]
    assert sent["env"] == {"PATH": "/opt/bin", "HOME": NOBODY.pw_dir, "USER": "nobody", "LOGNAME": "nobody",
                           "SHELL": NOBODY.pw_shell, "FOO": "bar", "GPUJOB_ID": str(job.id),
                           "PYTHONUNBUFFERED": "1"}
    assert (sent["uid"], sent["gid"], sent["user"]) == (OWNER.uid, OWNER.gid, "nobody")
    assert sent["argv"] == ["python", "train.py"] and sent["cwd"] == "/srv/work"
    assert sent["umask"] == 0o022 and sent["max_runs"] == 1
    assert sent["exit_record"] == rig.files.record_path(job.id)
    assert sent["runs_file"] == rig.files.runs_path(job.id)


def test_python_output_is_unbuffered_unless_the_user_says_otherwise(rig: Rig) -> None:
    unbuffered = rig.submit(env={})
    assert rig.spawner.specs[unbuffered.id]["env"]["PYTHONUNBUFFERED"] == "1"
    buffered = rig.submit(env={"PYTHONUNBUFFERED": ""})
    assert rig.spawner.specs[buffered.id]["env"]["PYTHONUNBUFFERED"] == ""


def test_the_default_path_is_given_when_the_user_sets_none(make_rig: MakeRig) -> None:
    rig = make_rig(jobs={"default_path": "/usr/bin:/bin", "umask": "0077"})
    sent = rig.spawner.specs[rig.submit().id]
    assert sent["env"]["PATH"] == "/usr/bin:/bin" and sent["umask"] == 0o077


def test_the_gate_is_released_only_after_the_start_job_is_done(rig: Rig) -> None:
    job = rig.submit()
    gate = rig.gate(job.id)
    rig.clock.advance(0.02)
    rig.manager.on_exit_record(job.id)  # nothing of the job may run, or be stopped, before the release
    assert not gate.released and rig.job(job.id).state is JobState.STARTING
    assert not rig.systemd.was_stopped(job.unit)

    rig.systemd.finish_start_job(job.unit, "done")

    running = rig.job(job.id)
    assert running.state is JobState.RUNNING
    assert running.started_at == NOW + 0.02 and running.pid == gate.pid
    assert gate.released and not gate.aborted
    assert rig.scheduler.timers == {}, "the start timer is cancelled"
    # committed, then signalled, then released
    assert rig.journal.events(job.id)[-2:] == [("changed:running", JobState.RUNNING),
                                               ("release", JobState.RUNNING)]
    assert rig.changes == [(job.id, JobState.RUNNING, JobState.RUNNING)]


@pytest.mark.parametrize("result", ["failed", "canceled", "timeout", "dependency"])
def test_a_start_job_that_is_not_done_fails_the_job(rig: Rig, result: str) -> None:
    job = rig.submit()
    rig.systemd.finish_start_job(job.unit, result)

    ended = rig.job(job.id)
    outcome = assert_final(ended, JobState.FAILED, EndReason.START_FAILED)
    assert f"ended '{result}'" in outcome.detail and job.unit in outcome.detail
    gate = rig.gate(job.id)
    assert gate.aborted and not gate.released
    assert rig.systemd.was_stopped(job.unit)
    assert rig.scheduler.timers == {}
    assert rig.states(job.id) == [JobState.FAILED]
    rig.systemd.scope_ends(job.unit)  # the unit going away later changes nothing
    assert rig.job(job.id) == ended and rig.states(job.id) == [JobState.FAILED]


@pytest.mark.parametrize("late_result", ["done", "canceled"])
def test_the_start_timer_firing_first_fails_the_job(make_rig: MakeRig, late_result: str) -> None:
    rig = make_rig(daemon={"start_timeout_s": 7.5})
    job = rig.submit()
    [(seconds, _)] = rig.scheduler.timers.values()
    assert seconds == 7.5
    rig.clock.advance(7.5)
    rig.scheduler.fire_all()

    ended = rig.job(job.id)
    outcome = assert_final(ended, JobState.FAILED, EndReason.START_FAILED)
    assert "7.5 s (daemon.start_timeout_s)" in outcome.detail
    assert ended.ended_at == NOW + 7.5
    gate = rig.gate(job.id)
    assert gate.aborted and not gate.released
    assert rig.systemd.was_stopped(job.unit)

    rig.systemd.finish_start_job(job.unit, late_result)  # the start job ends after all
    assert not gate.released
    assert rig.job(job.id) == ended and rig.states(job.id) == [JobState.FAILED]


def test_a_spawn_failure_ends_the_job_recorded(rig: Rig) -> None:
    rig.spawner.fail = OSError(12, "Cannot allocate memory")
    job = rig.submit()
    outcome = assert_final(job, JobState.FAILED, EndReason.START_FAILED)
    assert "could not start the job's scope" in outcome.detail and "Cannot allocate memory" in outcome.detail
    assert rig.files.log_fd_closed(job.id)
    assert rig.systemd.scopes == {} and rig.scheduler.timers == {}
    assert rig.states(job.id) == [JobState.FAILED]


def test_a_user_without_a_passwd_entry_at_start_ends_the_job_recorded(rig: Rig) -> None:
    assert users.user_by_name(OTHER.user) is None, f"this host has a user {OTHER.user}"
    job = rig.submit(OTHER)
    outcome = assert_final(job, JobState.FAILED, EndReason.START_FAILED)
    assert f"user {OTHER.user} (uid {OTHER.uid}) has no passwd entry" in outcome.detail
    assert rig.spawner.gates == {} and rig.systemd.scopes == {}


def test_a_start_scope_failure_aborts_the_gate(rig: Rig) -> None:
    rig.systemd.fail_start = RuntimeError("org.freedesktop.systemd1.UnitExists")
    job = rig.submit()
    outcome = assert_final(job, JobState.FAILED, EndReason.START_FAILED)
    assert "UnitExists" in outcome.detail
    assert rig.gate(job.id).aborted and not rig.gate(job.id).released
    assert rig.scheduler.timers == {}


# The zygote answers later, on the main loop (FakeSpawner.defer): the window between asking for a
# supervisor and starting its scope.

def test_the_scope_is_asked_for_only_once_the_supervisor_is_forked(rig: Rig) -> None:
    rig.spawner.defer = True
    job = rig.submit()
    assert job.state is JobState.STARTING and rig.systemd.scopes == {} and rig.spawner.gates == {}
    assert len(rig.scheduler.timers) == 1  # the start timer covers the fork too
    gate = rig.spawner.answer(job.id)
    assert job.unit in rig.systemd.scopes and not gate.released
    rig.systemd.finish_start_job(job.unit, "done")
    assert rig.job(job.id).state is JobState.RUNNING and gate.released and rig.job(job.id).pid == gate.pid


def test_a_supervisor_that_cannot_be_forked_ends_the_job_start_failed(rig: Rig) -> None:
    rig.spawner.defer = True
    job = rig.submit()
    rig.spawner.fail_fork(job.id, "the supervisor zygote did not answer within 5 s")
    outcome = assert_final(rig.job(job.id), JobState.FAILED, EndReason.START_FAILED)
    assert "could not start the job's supervisor: the supervisor zygote did not answer" in outcome.detail
    assert rig.systemd.scopes == {} and rig.scheduler.timers == {}
    assert rig.states(job.id) == [JobState.FAILED]


@pytest.mark.parametrize("fork", ["answered", "failed"])
def test_a_job_stopped_while_its_supervisor_is_forked_ends_stopped_without_a_scope(rig: Rig,
                                                                                  fork: str) -> None:
    rig.spawner.defer = True
    job = rig.submit()
    assert rig.manager.stop(OWNER, job.id) == api.STOP_STOPPING
    assert rig.job(job.id).state is JobState.STOPPING
    if fork == "answered":
        gate = rig.spawner.answer(job.id)
        assert gate.aborted and not gate.released
    else:
        rig.spawner.fail_fork(job.id, "the zygote died")
    outcome = assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)
    assert outcome.detail == f"stopped by {OWNER.user} before it started"
    assert rig.systemd.scopes == {} and rig.scheduler.timers == {}
    assert rig.states(job.id) == [JobState.STOPPING, JobState.STOPPED]


def test_a_supervisor_forked_after_the_start_timed_out_is_aborted(rig: Rig) -> None:
    rig.spawner.defer = True
    job = rig.submit()
    rig.scheduler.fire_all()
    ended = rig.job(job.id)
    assert_final(ended, JobState.FAILED, EndReason.START_FAILED)
    gate = rig.spawner.answer(job.id)
    assert gate.aborted and not gate.released
    assert rig.systemd.scopes == {} and rig.job(job.id) == ended


# ---------------------------------------------------------------------------------------------------
# Stop.


def test_the_owner_stops_a_running_job(rig: Rig) -> None:
    job = rig.start()
    rig.clock.advance(30)
    assert rig.manager.stop(OWNER, job.id) == api.STOP_STOPPING

    stopping = rig.job(job.id)
    assert stopping.state is JobState.STOPPING and stopping.stopped_by == "nobody"
    assert rig.systemd.units[job.unit] == "deactivating"
    assert rig.gate(job.id).released and not rig.gate(job.id).aborted  # nothing to abort any more

    # SIGTERM reached the command; the supervisor records it, the scope ends.
    rig.files.write_record(job.id, ended_at=NOW + 31, exit_code=None, signal=15, reason="signal",
                           terminated_by_signal=15)
    rig.manager.on_exit_record(job.id)
    rig.clock.advance(5)
    rig.systemd.scope_ends(job.unit)

    outcome = assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)
    assert (outcome.exit_code, outcome.signal) == (None, 15)
    assert outcome.detail == "stopped by nobody"
    # The job ended when its last process did: when the scope went (seen live), not when the
    # supervisor's command ended.
    assert rig.job(job.id).ended_at == rig.clock.now, "the end time is the scope's"
    assert rig.states(job.id) == [JobState.RUNNING, JobState.STOPPING, JobState.STOPPED]
    assert all(signalled is committed for _, signalled, committed in rig.changes)


def test_a_stopped_job_keeps_the_exit_code_of_its_record(rig: Rig) -> None:
    job = rig.start()
    rig.manager.stop(OWNER, job.id)
    # Its handler exited 128+15 on the SIGTERM the supervisor forwarded.
    rig.files.write_record(job.id, exit_code=143, reason="exit-code", terminated_by_signal=15)
    rig.systemd.scope_ends(job.unit)
    outcome = assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)
    assert (outcome.exit_code, outcome.signal) == (143, None)


def test_stopping_a_starting_job_aborts_its_gate(rig: Rig) -> None:
    job = rig.submit()
    assert rig.manager.stop(OWNER, job.id) == api.STOP_STOPPING
    gate = rig.gate(job.id)
    assert gate.aborted and not gate.released
    assert rig.job(job.id).state is JobState.STOPPING and rig.systemd.was_stopped(job.unit)

    rig.systemd.finish_start_job(job.unit, "canceled")  # StopUnit cancels the queued start job
    assert rig.job(job.id).state is JobState.STOPPING, "not final until the unit is gone"
    assert rig.scheduler.timers == {}
    rig.systemd.collect(job.unit)

    outcome = assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)
    assert (outcome.exit_code, outcome.signal) == (None, None)
    assert not gate.released
    assert rig.states(job.id) == [JobState.STOPPING, JobState.STOPPED]


def test_a_start_job_done_after_a_stop_does_not_release(rig: Rig) -> None:
    job = rig.submit()
    rig.manager.stop(OWNER, job.id)
    rig.systemd.finish_start_job(job.unit, "done")  # the start won the race against the stop
    assert not rig.gate(job.id).released
    assert rig.job(job.id).state is JobState.STOPPING
    rig.systemd.scope_ends(job.unit)
    assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)


def test_the_start_timer_does_not_fail_a_job_being_stopped(rig: Rig) -> None:
    job = rig.submit()
    rig.manager.stop(OWNER, job.id)
    rig.scheduler.fire_all()
    assert rig.job(job.id).state is JobState.STOPPING


def test_stopping_twice_keeps_who_stopped_it_first(rig: Rig) -> None:
    job = rig.start()
    rig.manager.stop(OWNER, job.id)
    assert rig.manager.stop(ROOT, job.id) == api.STOP_STOPPING
    assert rig.job(job.id).stopped_by == "nobody"
    assert rig.states(job.id) == [JobState.RUNNING, JobState.STOPPING]


def test_another_user_may_not_stop_a_job(rig: Rig) -> None:
    job = rig.start()
    with pytest.raises(PermissionDenied) as caught:
        rig.manager.stop(OTHER, job.id)
    message = str(caught.value)
    assert "belongs to nobody" in message and "'gpujob-admin'" in message and "stop" in message
    assert rig.job(job.id).state is JobState.RUNNING
    assert not rig.systemd.was_stopped(job.unit)


@pytest.mark.parametrize("admin", [ROOT, ADMIN])
def test_an_admin_may_stop_any_job(rig: Rig, admin: Caller) -> None:
    job = rig.start()
    assert rig.manager.stop(admin, job.id) == api.STOP_STOPPING
    assert rig.job(job.id).stopped_by == admin.user
    rig.systemd.scope_ends(job.unit)
    assert rig.job(job.id).outcome.detail == f"stopped by {admin.user}"  # type: ignore[union-attr]


def test_stopping_an_ended_job(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id)
    rig.systemd.scope_ends(job.unit)
    ended = rig.job(job.id)
    stops = len(rig.systemd.stop_requests)
    assert rig.manager.stop(OWNER, job.id) == api.STOP_ALREADY_ENDED
    assert rig.job(job.id) == ended and len(rig.systemd.stop_requests) == stops


def test_stopping_an_unknown_job(rig: Rig) -> None:
    with pytest.raises(NotFound, match="there is no job 42"):
        rig.manager.stop(ROOT, 42)


# ---------------------------------------------------------------------------------------------------
# The end.


def test_exit_0_then_the_unit_ends_succeeds_with_the_leftover_count(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, started_at=NOW + 0.01, ended_at=NOW + 60, exit_code=0,
                           leftover_processes=2)
    rig.manager.on_exit_record(job.id)
    assert rig.job(job.id).state is JobState.RUNNING
    rig.clock.advance(100)
    rig.systemd.scope_ends(job.unit)

    ended = rig.job(job.id)
    outcome = assert_final(ended, JobState.SUCCEEDED, EndReason.EXIT_CODE)
    assert (outcome.exit_code, outcome.signal, outcome.leftover_processes) == (0, None, 2)
    # leftovers ran on until the scope was stopped: the job ended with them, not with its command
    assert ended.ended_at == rig.clock.now and ended.started_at == NOW  # the daemon's start time stays
    assert job.id in rig.files.discarded and rig.files.records == {}
    assert [run["run"] for run in rig.store.runs(job.id)] == [1]
    assert rig.store.runs(job.id)[0]["exit_code"] == 0
    assert rig.states(job.id) == [JobState.RUNNING, JobState.SUCCEEDED]


def test_an_exit_record_while_the_unit_is_active_stops_the_unit(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0, leftover_processes=3)
    rig.manager.on_exit_record(job.id)
    assert rig.systemd.was_stopped(job.unit) and rig.systemd.units[job.unit] == "deactivating"
    assert rig.job(job.id).state is JobState.RUNNING, "not final while processes of it run"
    rig.manager.on_unit_changed(job.unit, {"ActiveState": "deactivating", "SubState": "stop-sigterm"})
    assert rig.job(job.id).state is JobState.RUNNING
    rig.systemd.scope_ends(job.unit)
    assert assert_final(rig.job(job.id), JobState.SUCCEEDED, EndReason.EXIT_CODE).leftover_processes == 3


def test_a_record_that_counted_no_leftover_asks_for_no_stop(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0, leftover_processes=0)
    rig.manager.on_exit_record(job.id)
    assert rig.systemd.stop_requests == [] and rig.job(job.id).state is JobState.RUNNING
    rig.systemd.scope_ends(job.unit)  # as the supervisor, the scope's last process, exits
    assert_final(rig.job(job.id), JobState.SUCCEEDED, EndReason.EXIT_CODE)


def test_a_record_without_a_leftover_count_stops_the_unit(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0, leftover_processes=0, leftovers_counted=False)
    del rig.files.records[job.id]["leftovers_counted"]  # a supervisor from before the count was written
    rig.manager.on_exit_record(job.id)
    assert rig.systemd.was_stopped(job.unit)
    other = rig.start()
    rig.files.write_record(other.id, exit_code=0, leftover_processes=0, leftovers_counted=False)
    rig.manager.on_exit_record(other.id)  # this one could not count them
    assert rig.systemd.was_stopped(other.unit)


def test_a_record_noticed_after_the_unit_ended_changes_nothing(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0)
    rig.systemd.scope_ends(job.unit)
    ended = rig.job(job.id)
    assert ended.state is JobState.SUCCEEDED
    stops = len(rig.systemd.stop_requests)
    rig.manager.on_exit_record(job.id)
    assert rig.job(job.id) == ended and len(rig.systemd.stop_requests) == stops


def test_a_nonzero_exit_fails(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=3)
    rig.systemd.scope_ends(job.unit)
    assert assert_final(rig.job(job.id), JobState.FAILED, EndReason.EXIT_CODE).exit_code == 3


def test_scope_result_timeout_is_timed_out(rig: Rig) -> None:
    job = rig.start(timeout_s=60.0)
    rig.files.write_record(job.id, exit_code=None, signal=15, reason="signal", terminated_by_signal=15)
    rig.systemd.scope_ends(job.unit, "timeout")
    outcome = assert_final(rig.job(job.id), JobState.TIMED_OUT, EndReason.TIMEOUT)
    assert outcome.signal == 15 and "--timeout" in outcome.detail


def test_the_scope_result_is_asked_for_when_no_signal_carried_it(rig: Rig) -> None:
    job = rig.start(timeout_s=60.0)
    rig.systemd.scope_ends(job.unit, "timeout", send_result=False)
    assert_final(rig.job(job.id), JobState.TIMED_OUT, EndReason.TIMEOUT)


def test_scope_result_oom_kill(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=None, signal=9, reason="signal")
    rig.systemd.scope_ends(job.unit, "oom-kill")
    assert assert_final(rig.job(job.id), JobState.FAILED, EndReason.OOM_KILL).signal == 9


def test_leftovers_outliving_the_stop_timeout_do_not_make_a_job_timed_out(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0, leftover_processes=1, terminated_by_signal=None)
    rig.manager.on_exit_record(job.id)  # the manager stops the scope: SIGTERM, SIGKILL after the grace
    rig.systemd.scope_ends(job.unit, "timeout")
    outcome = assert_final(rig.job(job.id), JobState.SUCCEEDED, EndReason.EXIT_CODE)
    assert outcome.leftover_processes == 1


@pytest.mark.parametrize("how", ["inactive", "removed"])
def test_a_unit_gone_without_an_exit_record_is_lost(rig: Rig, how: str) -> None:
    job = rig.start()
    rig.clock.advance(12)
    if how == "inactive":
        rig.systemd.scope_ends(job.unit)
    else:
        rig.systemd.collect(job.unit)
    ended = rig.job(job.id)
    outcome = assert_final(ended, JobState.LOST, EndReason.LOST)
    assert "no exit record" in outcome.detail
    assert ended.ended_at == NOW + 12
    assert rig.states(job.id) == [JobState.RUNNING, JobState.LOST]


def test_an_unreadable_record_reason_is_lost_with_a_detail(rig: Rig) -> None:
    job = rig.start()
    rig.files.records[job.id] = {"job_id": job.id, "reason": "from-the-future", "exit_code": 0}
    rig.systemd.scope_ends(job.unit)
    outcome = assert_final(rig.job(job.id), JobState.LOST, EndReason.LOST)
    assert "unreadable exit record" in outcome.detail and "from-the-future" in outcome.detail


def test_a_bad_runs_line_does_not_keep_a_job_from_ending(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0)
    rig.files.runs[job.id] = [{"run": 1, "exit_code": 0, "reason": "from-the-future"},
                              {"run": "two"}, {"exit_code": 1}]
    rig.systemd.scope_ends(job.unit)
    assert_final(rig.job(job.id), JobState.SUCCEEDED, EndReason.EXIT_CODE)
    [run] = rig.store.runs(job.id)
    assert (run["run"], run["exit_code"]) == (1, 0)


def test_unit_events_of_other_units_are_ignored(rig: Rig) -> None:
    job = rig.start()
    rig.manager.on_unit_changed("sshd.service", {"ActiveState": "inactive"})
    rig.manager.on_unit_changed("gpujob-999.scope", {"ActiveState": "failed", "Result": "timeout"})
    rig.manager.on_unit_removed("gpujob-999.scope")
    rig.manager.on_unit_removed("gpujob-x.scope")
    rig.manager.on_exit_record(999)
    assert rig.job(job.id).state is JobState.RUNNING
    assert rig.store.count_jobs() == 1


def test_a_unit_gone_during_start_waits_for_the_start_job(rig: Rig) -> None:
    job = rig.submit()
    rig.systemd.scope_ends(job.unit, "resources")
    assert rig.job(job.id).state is JobState.STARTING, "the start job's own result decides"
    rig.systemd.finish_start_job(job.unit, "failed")
    assert_final(rig.job(job.id), JobState.FAILED, EndReason.START_FAILED)


def test_every_transition_is_signalled_once_in_order_after_its_commit(rig: Rig) -> None:
    jobs = [rig.start() for _ in range(3)]
    rig.manager.stop(OWNER, jobs[1].id)
    for job in reversed(jobs):
        rig.files.write_record(job.id, exit_code=0, terminated_by_signal=15 if job is jobs[1] else None)
        rig.systemd.scope_ends(job.unit)
    assert rig.changes == [
        (1, JobState.RUNNING, JobState.RUNNING), (2, JobState.RUNNING, JobState.RUNNING),
        (3, JobState.RUNNING, JobState.RUNNING), (2, JobState.STOPPING, JobState.STOPPING),
        (3, JobState.SUCCEEDED, JobState.SUCCEEDED), (2, JobState.STOPPED, JobState.STOPPED),
        (1, JobState.SUCCEEDED, JobState.SUCCEEDED),
    ]


# ---------------------------------------------------------------------------------------------------
# Reading logs; listing.


def test_read_log_by_offsets(rig: Rig) -> None:
    job = rig.start()
    rig.files.logs[job.id] += b"hello world\n"
    assert rig.manager.read_log(OWNER, job.id, 0, 5) == (b"hello", 5, False)
    assert rig.manager.read_log(OWNER, job.id, 5, 100) == (b" world\n", 12, False)
    assert rig.manager.read_log(OWNER, job.id, 12, 100) == (b"", 12, False)
    rig.files.logs[job.id] += b"more"
    assert rig.manager.read_log(OWNER, job.id, 12, 100) == (b"more", 16, False)
    assert rig.manager.read_log(OWNER, job.id, 1000, 100) == (b"", 1000, False)


def test_read_log_is_capped_by_the_configuration(make_rig: MakeRig) -> None:
    rig = make_rig(jobs={"log_read_max_bytes": 4096})
    job = rig.start()
    rig.files.logs[job.id] += b"x" * 10_000
    data, next_offset, _ = rig.manager.read_log(OWNER, job.id, 0, 2**32 - 1)
    assert len(data) == 4096 and next_offset == 4096
    assert rig.files.reads[-1] == (job.id, 0, 4096)
    assert rig.manager.read_log(OWNER, job.id, 0, 10)[1] == 10  # a smaller ask is kept


def test_read_log_decides_ended_before_reading(rig: Rig) -> None:
    job = rig.start()
    rig.files.logs[job.id] += b"first\n"

    def the_job_ends_during_the_read() -> None:
        rig.files.logs[job.id] += b"last\n"
        rig.files.write_record(job.id)
        rig.systemd.scope_ends(job.unit)
        rig.files.during_read = None

    rig.files.during_read = the_job_ends_during_the_read
    data, offset, ended = rig.manager.read_log(OWNER, job.id, 0, 4096)
    assert rig.job(job.id).state is JobState.SUCCEEDED
    assert data == b"first\nlast\n"
    assert ended is False, "the job ended during the read: the caller must read once more"
    assert rig.manager.read_log(OWNER, job.id, offset, 4096) == (b"", offset, True)


def test_read_log_of_an_ended_job(rig: Rig) -> None:
    job = rig.start()
    rig.files.logs[job.id] += b"done\n"
    rig.files.write_record(job.id)
    rig.systemd.scope_ends(job.unit)
    assert rig.manager.read_log(OWNER, job.id, 0, 100) == (b"done\n", 5, True)


def test_read_log_authorization(rig: Rig) -> None:
    job = rig.start()
    rig.files.logs[job.id] += b"secret\n"
    with pytest.raises(PermissionDenied, match="belongs to nobody") as caught:
        rig.manager.read_log(OTHER, job.id, 0, 100)
    assert "read the log of" in str(caught.value)
    assert rig.files.reads == [], "nothing is read for a refused caller"
    assert rig.manager.read_log(ADMIN, job.id, 0, 100)[0] == b"secret\n"
    assert rig.manager.read_log(ROOT, job.id, 0, 100)[0] == b"secret\n"
    with pytest.raises(NotFound):
        rig.manager.read_log(ROOT, 77, 0, 100)


def test_list_default_view_and_include_ended(make_rig: MakeRig) -> None:
    rig = make_rig(jobs={"recent_window_s": 3600})
    old = rig.start()
    rig.systemd.scope_ends(old.unit)  # lost, at NOW
    rig.clock.advance(7200)
    recent = rig.start(SECOND)
    rig.files.write_record(recent.id, ended_at=rig.clock.now + 5)
    rig.systemd.scope_ends(recent.unit)  # succeeded, at NOW + 7205
    rig.clock.advance(600)
    running = rig.start()

    def ids(jobs: List[Job]) -> List[int]:
        return [job.id for job in jobs]

    def listed(**filters: Any) -> List[int]:
        args: Dict[str, Any] = {"include_ended": False, "user": None, "state": None, "limit": 100}
        args.update(filters)
        return ids(rig.manager.list(**args))

    assert listed() == [recent.id, running.id]
    assert listed(include_ended=True) == [old.id, recent.id, running.id]
    assert listed(include_ended=True, user="nobody") == [old.id, running.id]
    assert listed(user="daemon") == [recent.id]
    assert listed(include_ended=True, state=JobState.LOST) == [old.id]
    assert listed(state=JobState.RUNNING) == [running.id]
    assert listed(include_ended=True, limit=2) == [recent.id, running.id]
    rig.clock.advance(3600)  # the recent job is no longer recent
    assert listed() == [running.id]


def test_get(rig: Rig) -> None:
    job = rig.start()
    assert rig.manager.get(job.id) == rig.job(job.id)
    with pytest.raises(NotFound):
        rig.manager.get(2)
    assert rig.manager.log_path(job.id) == rig.files.log_path(job.id)


# ---------------------------------------------------------------------------------------------------
# Callers.


def test_root_is_an_admin(rig: Rig) -> None:
    root = rig.manager.caller_from_uid(0)
    assert root == Caller(uid=0, user="root", gid=0, admin=lambda: True) and root.is_admin


def test_a_plain_user_is_not_an_admin(rig: Rig) -> None:
    caller = rig.manager.caller_from_uid(NOBODY.pw_uid)
    assert caller == OWNER and not caller.is_admin


def test_the_group_database_is_asked_only_when_an_action_needs_it_and_once(make_rig: MakeRig) -> None:
    rig = make_rig()
    counted = CountingUsers()
    rig.manager = Manager(rig.config, rig.store, rig.systemd, rig.files, rig.spawner, rig.scheduler,
                          rig._changed, users=counted, clock=rig.clock)
    caller = rig.manager.caller_from_uid(NOBODY.pw_uid)
    job = rig.manager.submit(caller, spec())
    rig.manager.read_log(caller, job.id, 0, 16)
    rig.manager.stop(caller, job.id)
    assert counted.group_asks == 0  # the owner's own submit, log and stop
    with pytest.raises(PermissionDenied):
        rig.manager.prune(caller, 30)
    with pytest.raises(PermissionDenied):
        rig.manager.set_draining(caller, True)
    assert counted.group_asks == 1  # asked once, then known


class CountingUsers:
    """The real user database, counting the group lookups."""

    def __init__(self) -> None:
        self.group_asks = 0

    def user_name(self, uid: int) -> str:
        return users.user_name(uid)

    def user_by_name(self, name: str) -> Optional[User]:
        return users.user_by_name(name)

    def group_ids(self, name: str, gid: int) -> Tuple[int, ...]:
        return users.group_ids(name, gid)

    def group_gid(self, name: str) -> Optional[int]:
        self.group_asks += 1
        return users.group_gid(name)


def test_members_of_the_admin_group_are_admins(make_rig: MakeRig) -> None:
    import grp

    group = grp.getgrgid(NOBODY.pw_gid).gr_name  # nobody's primary group counts as membership
    rig = make_rig(daemon={"admin_group": group})
    assert rig.manager.caller_from_uid(NOBODY.pw_uid).is_admin


def test_an_unknown_uid_is_refused(rig: Rig) -> None:
    unused = next(uid for uid in range(40000, 60000) if not _has_passwd_entry(uid))
    with pytest.raises(PermissionDenied, match=f"uid {unused} has no passwd entry"):
        rig.manager.caller_from_uid(unused)


def test_a_uid_whose_name_belongs_to_another_uid_is_refused(make_rig: MakeRig) -> None:
    """A uid without an entry is named by its number; a user whose name is that number is not it."""
    rig = make_rig()
    rig.manager = Manager(rig.config, rig.store, rig.systemd, rig.files, rig.spawner, rig.scheduler,
                          rig._changed, users=NumberedUsers(), clock=rig.clock)
    with pytest.raises(PermissionDenied, match="uid 4242 has no passwd entry"):
        rig.manager.caller_from_uid(4242)


class NumberedUsers:
    """A user database with one user, named "4242", whose uid is 1234."""

    def user_name(self, uid: int) -> str:
        return str(uid) if uid != 1234 else "4242"

    def user_by_name(self, name: str) -> Optional[User]:
        return User("4242", 1234, 1234, "/home/4242", "/bin/sh") if name == "4242" else None

    def group_ids(self, name: str, gid: int) -> Tuple[int, ...]:
        return (gid,)

    def group_gid(self, name: str) -> Optional[int]:
        return None


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# Reconcile: the truth after a crash.


def test_running_jobs_with_active_units_are_reattached(rig: Rig) -> None:
    first, second = rig.start(), rig.start()
    started = {job.id: rig.job(job.id).started_at for job in (first, second)}
    rig.clock.advance(3600)
    rig.restart().reconcile()

    assert [rig.job(job.id).state for job in (first, second)] == [JobState.RUNNING] * 2
    assert rig.systemd.stop_requests == []
    # Later, their ends come as events and are recorded from the supervisors' records.
    rig.files.write_record(first.id, started_at=NOW + 1, ended_at=NOW + 4000, exit_code=0,
                           leftover_processes=1)
    rig.files.write_record(second.id, started_at=NOW + 1, ended_at=NOW + 4100, exit_code=7)
    rig.manager.on_exit_record(first.id)
    assert rig.systemd.was_stopped(first.unit)
    rig.clock.advance(3600)
    rig.systemd.scope_ends(first.unit)
    rig.systemd.collect(second.unit)

    a, b = rig.job(first.id), rig.job(second.id)
    assert_final(a, JobState.SUCCEEDED, EndReason.EXIT_CODE)
    assert assert_final(b, JobState.FAILED, EndReason.EXIT_CODE).exit_code == 7
    assert (a.ended_at, b.ended_at) == (rig.clock.now, rig.clock.now)  # seen live: when the scopes went
    assert (a.started_at, b.started_at) == (started[first.id], started[second.id])


def test_a_reattached_job_can_be_stopped(rig: Rig) -> None:
    job = rig.start()
    rig.restart().reconcile()
    assert rig.manager.stop(OWNER, job.id) == api.STOP_STOPPING
    assert rig.systemd.was_stopped(job.unit)
    rig.systemd.scope_ends(job.unit)
    assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)


def test_reconcile_watches_the_units_of_active_jobs_and_their_end_unwatches_them(rig: Rig) -> None:
    running, ended = rig.start(), rig.start()
    rig.systemd.units.pop(ended.unit)  # ended and collected while the daemon was down
    rig.restart().reconcile()
    assert rig.systemd.watched == {running.unit}
    rig.systemd.scope_ends(running.unit)
    assert rig.job(running.id).state.is_final and rig.systemd.watched == set()


def test_an_active_unit_whose_record_exists_is_stopped_at_reconcile(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, exit_code=0, leftover_processes=4)  # the daemon was down meanwhile
    rig.restart().reconcile()
    assert rig.systemd.was_stopped(job.unit)
    assert rig.job(job.id).state is JobState.RUNNING, "not final while the unit is there"
    assert job.id in rig.files.records, "the record of an active job is kept"
    rig.systemd.scope_ends(job.unit)
    assert assert_final(rig.job(job.id), JobState.SUCCEEDED, EndReason.EXIT_CODE).leftover_processes == 4


def test_a_running_job_whose_unit_is_gone_ends_from_its_record(rig: Rig) -> None:
    job = rig.start()
    rig.files.write_record(job.id, started_at=NOW + 0.5, ended_at=NOW + 500, exit_code=2, detail="boom")
    rig.systemd.units.pop(job.unit)  # ended and collected while the daemon was down
    rig.clock.advance(86400)
    rig.restart().reconcile()

    ended = rig.job(job.id)
    outcome = assert_final(ended, JobState.FAILED, EndReason.EXIT_CODE)
    assert (outcome.exit_code, outcome.detail) == (2, "boom")
    assert ended.ended_at == NOW + 500, "the real end time, not the reconcile's"
    assert rig.files.records == {} and job.id in rig.files.discarded
    assert [run["exit_code"] for run in rig.store.runs(job.id)] == [2]


def test_a_running_job_whose_unit_failed_uses_the_scope_result(rig: Rig) -> None:
    job = rig.start(timeout_s=60.0)
    rig.files.write_record(job.id, exit_code=None, signal=15, reason="signal", terminated_by_signal=15)
    rig.systemd.units[job.unit] = "failed"  # still loaded, not yet collected
    rig.systemd.results[job.unit] = "timeout"
    rig.restart().reconcile()
    assert_final(rig.job(job.id), JobState.TIMED_OUT, EndReason.TIMEOUT)


def test_a_running_job_gone_without_a_record_is_lost(rig: Rig) -> None:
    job = rig.start()
    rig.systemd.units.pop(job.unit)
    rig.clock.advance(60)
    rig.restart().reconcile()
    ended = rig.job(job.id)
    outcome = assert_final(ended, JobState.LOST, EndReason.LOST)
    assert "no exit record" in outcome.detail and ended.ended_at == NOW + 60


def test_a_starting_job_gone_without_a_record_failed_to_start(rig: Rig) -> None:
    job = rig.submit()
    rig.systemd.units.pop(job.unit)
    rig.restart().reconcile()
    outcome = assert_final(rig.job(job.id), JobState.FAILED, EndReason.START_FAILED)
    assert "before the job's scope was released" in outcome.detail


def test_a_starting_job_whose_unit_is_alive_is_stopped_and_ends_start_failed(rig: Rig) -> None:
    # Only the daemon that died could have released it. Its supervisor exits on the closed gate, and a
    # scope systemd started after that process had gone stays active and empty (seen in the chaos
    # suite's crash loop): reconcile stops the unit rather than wait for an end that never comes.
    job = rig.submit()
    rig.systemd.units[job.unit] = "active"  # the start job finished as the daemon died
    rig.restart().reconcile()
    assert job.unit in rig.systemd.stop_requests
    outcome = assert_final(rig.job(job.id), JobState.FAILED, EndReason.START_FAILED)
    assert "nothing of it ran" in outcome.detail


def test_a_stopping_job_gone_without_a_record_is_stopped(rig: Rig) -> None:
    job = rig.start()
    rig.manager.stop(ADMIN, job.id)
    rig.systemd.units.pop(job.unit)
    rig.restart().reconcile()
    outcome = assert_final(rig.job(job.id), JobState.STOPPED, EndReason.STOPPED)
    assert outcome.detail == "stopped by carol"


def test_job_units_of_final_jobs_are_stopped_and_unknown_ones_left_running(rig: Rig) -> None:
    done = rig.start()
    rig.files.write_record(done.id)
    rig.systemd.scope_ends(done.unit)
    assert rig.job(done.id).state is JobState.SUCCEEDED
    rig.systemd.units[done.unit] = "active"  # its unit is somehow still (or again) running
    rig.systemd.units["gpujob-99.scope"] = "deactivating"  # a job this store never had
    rig.systemd.units["gpujob-98.scope"] = "failed"  # gone already: nothing to stop
    live = rig.start()
    rig.restart().reconcile()

    assert rig.systemd.stop_requests == [done.unit], "a scope with no row (a lost database) runs on"
    assert rig.job(done.id).state is JobState.SUCCEEDED, "a final job stays as it was"
    assert rig.job(live.id).state is JobState.RUNNING
    assert rig.submit().id > 99, "the unknown scope's id is never given to a new job"


def test_stale_exit_records_are_discarded(rig: Rig) -> None:
    done = rig.start()
    rig.files.write_record(done.id)
    rig.systemd.scope_ends(done.unit)
    rig.files.write_record(done.id)  # written again after its job ended: the daemon died mid-cleanup
    rig.files.write_record(4242)  # of a job the store does not know
    live = rig.start()
    rig.files.write_record(live.id, exit_code=0)
    rig.restart().reconcile()

    assert rig.files.record_job_ids() == [live.id]
    assert {done.id, 4242} <= set(rig.files.discarded)


def test_reconcile_with_nothing_to_do(rig: Rig) -> None:
    rig.manager.reconcile()
    assert rig.systemd.stop_requests == [] and rig.changes == []


def test_reconcile_handles_every_kind_of_job_at_once(rig: Rig) -> None:
    reattached = rig.start()
    from_record = rig.start()
    lost = rig.start()
    never_started = rig.submit()
    rig.files.write_record(from_record.id, exit_code=0, ended_at=NOW + 9)
    for job in (from_record, lost, never_started):
        rig.systemd.units.pop(job.unit)
    rig.restart().reconcile()
    assert [rig.job(job.id).state for job in (reattached, from_record, lost, never_started)] == [
        JobState.RUNNING, JobState.SUCCEEDED, JobState.LOST, JobState.FAILED]
    assert set(rig.systemd.list_job_units()) == {reattached.unit}


# ---------------------------------------------------------------------------------------------------
# A loop bound to a foreground job: what stopped it decides its record.


def _bound_pair(rig: Rig, **foreground_fields: Any) -> Tuple[Job, Job]:
    foreground = rig.start(**foreground_fields)
    loop = rig.start(background=True, max_runs=100, restart_delay_s=0.3, bind_to=foreground.id)
    return foreground, loop


def _loop_stopped_between_runs(rig: Rig, loop: Job) -> None:
    """systemd stopped the loop's scope during its restart delay, after a run that exited 0."""
    rig.files.write_record(loop.id, exit_code=0, terminated_by_signal=15,
                           stop_signal_phase="between-runs")
    rig.systemd.scope_ends(loop.unit)


def test_a_loop_bound_to_a_stopped_foreground_is_bound_job_ended(rig: Rig) -> None:
    """Issue 17: After= makes systemd stop the loop first, while the foreground is still deactivating."""
    foreground, loop = _bound_pair(rig)
    rig.manager.stop(OWNER, foreground.id)
    assert rig.systemd.units[foreground.unit] == "deactivating"
    _loop_stopped_between_runs(rig, loop)
    outcome = assert_final(rig.job(loop.id), JobState.STOPPED, EndReason.BOUND_JOB_ENDED)
    assert (outcome.exit_code, outcome.signal) == (None, None)
    assert "between runs" in outcome.detail
    assert [run["exit_code"] for run in rig.store.runs(loop.id)] == [0], "the last run stays in its runs"
    rig.files.write_record(foreground.id, exit_code=None, signal=15, reason="signal", terminated_by_signal=15)
    rig.systemd.scope_ends(foreground.unit)
    assert_final(rig.job(foreground.id), JobState.STOPPED, EndReason.STOPPED)


@pytest.mark.parametrize("foreground_unit", ["deactivating", "inactive", "failed", None])
def test_a_loop_stopped_while_its_foreground_ends_is_bound_job_ended(
        rig: Rig, foreground_unit: Optional[str]) -> None:
    foreground, loop = _bound_pair(rig)  # the foreground ends by itself or by its timeout
    if foreground_unit is None:
        del rig.systemd.units[foreground.unit]
    else:
        rig.systemd.units[foreground.unit] = foreground_unit
    _loop_stopped_between_runs(rig, loop)
    assert_final(rig.job(loop.id), JobState.STOPPED, EndReason.BOUND_JOB_ENDED)


def test_a_bound_loop_stopped_while_its_foreground_runs_on_was_stopped_outside(rig: Rig) -> None:
    foreground, loop = _bound_pair(rig)
    _loop_stopped_between_runs(rig, loop)  # `systemctl stop` of the loop's scope alone
    outcome = assert_final(rig.job(loop.id), JobState.STOPPED, EndReason.STOPPED)
    assert "outside gpujobd" in outcome.detail and outcome.exit_code is None
    assert rig.job(foreground.id).state is JobState.RUNNING


def test_a_bound_loop_that_ran_to_its_cap_first_keeps_its_own_end(rig: Rig) -> None:
    foreground, loop = _bound_pair(rig)
    rig.manager.stop(OWNER, foreground.id)
    rig.files.write_record(loop.id, exit_code=0)  # its last run ended before the stop came
    rig.systemd.scope_ends(loop.unit)
    assert_final(rig.job(loop.id), JobState.SUCCEEDED, EndReason.EXIT_CODE)


def test_a_bound_pair_that_ended_while_the_daemon_was_down_is_decided_on_restart(rig: Rig) -> None:
    foreground, loop = _bound_pair(rig, timeout_s=3600.0)
    # With no daemon: the foreground reaches its timeout, systemd stops the loop between two runs,
    # and both scopes are unloaded, their Results gone. Only the supervisors' records remain.
    rig.files.write_record(foreground.id, exit_code=None, signal=15, reason="signal",
                           terminated_by_signal=15, stop_signal_after_s=3600.0)
    rig.files.write_record(loop.id, exit_code=0, terminated_by_signal=15, stop_signal_phase="between-runs")
    rig.systemd.units.clear()
    rig.restart().reconcile()
    assert_final(rig.job(foreground.id), JobState.TIMED_OUT, EndReason.TIMEOUT)
    outcome = assert_final(rig.job(loop.id), JobState.STOPPED, EndReason.BOUND_JOB_ENDED)
    assert (outcome.exit_code, outcome.signal) == (None, None)


# ---------------------------------------------------------------------------------------------------
# Unit states.


def test_alive_and_gone_unit_states_do_not_overlap() -> None:
    from gpujobd.daemon.manager import GONE_UNIT_STATES

    assert not ALIVE_UNIT_STATES & GONE_UNIT_STATES
    assert "deactivating" in ALIVE_UNIT_STATES and {"inactive", "failed"} == GONE_UNIT_STATES


def test_a_loop_stopped_before_its_ended_foreground_leaves_active_is_bound_job_ended(rig: Rig) -> None:
    """The foreground's record came, so the daemon stopped its scope; systemd stops the bound loop
    first (After= reversed), and the foreground's unit still reads `active`, its stop job waiting."""
    foreground, loop = _bound_pair(rig)
    rig.files.write_record(foreground.id, exit_code=0, leftover_processes=1)
    rig.manager.on_exit_record(foreground.id)
    assert foreground.unit in rig.systemd.stop_requests
    rig.systemd.units[foreground.unit] = "active"  # as ListUnitsByPatterns answered in the race
    _loop_stopped_between_runs(rig, loop)
    assert_final(rig.job(loop.id), JobState.STOPPED, EndReason.BOUND_JOB_ENDED)
