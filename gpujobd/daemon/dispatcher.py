"""The queue's wiring: the scheduler's snapshot kept up to date by events, and its plan applied.

gpujobd.daemon.scheduler decides (pure functions of a Snapshot); this module keeps what a snapshot is
made of in memory — the queued jobs, the jobs holding GPUs or slots, the GPUs being released, the last
start of each array — fed by the manager's transitions and the GPU watcher's readings, and plans again
on every event that can change the answer (a submit, a stop, a job's start or end, a GPU reading, a
release timeout, drain/undrain, the plan's own `wake_at`). There is no polling interval: a plan runs
only when something happened, and at most once per change (a plan that starts jobs triggers no second
plan from inside itself; it loops until the plan is stable). The plans of events decide only what
starts and what fails, and stop where no start slot is left; what every queued job waits for, and its
place, is planned when a client asks (`wait_of`), once per change: in a burst that outruns the start
slots, a hundred or more queued jobs would otherwise be placed and described on every event.

Everything here is rebuilt from the store after a restart (`load`): the queue is durable because the
store is; only the stagger's last start and the release of GPUs by jobs that ended while the daemon
was down are not (those GPUs are free as soon as NVML shows no process of a dead job on them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

from gpujobd.daemon import scheduler as sched
from gpujobd.shared import text
from gpujobd.shared.config import Config
from gpujobd.shared.log import get_logger
from gpujobd.shared.model import Job
from gpujobd.shared.states import JobState

log = get_logger()

DRAIN_SETTING = "draining"


class Inventory(Protocol):
    """The GPU watcher, as the queue sees it (gpujobd.daemon.gpu.watcher.Watcher)."""

    reason: str

    def inventory(self) -> Optional[Tuple[float, List[Dict[str, Any]]]]: ...

    def refresh(self) -> None: ...


class SettingsStore(Protocol):
    def setting(self, key: str) -> Optional[str]: ...

    def set_setting(self, key: str, value: str) -> None: ...

    def get(self, job_id: int) -> Optional[Job]: ...


class Actions(Protocol):
    """What applying a plan does (the manager)."""

    def start_queued(self, job_id: int, gpus: Tuple[str, ...]) -> None: ...

    def fail_dependency(self, job_id: int, detail: str) -> None: ...

    def stray_blockers(self) -> Dict[int, str]: ...


def array_limit(job: Job) -> int:
    if not job.spec.array:
        return 0
    try:
        return text.array(job.spec.array)[1]
    except ValueError:
        return 0


def waiting_of(job: Job, blocked: Optional[str] = None) -> sched.Waiting:
    return sched.Waiting(
        job_id=job.id, user=job.user, submitted_at=job.created_at, gpus=job.spec.gpus,
        priority=job.spec.priority, after_ok=tuple(job.spec.after), after_any=tuple(job.spec.after_any),
        array_id=job.array_id, array_limit=array_limit(job), stagger_s=job.spec.stagger_s or 0.0,
        timeout_s=job.spec.timeout_s, blocked=blocked, bound_to=job.spec.bind_to)


def holder_of(job: Job, now: float) -> sched.Holder:
    started = job.started_at if job.started_at is not None else now
    deadline = started + job.spec.timeout_s if job.spec.timeout_s else sched.INFINITY
    return sched.Holder(job_id=job.id, user=job.user, gpus=tuple(job.gpus), array_id=job.array_id,
                        deadline=deadline, starting=job.state is JobState.STARTING)


class Dispatcher:
    def __init__(self, config: Config, store: SettingsStore, gpus: Optional[Inventory],
                 call_later: Callable[[float, Callable[[], None]], Callable[[], None]],
                 clock: Callable[[], float]) -> None:
        self._config = config.scheduler
        self._starts_max = config.daemon.starts_in_flight_max
        self._watching = config.gpu.watch
        self._store = store
        self._gpus = gpus
        self._call_later = call_later
        self._clock = clock
        self.actions: Optional[Actions] = None
        self._waiting: Dict[int, Job] = {}
        self._views: Dict[int, sched.Waiting] = {}  # a queued job does not change: built once
        self._holders: Dict[int, sched.Holder] = {}
        self._releasing: Dict[str, Tuple[int, float]] = {}  # uuid -> (the ended job, when it ended)
        self._array_last_start: Dict[int, float] = {}
        self._ended: Dict[int, bool] = {}  # job id -> succeeded (a final state never changes)
        self._waits: Optional[Dict[int, sched.Wait]] = None  # None: planned again since last asked
        self._cancel_wake: Optional[Callable[[], None]] = None
        self._wake_at: Optional[float] = None
        self._planning = False
        self._again = False
        self._cancel_soon: Optional[Callable[[], None]] = None
        self.draining = store.setting(DRAIN_SETTING) == "1"
        self.plans = 0

    # -- what the manager tells ------------------------------------------------------------------
    def load(self, jobs: Iterable[Job]) -> None:
        """After a (re)start: the store's queued jobs wait again, its active jobs hold their GPUs."""
        now = self._clock()
        for job in jobs:
            if job.state is JobState.QUEUED:
                self.queued(job)
            elif not job.state.is_final:
                self._holders[job.id] = holder_of(job, now)

    def queued(self, job: Job) -> None:
        self._waiting[job.id] = job
        self._views[job.id] = waiting_of(job)

    def _forget(self, job_id: int) -> None:
        self._waiting.pop(job_id, None)
        self._views.pop(job_id, None)
        if self._waits is not None:
            self._waits.pop(job_id, None)

    def started(self, job: Job) -> None:
        """The job left the queue (queued -> starting) with its GPUs."""
        self._forget(job.id)
        self._holders[job.id] = holder_of(job, self._clock())
        if job.array_id is not None:
            self._array_last_start[job.array_id] = self._clock()

    def committed(self, job: Job) -> None:
        """Any job written: one that left `starting` (its scope is active, or it is being stopped)
        gives its start slot back, and a job waiting for one may start."""
        holder = self._holders.get(job.id)
        if holder is None or not holder.starting or job.state is JobState.STARTING or job.state.is_final:
            return  # a final state comes through `ended`
        self._holders[job.id] = dataclasses.replace(holder, starting=False)
        if self._waiting:
            self.replan_soon()

    def ended(self, job: Job) -> None:
        """A job reached a final state: its GPUs are released once NVML shows none of its processes."""
        self._forget(job.id)
        holder = self._holders.pop(job.id, None)
        self._ended[job.id] = job.state is JobState.SUCCEEDED
        gpus = holder.gpus if holder is not None else ()
        if gpus:
            self._release_later(job.id, gpus)
        self.replan()

    def _release_later(self, job_id: int, gpus: Sequence[str]) -> None:
        now = self._clock()
        if not self._watching or self._config.gpu_release_timeout_s == 0:
            return  # nothing can tell when they are free: they are free now
        for uuid in gpus:
            self._releasing[uuid] = (job_id, now)
        self._call_later(self._config.gpu_release_timeout_s, lambda: self._release_timed_out(job_id))
        if self._gpus is not None:
            self._gpus.refresh()

    def _release_timed_out(self, job_id: int) -> None:
        stale = [uuid for uuid, (owner, _) in self._releasing.items() if owner == job_id]
        if not stale:
            return
        for uuid in stale:
            del self._releasing[uuid]
        log.warning("queue.gpu_release_timed_out", job_id=job_id, gpus=stale,
                    timeout_s=self._config.gpu_release_timeout_s)
        self.replan()

    def gpus_read(self) -> None:
        """The watcher read the GPUs: a reading taken after a job ended shows whether its processes
        are gone (any left is a stray now, which keeps the GPU out of the pool)."""
        reading = self._gpus.inventory() if self._gpus is not None else None
        if reading is not None:
            taken_at = reading[0]
            for uuid in [uuid for uuid, (_, ended_at) in self._releasing.items() if taken_at >= ended_at]:
                job_id, _ = self._releasing.pop(uuid)
                log.info("queue.gpu_released", gpu=uuid, job_id=job_id)
        self.replan()

    def set_draining(self, draining: bool) -> None:
        self._store.set_setting(DRAIN_SETTING, "1" if draining else "0")
        self.draining = draining
        self.replan()

    # -- what the manager asks -------------------------------------------------------------------
    def wait_of(self, job_id: int) -> Optional[sched.Wait]:
        """What the queued job waits for and its place, planned now if an event came since the last
        time a client asked: the plans of events leave the waits out (sched.plan)."""
        if self._waits is None:
            self._waits = {wait.job_id: wait for wait in sched.plan(self.snapshot()).waits}
        return self._waits.get(job_id)

    def gpu_minors(self) -> Dict[str, Optional[int]]:
        """uuid -> minor number, from the latest reading."""
        reading = self._gpus.inventory() if self._gpus is not None else None
        if reading is None:
            return {}
        return {gpu["uuid"]: gpu["minor"] if gpu.get("minor") is not None else gpu["index"]
                for gpu in reading[1]}

    def gpu_count(self) -> Optional[int]:
        reading = self._gpus.inventory() if self._gpus is not None else None
        return len(reading[1]) if reading is not None else None

    # -- planning --------------------------------------------------------------------------------
    def replan_soon(self) -> None:
        """Plan once the event being handled is done: a Submit is answered before its job starts
        (the reply does not wait for the fork request and the scope call), and submits that arrive
        together are planned together."""
        if self._cancel_soon is None:
            self._cancel_soon = self._call_later(0.0, self._replan_asked)

    def _replan_asked(self) -> None:
        self._cancel_soon = None
        self.replan()

    def replan(self) -> None:
        if self._cancel_soon is not None:  # this plan covers the one asked for
            self._cancel_soon()
            self._cancel_soon = None
        if self._planning:
            self._again = True
            return
        self._planning = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._plan_once()
        finally:
            self._planning = False

    def _plan_once(self) -> None:
        self.plans += 1
        plan = sched.plan(self.snapshot(), with_waits=False)
        self._waits = None
        self._set_wake(plan.wake_at)
        if self.actions is None:
            return
        for fail in plan.fails:
            self._forget(fail.job_id)
            self.actions.fail_dependency(fail.job_id, fail.detail)
        started = set()
        for start in plan.starts:
            if start.job_id in self._waiting:
                self.actions.start_queued(start.job_id, start.gpus)
                started.add(start.job_id)
        if started and any(job.spec.bind_to in started for job in self._waiting.values()):
            self._again = True  # a job bound to one started just now may start too (a pair)

    def snapshot(self) -> sched.Snapshot:
        gpus, note = self._gpu_view()
        return sched.Snapshot(
            now=self._clock(), gpus=gpus, holders=tuple(self._holders.values()),
            waiting=tuple(self._waiting_view()), ended=self._ended_view(),
            releasing={uuid: job_id for uuid, (job_id, _) in self._releasing.items()},
            array_last_start=dict(self._array_last_start),
            limits=sched.Limits(self._config.max_gpus_per_user, self._config.max_jobs_per_user,
                                self.draining, self._starts_max),
            gpu_note=note)

    def _waiting_view(self) -> List[sched.Waiting]:
        if self.actions is None:
            return list(self._views.values())
        blocked = self.actions.stray_blockers()  # usually none: then the views as they are
        if not blocked:
            return list(self._views.values())
        return [dataclasses.replace(view, blocked=blocked[view.job_id]) if view.job_id in blocked else view
                for view in self._views.values()]

    def _gpu_view(self) -> Tuple[Tuple[sched.Gpu, ...], str]:
        if not self._watching or self._gpus is None:
            return (), "gpu.watch is off, so no GPU can be handed out"
        reading = self._gpus.inventory()
        if reading is None:
            return (), f"the GPUs cannot be read now: {self._gpus.reason}"
        return tuple(sched.Gpu(uuid=gpu["uuid"], index=gpu["index"], usable=gpu["usable"],
                               minor=gpu.get("minor"), stray_pids=tuple(gpu["stray_pids"]))
                     for gpu in reading[1]), ""

    def _ended_view(self) -> Mapping[int, bool]:
        for job in self._waiting.values():
            if not job.spec.after and not job.spec.after_any and job.spec.bind_to is None:
                continue  # most jobs: nothing to look up
            bound = (job.spec.bind_to,) if job.spec.bind_to is not None else ()
            for dep in (*job.spec.after, *job.spec.after_any, *bound):
                if dep in self._ended or dep in self._waiting or dep in self._holders:
                    continue
                found = self._store.get(dep)
                if found is None:  # pruned: its end is unknown, so it did not succeed
                    self._ended[dep] = False
                elif found.state.is_final:
                    self._ended[dep] = found.state is JobState.SUCCEEDED
        return self._ended

    def _set_wake(self, wake_at: Optional[float]) -> None:
        if wake_at == self._wake_at:
            return
        if self._cancel_wake is not None:
            self._cancel_wake()
            self._cancel_wake = None
        self._wake_at = wake_at
        if wake_at is not None:
            self._cancel_wake = self._call_later(max(0.0, wake_at - self._clock()), self._woken)

    def _woken(self) -> None:
        self._cancel_wake = None
        self._wake_at = None
        self.replan()
