"""The manager's queue side: the queue's actions (start a queued job on its GPUs, fail one whose
dependency failed, the strays a job waits for), resubmission and drain.

A mixin of gpujobd.daemon.manager.Manager, kept apart so that each module stays readable; it uses the
manager's store, config and transitions, declared below for the type checker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from gpujobd.daemon.admission import resubmitted_spec, to_resubmit
from gpujobd.daemon.dispatcher import Dispatcher
from gpujobd.daemon.gpu.strays import describe_strays
from gpujobd.daemon.launch import device_properties
from gpujobd.daemon.ports import GatePort, GpuPort, SchedulerPort, StorePort
from gpujobd.daemon.properties import Encoded
from gpujobd.daemon.validation import validate
from gpujobd.shared.config import Config
from gpujobd.shared.errors import GpujobdError, InvalidArgument, PermissionDenied
from gpujobd.shared.log import get_logger
from gpujobd.shared.model import Job, JobSpec, Outcome, transition
from gpujobd.shared.states import EndReason, JobState

log = get_logger()


@dataclass(frozen=True)
class Caller:
    """Who calls. Whether they are an admin (root, or a member of daemon.admin_group) is asked of the
    group database only when an action needs it, once: the walk takes about a millisecond with
    /etc/group and far longer with a directory service, and most calls (a user's own submits, lists
    and stops) never need it."""

    uid: int
    user: str
    gid: int
    admin: Callable[[], bool] = field(compare=False, repr=False)

    @functools.cached_property
    def is_admin(self) -> bool:
        return self.admin()


@dataclass
class Runtime:
    """What the daemon knows of an active job beyond its row; rebuilt by reconcile after a crash."""

    gate: Optional[GatePort] = None
    scope_result: Optional[str] = None
    cancel_start_timer: Optional[Callable[[], None]] = None  # also the wait of a queued job


class Queueing:
    # The manager's, set in its __init__.
    _config: Config
    _store: StorePort
    _scheduler: SchedulerPort
    _clock: Callable[[], float]
    _gpus: Optional[GpuPort]
    _runtime: Dict[int, Runtime]
    _stray_waits: Set[int]
    queue: Dispatcher

    # The manager's transitions and checks.
    def _commit(self, job: Job) -> Job: raise NotImplementedError
    def _end(self, job: Job, outcome: Outcome, ended_at: float) -> None: raise NotImplementedError
    def _abort_start(self, job_id: int, detail: str) -> None: raise NotImplementedError
    def _start_or_abort(self, job: Job, properties: Sequence[Encoded]) -> None: raise NotImplementedError
    def _bind_properties(self, spec: JobSpec) -> List[Encoded]: raise NotImplementedError
    def _job(self, job_id: int) -> Job: raise NotImplementedError
    def _authorize(self, caller: Caller, job: Job, action: str) -> None: raise NotImplementedError

    # -- the queue's actions (gpujobd.daemon.dispatcher) -----------------------------------------
    def start_queued(self, job_id: int, gpus: Tuple[str, ...]) -> None:
        job = self._store.get(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return
        runtime = self._runtime.setdefault(job_id, Runtime())
        if runtime.cancel_start_timer is not None:  # its wait for strays is over
            runtime.cancel_start_timer()
            runtime.cancel_start_timer = None
        self._stray_waits.discard(job_id)
        job = self._commit(transition(job, JobState.STARTING, gpus=tuple(gpus)))
        self.queue.started(job)
        log.info("job.dequeued", job_id=job_id, gpus=list(gpus),
                 waited_s=round(self._clock() - job.created_at, 3))
        try:
            properties = (validate(job.spec, self._config.jobs) + self._bind_properties(job.spec)
                          + device_properties(gpus, self.queue.gpu_minors(), self._config.scheduler))
        except GpujobdError as err:
            self._abort_start(job_id, f"the job cannot start any more: {err}")
            return
        self._start_or_abort(job, properties)

    def fail_dependency(self, job_id: int, detail: str) -> None:
        job = self._store.get(job_id)
        if job is not None and job.state is JobState.QUEUED:
            self._end(job, Outcome(EndReason.DEPENDENCY_FAILED, detail=f"{detail}; it never ran"),
                      self._clock())

    def stray_blockers(self) -> Dict[int, str]:
        """With gpu_check wait, a job without --gpus waits while a stray holds the GPUs it uses: those
        jobs, each with what it waits for."""
        sentences = {}
        for job_id in self._stray_waits:
            job = self._store.get(job_id)
            blockers = self._gpu_blockers(job.spec) if job is not None else []
            if blockers:
                sentences[job_id] = f"strays to leave its GPUs: {describe_strays(blockers)}"
        return sentences

    # -- waiting for GPUs that a stray holds (gpu_check wait) -------------------------------------
    def _gpu_blockers(self, spec: JobSpec) -> List[Dict[str, Any]]:
        """The strays on the GPUs the job will use; none when the GPUs cannot be read now."""
        if self._gpus is None:
            return []
        found = self._gpus.blocking_strays(spec.env.get("CUDA_VISIBLE_DEVICES"))
        if found is None:
            log.warning("job.gpu_check_skipped", reason="the GPUs cannot be read now; see gpujobctl gpus")
            return []
        return found

    def _wait_for_strays(self, job: Job) -> None:
        runtime = self._runtime.setdefault(job.id, Runtime())
        self._stray_waits.add(job.id)
        wait_s = self._config.gpu.prestart_wait_s
        runtime.cancel_start_timer = self._scheduler.call_later(wait_s, lambda: self._gpu_wait_over(job.id))
        log.info("job.waiting_for_gpus", job_id=job.id, wait_s=wait_s)

    def gpus_changed(self) -> None:
        """The watcher has read the GPUs again: GPUs may be free, strays gone."""
        self.queue.gpus_read()

    def _gpu_wait_over(self, job_id: int) -> None:
        job = self._store.get(job_id)
        if job is None or job.state is not JobState.QUEUED or job_id not in self._stray_waits:
            return
        self._stray_waits.discard(job_id)
        blockers = self._gpu_blockers(job.spec)
        if not blockers:
            self.queue.replan()
            return
        self._end(job, Outcome(EndReason.START_FAILED, detail=(
            f"waited {self._config.gpu.prestart_wait_s:g} s (gpu.prestart_wait_s) for its GPUs: "
            f"{describe_strays(blockers)}")), self._clock())

    def resubmit(self, caller: Caller, job_id: int, with_dependents: bool) -> List[Job]:
        """The same spec as a new job; with_dependents, also the jobs that depended on it and did not
        succeed, wired to the new ids (dependencies that succeeded count as met)."""
        job = self._job(job_id)
        self._authorize(caller, job, "resubmit")
        if not job.state.is_final:
            raise InvalidArgument(f"job {job_id} is {job.state.value}: only a job that ended can be "
                                  f"resubmitted (`gpujobctl stop {job_id}` first, or wait for it)")
        new_ids: Dict[int, int] = {}
        created: List[Job] = []
        for old in to_resubmit(job, with_dependents, self._store.dependents,
                               lambda other: caller.uid == other.uid or caller.is_admin):
            new = self._store.create(old.user, old.uid, old.gid, resubmitted_spec(old, new_ids),
                                     self._clock(), state=JobState.QUEUED, resubmit_of=old.id)
            new_ids[old.id] = new.id
            created.append(new)
            self.queue.queued(new)
            log.info("job.resubmitted", job_id=new.id, resubmit_of=old.id, by=caller.user)
        self.queue.replan()
        return [self._job(new.id) for new in created]

    def set_draining(self, caller: Caller, draining: bool) -> None:
        """Drain: start nothing new (running jobs go on, queued ones wait); undrain: start again."""
        if not caller.is_admin:
            raise PermissionDenied(f"only root or a member of group '{self._config.daemon.admin_group}' "
                                   f"may {'drain' if draining else 'undrain'} the server")
        log.info("queue.draining" if draining else "queue.undrained", by=caller.user)
        self.queue.set_draining(draining)

