"""The daemon's core: job transitions, authorization and the crash reconcile.

It sees systemd, the supervisor spawner, the job files, the store and the clock through the small
protocols of gpujobd.daemon.ports, so it is tested with stateful fakes (tests/unit/test_manager.py) and
never imports a D-Bus, systemd or user-database library. Every transition is committed to the store
before it is signalled or released.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from gpujobd.daemon import protection, retention
from gpujobd.daemon.admission import scheduling_problems
from gpujobd.daemon.dispatcher import Dispatcher
from gpujobd.daemon.gpu.strays import describe_strays
from gpujobd.daemon.launch import supervisor_spec
from gpujobd.daemon.outcome import RECORD_REASONS, decide_outcome, ends_with_its_supervisor, record_float
from gpujobd.daemon.ports import (
    GatePort,
    GpuPort,
    JobFilesPort,
    SchedulerPort,
    Spawn,
    StorePort,
    SystemdPort,
    UsersPort,
)
from gpujobd.daemon.properties import Encoded
from gpujobd.daemon.queueing import Caller as Caller  # re-exported: the service and tests use it
from gpujobd.daemon.queueing import Queueing, Runtime
from gpujobd.daemon.validation import validate
from gpujobd.shared import api, jobspec, text
from gpujobd.shared.config import Config
from gpujobd.shared.errors import InvalidArgument, NotFound, PermissionDenied, Refused
from gpujobd.shared.log import get_logger
from gpujobd.shared.model import Job, JobSpec, Outcome, final_state_for, job_id_from_unit, transition
from gpujobd.shared.states import EndReason, JobState

log = get_logger()

ALIVE_UNIT_STATES = frozenset({"active", "activating", "deactivating", "reloading", "refreshing"})
# A job bound to one in another state is being stopped because that one ends: a stop of the bound-to
# job is passed on by BindsTo=, and After= stops this one first, while that one is still deactivating.
NOT_ENDING_UNIT_STATES = ALIVE_UNIT_STATES - {"deactivating"}
GONE_UNIT_STATES = frozenset({"inactive", "failed"})
START_JOB_DONE = "done"
MAX_LOG_OFFSET = 2**63 - 1  # off_t


class Manager(Queueing):
    def __init__(self, config: Config, store: StorePort, systemd: SystemdPort, files: JobFilesPort,
                 spawn: Spawn, scheduler: SchedulerPort, on_change: Callable[[Job], None], *,
                 users: UsersPort, clock: Callable[[], float] = time.time, gpus: Optional[GpuPort] = None):
        self._config = config
        self._users = users
        self._gpus = gpus
        self._store = store
        self._systemd = systemd
        self._files = files
        self._spawn = spawn
        self._scheduler = scheduler
        self._on_change = on_change
        self._clock = clock
        self._runtime: Dict[int, Runtime] = {}
        self._stray_waits: Set[int] = set()  # queued jobs that wait for strays to leave (gpu_check wait)
        self.queue = Dispatcher(config, store, gpus, scheduler.call_later, clock)
        self.queue.actions = self

    # -- callers -------------------------------------------------------------------------------
    def caller_from_uid(self, uid: int) -> Caller:
        user = self._users.user_by_name(self._users.user_name(uid))
        if user is None or user.uid != uid:
            raise PermissionDenied(f"uid {uid} has no passwd entry; gpujobd serves only known users")
        name, gid = user.name, user.gid

        def admin() -> bool:
            admin_gid = self._users.group_gid(self._config.daemon.admin_group)
            return uid == 0 or (admin_gid is not None and admin_gid in self._users.group_ids(name, gid))
        return Caller(uid=uid, user=name, gid=gid, admin=admin)

    def _authorize(self, caller: Caller, job: Job, action: str) -> None:
        if caller.uid == job.uid or caller.is_admin:
            return
        raise PermissionDenied(
            f"job {job.id} belongs to {job.user}: only its owner, root or a member of group "
            f"'{self._config.daemon.admin_group}' may {action} it")

    # -- verbs -----------------------------------------------------------------------------------
    def validate(self, caller: Caller, spec: JobSpec) -> Tuple[JobSpec, List[Encoded]]:
        """Every check `submit` makes before it creates anything: the spec with the server's
        defaults and the scope's properties, or InvalidArgument/PermissionDenied. No side effects."""
        if caller.uid == 0:
            raise PermissionDenied("gpujobd never runs a job as root: submit as the user the work "
                                   "belongs to (e.g. runuser -u USER -- gpujobctl submit ...)")
        spec = jobspec.with_server_defaults(spec, self._config)
        properties = validate(spec, self._config.jobs)
        problems = scheduling_problems(spec, lambda: caller.is_admin, self._store.get, self.queue.gpu_count(),
                                       self._config.daemon.admin_group)
        if problems:
            raise InvalidArgument("; ".join(problems))
        self._check_binding(caller, spec)
        protection.check_active_jobs(caller.user, self._store.count_active_jobs(caller.uid),
                                     self._config.limits)
        protection.check_free_space(self._files.free_space(), self._config.limits)
        return spec, properties

    def submit(self, caller: Caller, spec: JobSpec) -> Job:
        return self.submit_all(caller, spec)[0]

    def submit_all(self, caller: Caller, spec: JobSpec) -> List[Job]:
        """Queue the job (an array: one job per index); the queue starts what can start at once."""
        spec, _properties = self.validate(caller, spec)
        blockers = self._gpu_blockers(spec) if spec.gpu_check != "off" and not spec.gpus else []
        if blockers and spec.gpu_check == "refuse":
            raise Refused(f"{describe_strays(blockers)}; the job was not created (gpu_check "
                          "refuse). `gpujobctl gpus` shows the GPUs; submit with gpu_check wait "
                          "to wait for them")
        now = self._clock()
        if spec.array:
            jobs = self._store.create_array(caller.user, caller.uid, caller.gid, spec, now,
                                            text.array(spec.array)[0])
        else:
            jobs = [self._store.create(caller.user, caller.uid, caller.gid, spec, now, state=JobState.QUEUED)]
        for job in jobs:
            log.info("job.submitted", job_id=job.id, user=caller.user, unit=job.unit, argv0=spec.argv[0],
                     gpus=spec.gpus, array_id=job.array_id)
            if blockers:
                self._wait_for_strays(job)
            self.queue.queued(job)
        self.queue.replan_soon()
        return [self._job(job.id) for job in jobs]

    def _start_or_abort(self, job: Job, properties: Sequence[Encoded]) -> None:
        try:
            self._start(job, properties)
        except Exception as err:  # the job exists: it must end recorded, never half-started
            log.error("job.start_failed", job_id=job.id, error=str(err))
            self._runtime.setdefault(job.id, Runtime())
            self._abort_start(job.id, f"could not start the job's scope: {err}")

    def live_job_ids(self) -> List[int]:
        """The jobs that are not final: whose scopes' processes are theirs (the GPU watcher asks)."""
        return [job.id for job in self._store.active_jobs()]

    def stop(self, caller: Caller, job_id: int) -> str:
        """Stop a job; an array's id (its first task's, as with Slurm's scancel) stops every task."""
        job = self._job(job_id)
        if job.array_id == job.id:
            tasks = self._store.array_tasks(job_id)
            for task in tasks:
                self._authorize(caller, task, "stop")
            results = [self._stop_one(caller, task) for task in tasks]
            return api.STOP_STOPPING if api.STOP_STOPPING in results else api.STOP_ALREADY_ENDED
        self._authorize(caller, job, "stop")
        return self._stop_one(caller, job)

    def _stop_one(self, caller: Caller, job: Job) -> str:
        job_id = job.id
        if job.state.is_final:
            return api.STOP_ALREADY_ENDED
        if job.state is JobState.QUEUED:  # nothing runs yet: it ends here
            runtime = self._runtime.get(job_id)
            if runtime is not None and runtime.cancel_start_timer is not None:
                runtime.cancel_start_timer()
            log.info("job.stopping", job_id=job_id, by=caller.user, unit=job.unit)
            wait = self.queue.wait_of(job_id)
            self._end(dataclasses.replace(job, stopped_by=caller.user), Outcome(
                EndReason.STOPPED, detail=f"stopped by {caller.user} while it was queued"
                + (f", waiting for {wait.waiting_for}" if wait is not None else "")), self._clock())
            return api.STOP_STOPPING
        if job.state is not JobState.STOPPING:
            job = self._commit(transition(job, JobState.STOPPING, stopped_by=caller.user))
        log.info("job.stopping", job_id=job_id, by=caller.user, unit=job.unit)
        runtime = self._runtime.get(job_id)
        if runtime is not None and runtime.gate is not None:
            runtime.gate.abort()  # not released yet: no user code may start now
        self._systemd.stop_unit(job.unit)
        return api.STOP_STOPPING

    def get(self, job_id: int) -> Job:
        return self._job(job_id)

    def prune(self, caller: Caller, older_than_days: int) -> int:
        """Admins only: delete ended jobs (rows, runs, logs) older than that; never an active one."""
        if not caller.is_admin:
            raise PermissionDenied(f"only root or a member of group '{self._config.daemon.admin_group}' "
                                   "may prune the job history")
        pruned = retention.prune(self._store, self._files, self._clock() - older_than_days * retention.DAY_S)
        log.info("retention.pruned", jobs=pruned, older_than_days=older_than_days, by=caller.user)
        return pruned

    def list(self, *, include_ended: bool, user: Optional[str], state: Optional[JobState],
             limit: int, after_id: Optional[int] = None) -> List[Job]:
        since = self._clock() - self._config.jobs.recent_window_s
        return self._store.list_jobs(include_ended=include_ended, ended_since=since, user=user,
                                     state=state, limit=limit, after_id=after_id)

    def read_log(self, caller: Caller, job_id: int, offset: int,
                 max_bytes: int) -> Tuple[bytes, int, bool]:
        job = self._job(job_id)
        self._authorize(caller, job, "read the log of")
        ended = job.state.is_final  # decided before reading, so no byte written before the end is missed
        size = min(max_bytes, self._config.jobs.log_read_max_bytes)
        if offset > MAX_LOG_OFFSET:
            raise InvalidArgument(f"log offset {offset} is beyond any file (at most {MAX_LOG_OFFSET}); "
                                  "give the offset a previous ReadLog returned, or 0")
        data, next_offset = self._files.read_log(job_id, offset, size, owner_uid=job.uid)
        return data, next_offset, ended

    def log_path(self, job_id: int) -> str:
        return self._files.log_path(job_id)

    # -- starting --------------------------------------------------------------------------------
    def _check_binding(self, caller: Caller, spec: JobSpec) -> None:
        if spec.bind_to is None:
            return
        target = self._store.get(spec.bind_to)
        if target is None:
            raise InvalidArgument(f"--bind-to {spec.bind_to}: there is no such job")
        if not (caller.uid == target.uid or caller.is_admin):
            raise PermissionDenied(f"--bind-to {spec.bind_to}: that job belongs to {target.user}; "
                                   "bind only to your own jobs")
        if target.state.is_final:
            raise InvalidArgument(f"--bind-to {spec.bind_to}: that job is {target.state.value}; a job "
                                  "can only be bound to one that has not ended")
        # A target still queued is waited for: the queue starts this job once it has started.

    def _bind_properties(self, spec: JobSpec) -> List[Encoded]:
        """BindsTo= + After= the foreground job's scope: systemd stops this job when that one ends."""
        if spec.bind_to is None:
            return []
        target = self._store.get(spec.bind_to)
        if target is None:
            raise InvalidArgument(f"--bind-to {spec.bind_to}: there is no such job")
        if target.state not in (JobState.STARTING, JobState.RUNNING):
            raise InvalidArgument(f"--bind-to {spec.bind_to}: that job is {target.state.value}; "
                                  "a job can only be bound to one that is starting or running")
        return [("BindsTo", "as", [target.unit]), ("After", "as", [target.unit])]

    def _start(self, job: Job, properties: Sequence[Encoded]) -> None:
        """Ask for the job's gated supervisor; its scope is started once it is forked (`_forked`)."""
        spec = self._supervisor_spec(job)
        runtime = self._runtime.setdefault(job.id, Runtime())
        runtime.cancel_start_timer = self._scheduler.call_later(
            self._config.daemon.start_timeout_s, lambda: self._start_timed_out(job.id))
        log_fd = self._files.create_log(job.id, job.uid, job.gid)
        try:
            self._spawn(spec, log_fd, lambda gate: self._forked(job.id, properties, gate),
                        lambda error: self._fork_failed(job.id, error))
        finally:
            os.close(log_fd)

    def _forked(self, job_id: int, properties: Sequence[Encoded], gate: GatePort) -> None:
        runtime, job = self._runtime.get(job_id), self._store.get(job_id)
        if runtime is None or job is None or job.state is not JobState.STARTING:
            gate.abort()  # it ended (start timeout) or was stopped while its supervisor was forked
            if runtime is not None:
                self._abort_start(job_id, "")
            return
        runtime.gate = gate
        self._systemd.start_scope(job, gate.pid, properties,
                                  lambda result: self._scope_started(job_id, result))

    def _fork_failed(self, job_id: int, error: str) -> None:
        if job_id in self._runtime:
            self._abort_start(job_id, f"could not start the job's supervisor: {error}")

    def _supervisor_spec(self, job: Job) -> Dict[str, Any]:
        user = self._users.user_by_name(job.user)
        if user is None:
            raise InvalidArgument(f"user {job.user} (uid {job.uid}) has no passwd entry any more: "
                                  "a job runs only as a known user")
        return supervisor_spec(job, user, self._config.jobs, self._files, self._config.scheduler)

    def _scope_started(self, job_id: int, result: str) -> None:
        runtime = self._runtime.get(job_id)
        if runtime is None:
            return
        if runtime.cancel_start_timer is not None:
            runtime.cancel_start_timer()
            runtime.cancel_start_timer = None
        job = self._job(job_id)
        if result != START_JOB_DONE or job.state is not JobState.STARTING:
            if runtime.gate is not None:
                runtime.gate.abort()
            if job.state is JobState.STARTING:
                self._abort_start(job_id, f"systemd's start job for {job.unit} ended '{result}'")
            return
        assert runtime.gate is not None
        self._commit(transition(job, JobState.RUNNING, started_at=self._clock(), pid=runtime.gate.pid))
        runtime.gate.release()
        runtime.gate = None
        log.info("job.started", job_id=job_id, unit=job.unit)

    def _start_timed_out(self, job_id: int) -> None:
        runtime = self._runtime.get(job_id)
        if runtime is None or self._job(job_id).state is not JobState.STARTING:
            return
        runtime.cancel_start_timer = None
        self._abort_start(job_id, f"the scope did not become active within "
                                  f"{self._config.daemon.start_timeout_s} s (daemon.start_timeout_s)")

    def _abort_start(self, job_id: int, detail: str) -> None:
        runtime = self._runtime.pop(job_id, Runtime())
        if runtime.gate is not None:
            runtime.gate.abort()
        if runtime.cancel_start_timer is not None:
            runtime.cancel_start_timer()
        job = self._job(job_id)
        try:
            self._systemd.stop_unit(job.unit)
        except Exception as err:
            log.warning("job.stop_after_failed_start_failed", job_id=job_id, error=str(err))
        outcome = Outcome(EndReason.START_FAILED, detail=detail)
        if job.state is JobState.STOPPING:  # stopped while its supervisor was being forked
            outcome = Outcome(EndReason.STOPPED, detail=f"stopped by {job.stopped_by} before it started")
        if not job.state.is_final:
            self._end(job, outcome, self._clock())

    # -- ending ----------------------------------------------------------------------------------
    def on_unit_changed(self, unit: str, changed: Mapping[str, Any]) -> None:
        job_id = job_id_from_unit(unit)
        runtime = self._runtime.get(job_id) if job_id is not None else None
        if runtime is None:
            return
        if "Result" in changed:
            runtime.scope_result = str(changed["Result"])
        if changed.get("ActiveState") in GONE_UNIT_STATES:
            self._scope_gone(job_id)  # type: ignore[arg-type]

    def on_unit_removed(self, unit: str) -> None:
        job_id = job_id_from_unit(unit)
        if job_id is None or job_id not in self._runtime:
            return
        # `systemctl daemon-reload` sends UnitRemoved for every unit, live scopes included, and
        # loads them again: only systemd's current list tells whether this scope is really gone.
        if self._systemd.list_job_units().get(unit) in ALIVE_UNIT_STATES:
            return
        self._scope_gone(job_id)

    def on_exit_record(self, job_id: int) -> None:
        """The supervisor wrote its record: the main command is done. Leftovers die with the scope,
        which is stopped unless the supervisor counted none (then it ends as the supervisor exits)."""
        job = self._store.get(job_id)
        if job is None or job.state.is_final or job_id not in self._runtime:
            return
        if job.state is JobState.STARTING or ends_with_its_supervisor(self._files.read_exit_record(job_id)):
            return
        self._systemd.stop_unit(job.unit)

    def on_runs_file(self, job_id: int) -> None:
        """A run of a loop ended: record it now, not only when the whole job ends."""
        job = self._store.get(job_id)
        if job is None or job.state.is_final:
            return
        if self._ingest_runs(job_id):
            self._on_change(self._job(job_id))

    def runs(self, job_id: int, limit: int) -> List[Dict[str, Any]]:
        self._job(job_id)
        return self._store.runs(job_id)[-limit:] if limit else self._store.runs(job_id)

    def _scope_gone(self, job_id: int) -> None:
        runtime = self._runtime.get(job_id)
        job = self._store.get(job_id)
        if runtime is None or job is None or job.state.is_final:
            return
        if job.state is JobState.STARTING and runtime.gate is not None:
            return  # the start job's own result decides
        if runtime.scope_result is None:
            runtime.scope_result = self._systemd.scope_result(job.unit)
        self._finish(job, runtime.scope_result, scope_gone_at=self._clock())

    def _finish(self, job: Job, scope_result: Optional[str],
                scope_gone_at: Optional[float] = None) -> None:
        """A job ends when its last process does: seen live, that is when its scope went; after a
        crash, the supervisor's record is the best witness there is."""
        record = self._files.read_exit_record(job.id)
        self._ingest_runs(job.id)
        outcome = decide_outcome(record, job.stopped_by, scope_result, self._bound_job_ending(job),
                                 timeout_s=job.spec.timeout_s)
        witnesses = [t for t in (record_float(record, "ended_at"), scope_gone_at) if t is not None]
        ended_at = max(witnesses) if witnesses else self._clock()
        started_at = job.started_at or record_float(record, "started_at")
        self._end(dataclasses.replace(job, started_at=started_at), outcome, ended_at)

    def _bound_job_ending(self, job: Job) -> bool:
        """The job this one is bound to has ended or is ending (then systemd stopped this one)."""
        if job.spec.bind_to is None:
            return False
        target = self._store.get(job.spec.bind_to)
        if target is None or target.state.is_final or target.state is JobState.STOPPING:
            return True
        if self._files.read_exit_record(target.id) is not None:
            # Its command is done and its scope is being stopped (on_exit_record); systemd stopped
            # this one first (After= reversed), so the target's unit may still read `active` with
            # its stop job waiting.
            return True
        return self._systemd.list_job_units().get(target.unit) not in NOT_ENDING_UNIT_STATES

    def _ingest_runs(self, job_id: int) -> int:
        """Record the runs the supervisor appended; idempotent. Returns how many were new."""
        known = {run["run"] for run in self._store.runs(job_id)}
        new = 0
        for run in self._files.read_runs(job_id):
            number = run.get("run")
            if not isinstance(number, int) or number in known:
                continue
            reason = str(run.get("reason") or "")
            self._store.record_run(job_id, number, record_float(run, "started_at"),
                                   record_float(run, "ended_at"),
                                   run.get("exit_code"), run.get("signal"),
                                   reason if reason in RECORD_REASONS else EndReason.LOST.value,
                                   str(run.get("detail") or ""))
            new += 1
        return new

    def _end(self, job: Job, outcome: Outcome, ended_at: float) -> None:
        self._runtime.pop(job.id, None)
        self._systemd.unwatch_unit(job.unit)
        ended = self._commit(transition(job, final_state_for(outcome), outcome=outcome,
                                        ended_at=ended_at, pid=None))
        self._files.discard_records(job.id)
        self._stray_waits.discard(job.id)
        self.queue.ended(ended)
        log.info("job.finished", job_id=job.id, unit=job.unit, state=ended.state.value,
                 reason=outcome.reason.value, exit_code=outcome.exit_code, signal=outcome.signal,
                 leftover_processes=outcome.leftover_processes)

    # -- reconcile -------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """After a start (or a crash): rebuild the view of every active job from the store,
        systemd's list of job units and the supervisors' exit records."""
        active = self._store.active_jobs()
        self.queue.load(active)
        # Before the list, so that no end is missed; a queued job has no unit yet.
        self._systemd.watch_units([job.unit for job in active if job.state is not JobState.QUEUED])
        units = self._systemd.list_job_units()
        for job in active:
            self._reconcile_job(job, units.get(job.unit))
        known = {job.unit for job in active}
        for unit, state in units.items():
            if unit not in known and state in ALIVE_UNIT_STATES:
                self._reconcile_unknown_unit(unit, state)
        for job_id in self._files.record_job_ids():
            recorded = self._store.get(job_id)
            if recorded is None or recorded.state.is_final:
                self._files.discard_records(job_id)
        log.info("reconcile.done", active_jobs=len(self._runtime), units=len(units))
        self.queue.replan()

    def _reconcile_unknown_unit(self, unit: str, state: str) -> None:
        """A live gpujob-*.scope whose job is final is stopped (its end is recorded already). One the
        store has no row for (a lost database) is someone's running work: it is reported, never
        stopped, and its id is kept from reuse (docs/admin.md, "Losing the database")."""
        job_id = job_id_from_unit(unit)
        if job_id is not None and self._store.get(job_id) is None:
            log.warning("reconcile.unknown_job_unit", unit=unit, active_state=state,
                        action="left running; stop it with systemctl stop " + unit)
            self._store.ensure_ids_above(job_id)
            return
        log.warning("reconcile.stray_job_unit", unit=unit, active_state=state)
        self._systemd.stop_unit(unit)

    def _reconcile_job(self, job: Job, unit_state: Optional[str]) -> None:
        if job.state is JobState.QUEUED:  # it waits again, in its place (the queue was loaded)
            log.info("reconcile.queued", job_id=job.id)
            if job.spec.gpu_check == "wait" and not job.spec.gpus:
                self._wait_for_strays(job)
            return
        self._runtime[job.id] = Runtime()
        if job.state is JobState.STARTING:  # only the daemon that died could have released it
            if unit_state in ALIVE_UNIT_STATES:  # its supervisor exits on the closed gate; and a
                self._systemd.stop_unit(job.unit)  # scope started after that stays active, empty
            self._end(job, Outcome(EndReason.START_FAILED, detail="gpujobd stopped before the job's "
                                   "scope was released; nothing of it ran"), self._clock())
            return
        if unit_state in ALIVE_UNIT_STATES:
            log.info("reconcile.reattached", job_id=job.id, unit=job.unit, active_state=unit_state)
            self._ingest_runs(job.id)  # runs of a loop that ended while the daemon was down
            if self._files.read_exit_record(job.id) is not None:
                self._systemd.stop_unit(job.unit)
            return
        result = self._systemd.scope_result(job.unit) if unit_state is not None else None
        self._finish(job, result)

    # -- helpers ---------------------------------------------------------------------------------
    def _job(self, job_id: int) -> Job:
        job = self._store.get(job_id)
        if job is None:
            raise NotFound(f"there is no job {job_id}: `gpujobctl list --all` shows the known ids")
        return job

    def _commit(self, job: Job) -> Job:
        self._store.save(job)
        self.queue.committed(job)
        self._on_change(job)
        return job

