"""The queue: which waiting jobs start now, on which GPUs, and what every other one waits for.

Pure: `plan(snapshot)` reads a `Snapshot` of everything that decides (the GPUs as NVML last saw them,
the jobs that hold GPUs or slots, the waiting jobs, the ends of the jobs they depend on, the admin's
limits) and returns a `Plan`. The manager builds the snapshot from the store and the watcher, applies
the plan, and calls `plan` again on every event that can change it (a job ended, a GPU was freed or
released, a job was submitted or stopped, a limit was changed, a stagger timer fired): the queue is
driven by events, never by a polling interval.

Order: priority (higher first); then fairness, the user who holds fewer GPUs at that point first (so
one user's stream of submits interleaves with another's); then submit time. A job that waits only for
GPUs reserves them (EASY backfill, as Slurm's backfill scheduler does): jobs behind it may start only
on GPUs it cannot use before it could start anyway — a job with a timeout that ends before the
earliest moment enough GPUs free up (computed from the running jobs' timeouts) may use them, and any
job may use GPUs beyond what the reserving job needs at that moment. A running job without a timeout
is assumed to run forever, so nothing backfills onto GPUs that would wait for it: a big request never
starves behind a stream of small ones.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import AbstractSet, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

INFINITY = float("inf")


@dataclass(frozen=True)
class Gpu:
    """A GPU as the watcher last read it."""

    uuid: str
    index: int
    usable: bool = True  # NVML reads it (not lost, no error)
    minor: Optional[int] = None  # /dev/nvidiaN, for the device cgroup
    stray_pids: Tuple[int, ...] = ()  # processes on it that belong to no live job


@dataclass(frozen=True)
class Holder:
    """A job that holds GPUs (or a slot of its user, or of its array) now."""

    job_id: int
    user: str
    gpus: Tuple[str, ...] = ()
    array_id: Optional[int] = None
    deadline: float = INFINITY  # when its timeout ends it at the latest; no timeout: never
    starting: bool = False  # left the queue, its scope not active yet: it takes a start slot


@dataclass(frozen=True)
class Waiting:
    """A queued job."""

    job_id: int
    user: str
    submitted_at: float
    gpus: int = 0
    priority: int = 0
    after_ok: Tuple[int, ...] = ()  # start once all of these succeeded
    after_any: Tuple[int, ...] = ()  # start once all of these ended, however
    array_id: Optional[int] = None
    array_limit: int = 0  # at most this many of the array's tasks at once; 0: no limit
    stagger_s: float = 0.0  # at least this long between two starts of the array's tasks
    timeout_s: Optional[float] = None
    blocked: Optional[str] = None  # another reason it cannot start now (a stray on the GPUs it uses)
    bound_to: Optional[int] = None  # --bind-to: start only once that job has started


@dataclass(frozen=True)
class Limits:
    max_gpus_per_user: int = 0  # 0: unlimited
    max_jobs_per_user: int = 0  # running jobs (GPU or not); 0: unlimited
    draining: bool = False  # an admin said: start nothing new
    starts_max: int = 0  # jobs starting at once (daemon.starts_in_flight_max); 0: unlimited


@dataclass(frozen=True)
class Snapshot:
    now: float
    gpus: Tuple[Gpu, ...]
    holders: Tuple[Holder, ...]
    waiting: Tuple[Waiting, ...]
    ended: Mapping[int, bool] = field(default_factory=dict)  # job id -> succeeded, for ended jobs
    releasing: Mapping[str, int] = field(default_factory=dict)  # GPU uuid -> the ended job on it
    array_last_start: Mapping[int, float] = field(default_factory=dict)
    limits: Limits = Limits()
    gpu_note: str = ""  # why the GPUs are not known now, for the sentences of jobs that need some


@dataclass(frozen=True)
class Start:
    job_id: int
    gpus: Tuple[str, ...]  # uuids, in index order


@dataclass(frozen=True)
class Fail:
    """A job that can never run: a job it depends on (--after) ended without succeeding."""

    job_id: int
    detail: str


@dataclass(frozen=True)
class Wait:
    job_id: int
    position: int  # 1 = the next to start
    waiting_for: str  # one human sentence


@dataclass(frozen=True)
class Plan:
    starts: Tuple[Start, ...] = ()
    fails: Tuple[Fail, ...] = ()
    waits: Tuple[Wait, ...] = ()
    wake_at: Optional[float] = None  # plan again then (a stagger ends), even with no other event


# --- the pieces, each a pure function -----------------------------------------------------------------


UNMET = "its dependencies"  # what a pending job waits for when the sentence is not asked for


def dependency_verdict(job: Waiting, ended: Mapping[int, bool], started: AbstractSet[int] = frozenset(),
                       describe: bool = True) -> Tuple[Optional[str], Optional[str]]:
    """(failure, pending): why the job can never run, or what it still waits for; (None, None): met.
    `started`: the jobs that hold a slot now (starting or running), for --bind-to. Without `describe`
    a pending job's sentence is UNMET (a plan without waits has no use for it: a thousand jobs
    behind one --after would each format theirs on every event)."""
    if not job.after_ok and not job.after_any and job.bound_to is None:
        return None, None  # most jobs: nothing to look up
    failed = [dep for dep in job.after_ok if dep in ended and not ended[dep]]
    if failed:
        return f"job {_ids(failed)} ended without succeeding", None
    if job.bound_to is not None and job.bound_to in ended:
        return f"job {job.bound_to}, which it is bound to (--bind-to), ended before it could start", None
    pending_ok = [dep for dep in job.after_ok if dep not in ended]
    pending_any = [dep for dep in job.after_any if dep not in ended]
    unstarted = job.bound_to is not None and job.bound_to not in started
    if not describe:
        return None, UNMET if pending_ok or pending_any or unstarted else None
    if pending_ok:
        return None, f"job {_ids(pending_ok)} to succeed"
    if pending_any:
        return None, f"job {_ids(pending_any)} to end"
    if unstarted:
        return None, f"job {job.bound_to} to start (--bind-to)"
    return None, None


def free_gpus(snapshot: Snapshot) -> List[Gpu]:
    """GPUs no job holds, none is being released from, and no stray process is on: in index order."""
    held = {uuid for holder in snapshot.holders for uuid in holder.gpus}
    return sorted((gpu for gpu in snapshot.gpus
                   if gpu.usable and not gpu.stray_pids and gpu.uuid not in held
                   and gpu.uuid not in snapshot.releasing), key=lambda gpu: gpu.index)


def gpu_wait_sentence(need: int, snapshot: Snapshot, free: int) -> str:
    """'2 GPUs (1 free; 3 held by jobs 12, 15; 1 with a stray process)'."""
    holders = sorted({h.job_id for h in snapshot.holders if h.gpus})
    parts = [f"{free} free"]
    held = sum(len(h.gpus) for h in snapshot.holders)
    if held:
        parts.append(f"{held} held by job{'s' if len(holders) > 1 else ''} {_ids(holders)}")
    strays = sum(1 for gpu in snapshot.gpus if gpu.stray_pids)
    if strays:
        parts.append(f"{strays} with a stray process")
    if snapshot.releasing:
        parts.append(f"{len(snapshot.releasing)} being released")
    unusable = sum(1 for gpu in snapshot.gpus if not gpu.usable)
    if unusable:
        parts.append(f"{unusable} unusable")
    if snapshot.gpu_note:
        parts.append(snapshot.gpu_note)
    return f"{need} GPU{'s' if need != 1 else ''} ({'; '.join(parts)})"


@dataclass(frozen=True)
class Reservation:
    """What the first job waiting only for GPUs is owed."""

    job_id: int
    shadow_time: float  # the earliest moment enough GPUs are free for it (INFINITY: not foreseeable)
    spare: int  # GPUs beyond its need at that moment: others may hold them past it


def reservation_for(job: Waiting, free_now: int, holders: Iterable[Holder]) -> Reservation:
    """EASY backfill's reservation: GPUs free up as the running jobs' timeouts end them."""
    available = free_now
    for deadline, count in sorted((h.deadline, len(h.gpus)) for h in holders if h.gpus):
        if deadline == INFINITY:
            break
        available += count
        if available >= job.gpus:
            return Reservation(job.job_id, deadline, available - job.gpus)
    return Reservation(job.job_id, INFINITY, 0)


# --- the plan -----------------------------------------------------------------------------------------


class _Pass:
    """One planning pass: the GPUs and counts as the jobs started in this pass leave them."""

    def __init__(self, snapshot: Snapshot, with_waits: bool = True) -> None:
        self.snapshot = snapshot
        self.with_waits = with_waits
        self.free = free_gpus(snapshot)
        self.user_gpus: Dict[str, int] = {}
        self.user_jobs: Dict[str, int] = {}
        self.array_running: Dict[int, int] = {}
        self.starting = sum(1 for holder in snapshot.holders if holder.starting)
        for holder in snapshot.holders:
            self.user_gpus[holder.user] = self.user_gpus.get(holder.user, 0) + len(holder.gpus)
            self.user_jobs[holder.user] = self.user_jobs.get(holder.user, 0) + 1
            if holder.array_id is not None:
                self.array_running[holder.array_id] = self.array_running.get(holder.array_id, 0) + 1
        self.array_started_now: Set[int] = set()
        self.reservation: Optional[Reservation] = None
        self._sentences: Dict[Tuple[int, int], str] = {}
        self.starts: List[Start] = []
        self.waits: List[Wait] = []
        self.wake_at: Optional[float] = None

    def blocker(self, job: Waiting) -> Optional[str]:
        """What keeps the job from starting now, other than GPUs; None if nothing."""
        limits = self.snapshot.limits
        if limits.draining:
            return "the server to be undrained (an admin stopped new starts)"
        if job.blocked:
            return job.blocked
        if limits.max_jobs_per_user and self.user_jobs.get(job.user, 0) >= limits.max_jobs_per_user:
            return f"{job.user}'s job cap ({limits.max_jobs_per_user})"
        if limits.max_gpus_per_user and job.gpus and \
                self.user_gpus.get(job.user, 0) + job.gpus > limits.max_gpus_per_user:
            return f"{job.user}'s GPU cap ({limits.max_gpus_per_user})"
        array = self._array_blocker(job)
        if array is not None:
            return array
        if limits.starts_max and self.starting >= limits.starts_max:
            return f"a start slot ({self.starting} jobs starting; daemon.starts_in_flight_max)"
        return None

    def _array_blocker(self, job: Waiting) -> Optional[str]:
        if job.array_id is None:
            return None
        running = self.array_running.get(job.array_id, 0)
        if job.array_limit and running >= job.array_limit:
            return f"array slot ({running} running)"
        if job.stagger_s > 0:
            if job.array_id in self.array_started_now:
                self._wake(self.snapshot.now + job.stagger_s)
                return f"array stagger ({job.stagger_s:g} s between starts)"
            last = self.snapshot.array_last_start.get(job.array_id)
            if last is not None and last + job.stagger_s > self.snapshot.now:
                self._wake(last + job.stagger_s)
                return f"array stagger ({job.stagger_s:g} s between starts)"
        return None

    def _wake(self, at: float) -> None:
        self.wake_at = at if self.wake_at is None else min(self.wake_at, at)

    def gpus_for(self, job: Waiting) -> Optional[List[Gpu]]:
        """The GPUs the job may take now without delaying the reservation, or None."""
        if job.gpus > len(self.free):
            return None
        if self.reservation is None or job.gpus == 0:
            return self.free[:job.gpus]
        ends_at = self._ends_at(job)
        if ends_at != INFINITY and ends_at <= self.reservation.shadow_time:
            return self.free[:job.gpus]  # done before the head could start anyway
        if job.gpus <= self.reservation.spare:
            return self.free[:job.gpus]
        return None

    def _ends_at(self, job: Waiting) -> float:
        return self.snapshot.now + job.timeout_s if job.timeout_s is not None else INFINITY

    def start(self, job: Waiting, gpus: Sequence[Gpu]) -> None:
        taken = {gpu.uuid for gpu in gpus}
        self.free = [gpu for gpu in self.free if gpu.uuid not in taken]
        self.user_gpus[job.user] = self.user_gpus.get(job.user, 0) + len(gpus)
        self.user_jobs[job.user] = self.user_jobs.get(job.user, 0) + 1
        if job.array_id is not None:
            self.array_running[job.array_id] = self.array_running.get(job.array_id, 0) + 1
            self.array_started_now.add(job.array_id)
        if self.reservation is not None and self._ends_at(job) > self.reservation.shadow_time:
            self.reservation = Reservation(self.reservation.job_id, self.reservation.shadow_time,
                                           max(0, self.reservation.spare - len(gpus)))
        self.starting += 1
        self.starts.append(Start(job.job_id, tuple(gpu.uuid for gpu in gpus)))

    def wait(self, job: Waiting, sentence: str) -> None:
        if self.with_waits:
            self.waits.append(Wait(job.job_id, len(self.waits) + 1, sentence))

    def no_start_left(self) -> bool:
        """Whether no job at all may start in the rest of this pass (every start slot is taken, or
        the server drains); what each one waits for is then only its sentence."""
        limits = self.snapshot.limits
        return limits.draining or bool(limits.starts_max and self.starting >= limits.starts_max)

    def consider(self, job: Waiting) -> None:
        blocked = self.blocker(job)
        if blocked is not None:
            self.wait(job, blocked)
            return
        gpus = self.gpus_for(job)
        if gpus is not None:
            self.start(job, gpus)
            return
        if self.reservation is None:
            self.reservation = reservation_for(job, len(self.free), self.snapshot.holders)
            self.wait(job, self._gpu_sentence(job.gpus))
        else:
            self.wait(job, self._gpu_sentence(job.gpus) + f", behind job {self.reservation.job_id}")

    def _gpu_sentence(self, need: int) -> str:
        """gpu_wait_sentence, once per (need, free GPUs) in a pass: a long queue asks the same."""
        key = (need, len(self.free))
        sentence = self._sentences.get(key)
        if sentence is None:
            sentence = self._sentences[key] = gpu_wait_sentence(need, self.snapshot, len(self.free))
        return sentence


def queue_order(jobs: Iterable[Waiting], user_gpus: Mapping[str, int]) -> List[Waiting]:
    """Priority, then the user holding fewer GPUs (counting the GPUs of the jobs ordered before),
    then submit time. Pure: the order `plan` considers jobs in when every job could start."""
    return list(_in_queue_order(jobs, user_gpus))


def _in_queue_order(jobs: Iterable[Waiting], user_gpus: Mapping[str, int]) -> Iterator[Waiting]:
    """queue_order, one job at a time: a pass that stops early merges no further. (It reads
    `user_gpus` at the first job, before the pass has started any.)"""
    by_priority: Dict[int, Dict[str, List[Waiting]]] = {}
    for job in sorted(jobs, key=lambda j: (j.submitted_at, j.job_id)):
        by_priority.setdefault(job.priority, {}).setdefault(job.user, []).append(job)
    held = dict(user_gpus)
    for priority in sorted(by_priority, reverse=True):
        queues = {user: list(reversed(q)) for user, q in by_priority[priority].items()}
        heap = [(held.get(user, 0), q[-1].submitted_at, q[-1].job_id, user) for user, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            _, _, _, user = heapq.heappop(heap)
            job = queues[user].pop()
            yield job
            held[user] = held.get(user, 0) + job.gpus
            if queues[user]:
                nxt = queues[user][-1]
                heapq.heappush(heap, (held[user], nxt.submitted_at, nxt.job_id, user))


def plan(snapshot: Snapshot, with_waits: bool = True) -> Plan:
    """What starts now, what can never run, and (with_waits) what every other job waits for, in queue
    order. Without the waits the starts and fails are the same, and the pass stops where no job may
    start any more (every start slot taken, or draining): a queue longer than the start slots costs
    a plan little more than the slots do. The daemon plans so on every event, and for the waits only
    when a client asks for them. A stagger's wake time past that point is left out too: a start slot
    that frees up plans again anyway."""
    fails: List[Fail] = []
    ready: List[Waiting] = []
    pending: List[Tuple[Waiting, str]] = []
    started = {holder.job_id for holder in snapshot.holders}
    for job in snapshot.waiting:
        failure, waiting_for = dependency_verdict(job, snapshot.ended, started, describe=with_waits)
        if failure is not None:
            fails.append(Fail(job.job_id, failure))
        elif waiting_for is not None:
            pending.append((job, waiting_for))
        else:
            ready.append(job)
    state = _Pass(snapshot, with_waits)
    for job in _in_queue_order(ready, state.user_gpus):
        if not with_waits and state.no_start_left():
            break
        state.consider(job)
    if with_waits:
        by_turn = sorted(pending, key=lambda p: (-p[0].priority, p[0].submitted_at, p[0].job_id))
        for job, waiting_for in by_turn:
            state.wait(job, waiting_for)
    return Plan(tuple(state.starts), tuple(fails), tuple(state.waits), state.wake_at)


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids)
