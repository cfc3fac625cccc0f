"""The job model: pure data, no I/O. Every state change goes through `transition()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from gpujobd.shared.jobspec import JobSpec as JobSpec  # one field per submit option
from gpujobd.shared.states import FINAL_STATES, EndReason, JobState

UNIT_PREFIX = "gpujob-"
UNIT_SUFFIX = ".scope"


# Legal moves. A final state is never left; QUEUED exists for the coming queue/allocation work.
_TRANSITIONS: Mapping[JobState, frozenset] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.STOPPED, JobState.FAILED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.STOPPING} | FINAL_STATES),
    JobState.RUNNING: frozenset({JobState.STOPPING} | FINAL_STATES),
    JobState.STOPPING: FINAL_STATES,
}


@dataclass(frozen=True)
class Outcome:
    """How a job ended. exit_code and signal are separate: exit 137 is not SIGKILL."""

    reason: EndReason
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    detail: str = ""
    leftover_processes: int = 0

    @property
    def succeeded(self) -> bool:
        return self.reason is EndReason.EXIT_CODE and self.exit_code == 0


@dataclass(frozen=True)
class Job:
    id: int
    user: str
    uid: int
    gid: int
    spec: JobSpec
    state: JobState
    created_at: float
    unit: str = ""
    pid: Optional[int] = None  # the supervisor's PID while the job is active
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    outcome: Optional[Outcome] = None
    stopped_by: Optional[str] = None
    runs_done: int = 0  # runs of the command that have ended (background loops count each)
    gpus: Tuple[str, ...] = ()  # the allocated GPUs' UUIDs, from queued -> starting until the end
    array_id: Optional[int] = None  # the array's id (its first task's id); None: not in an array
    array_index: Optional[int] = None
    resubmit_of: Optional[int] = None  # the job this one is a resubmission of

    @property
    def elapsed_s(self) -> Optional[float]:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)

    @property
    def timeout_fraction(self) -> Optional[float]:
        """How far an ended job got towards its timeout (0..1): what a tuner grades a failure by.
        Capped at 1: the stop timeout a SIGTERM-ignoring job adds after its limit is not progress."""
        elapsed = self.elapsed_s
        if elapsed is None or not self.spec.timeout_s:
            return None
        return min(1.0, elapsed / self.spec.timeout_s)


def unit_name(job_id: int) -> str:
    return f"{UNIT_PREFIX}{job_id}{UNIT_SUFFIX}"


def job_id_from_unit(unit: str) -> Optional[int]:
    if not (unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX)):
        return None
    digits = unit[len(UNIT_PREFIX): -len(UNIT_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def final_state_for(outcome: Outcome) -> JobState:
    if outcome.succeeded:
        return JobState.SUCCEEDED
    if outcome.reason is EndReason.STOPPED or outcome.reason is EndReason.BOUND_JOB_ENDED:
        return JobState.STOPPED
    if outcome.reason is EndReason.TIMEOUT:
        return JobState.TIMED_OUT
    if outcome.reason is EndReason.LOST:
        return JobState.LOST
    return JobState.FAILED


class IllegalTransition(ValueError):
    pass


def transition(job: Job, new_state: JobState, **changes: object) -> Job:
    """The only way a job changes state. Refuses illegal moves and states missing their data."""
    if new_state not in _TRANSITIONS.get(job.state, frozenset()):
        raise IllegalTransition(f"job {job.id}: {job.state.value} -> {new_state.value} is not allowed")
    moved = dataclasses.replace(job, state=new_state, **changes)  # type: ignore[arg-type]
    _check_invariants(moved)
    return moved


def _check_invariants(job: Job) -> None:
    if job.state is JobState.RUNNING and (not job.unit or job.started_at is None):
        raise IllegalTransition(f"job {job.id}: running needs a unit and a start time")
    if job.state is JobState.STOPPING and not job.stopped_by:
        raise IllegalTransition(f"job {job.id}: stopping needs who stopped it")
    if job.state.is_final and (job.outcome is None or job.ended_at is None):
        raise IllegalTransition(f"job {job.id}: {job.state.value} needs an outcome and an end time")
    if job.state.is_final and final_state_for(job.outcome) is not job.state:  # type: ignore[arg-type]
        raise IllegalTransition(f"job {job.id}: outcome {job.outcome} does not give {job.state.value}")
