"""The queue wired into the manager (gpujobd.daemon.dispatcher): allocation, isolation properties,
order, dependencies, arrays, resubmission, drain, and the queue surviving a restart.

The manager runs over test_manager's stateful fakes and a real store; the GPU watcher is a fake with
an inventory the test sets (GPUs, strays, when the reading was taken).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from gpujobd.daemon.manager import Manager
from gpujobd.daemon.store import Store
from gpujobd.shared.config_toml import config_from_mapping
from gpujobd.shared.errors import InvalidArgument, PermissionDenied
from gpujobd.shared.model import Job
from gpujobd.shared.states import EndReason, JobState
from tests.unit import test_manager as tm
from tests.unit.test_manager import ADMIN, OWNER, SECOND, Rig, spec

UUIDS = [f"GPU-{n:08d}-0000-0000-0000-000000000000" for n in range(4)]


class FakeGpus:
    """The watcher: `devices` GPUs (minor = 10 + index, so a test sees minors are not indexes)."""

    def __init__(self, devices: int = 4) -> None:
        self.reason = ""
        self.taken_at = tm.NOW
        self.strays: Dict[str, Tuple[int, ...]] = {}
        self.devices = devices
        self.refreshed = 0
        self.readable = True

    def blocking_strays(self, cuda_visible_devices: Optional[str]) -> Optional[List[Dict[str, Any]]]:
        return []

    def inventory(self) -> Optional[Tuple[float, List[Dict[str, Any]]]]:
        if not self.readable:
            return None
        return self.taken_at, [{"uuid": UUIDS[i], "index": i, "minor": 10 + i, "usable": True,
                                "stray_pids": self.strays.get(UUIDS[i], ())} for i in range(self.devices)]

    def refresh(self) -> None:
        self.refreshed += 1


class Queue:
    """A rig plus its fake GPUs, with shortcuts."""

    def __init__(self, rig: Rig, gpus: FakeGpus) -> None:
        self.rig = rig
        self.gpus = gpus
        self.attach()

    def attach(self) -> Manager:
        rig = self.rig
        rig.manager = Manager(rig.config, rig.store, rig.systemd, rig.files, rig.spawner, rig.scheduler,
                              rig._changed, users=tm.users, clock=rig.clock, gpus=self.gpus)
        rig.systemd.manager = rig.manager
        return rig.manager

    @property
    def manager(self) -> Manager:
        return self.rig.manager

    def submit(self, caller: tm.Caller = OWNER, **fields: Any) -> Job:
        """Submit, and let the main loop run the plan the submit asked for."""
        submitted = self.manager.submit(caller, spec(**fields))
        self.rig.scheduler.run_soon()
        return self.job(submitted.id)

    def submit_all(self, caller: tm.Caller = OWNER, **fields: Any) -> List[Job]:
        submitted = self.manager.submit_all(caller, spec(**fields))
        self.rig.scheduler.run_soon()
        return [self.job(job.id) for job in submitted]

    def job(self, job_id: int) -> Job:
        return self.rig.job(job_id)

    def run(self, job_id: int) -> None:
        """systemd's start job finished: the job runs."""
        self.rig.systemd.finish_start_job(self.job(job_id).unit, "done")

    def end(self, job_id: int, exit_code: int = 0) -> None:
        """The job's command exited and its scope went; then the watcher read the GPUs again."""
        self.rig.files.write_record(job_id, exit_code=exit_code)
        self.rig.systemd.scope_ends(self.job(job_id).unit)
        self.gpus.taken_at = self.rig.clock.advance(1.0)
        self.manager.gpus_changed()

    def wait_of(self, job_id: int) -> Tuple[int, str]:
        wait = self.manager.queue.wait_of(job_id)
        assert wait is not None, f"job {job_id} has no place in the queue"
        return wait.position, wait.waiting_for

    def env(self, job_id: int) -> Dict[str, str]:
        return self.rig.spawner.specs[job_id]["env"]

    def properties(self, job_id: int) -> Dict[str, Any]:
        _pid, properties = self.rig.systemd.scopes[self.job(job_id).unit]
        return {name: value for name, _signature, value in properties}


@pytest.fixture
def make_queue(tmp_path: Path) -> Iterator[Any]:
    opened: List[Rig] = []

    def make(devices: int = 4, **sections: Dict[str, Any]) -> Queue:
        store = Store(tmp_path / f"state-{len(opened)}.sqlite3")
        journal = tm.Journal(store)
        rig = Rig(config=config_from_mapping(sections), store=store, journal=journal, clock=tm.FakeClock(),
                  systemd=tm.FakeSystemd(journal), files=tm.FakeFiles(journal),
                  spawner=tm.FakeSpawner(journal), scheduler=tm.FakeScheduler())
        opened.append(rig)
        return Queue(rig, FakeGpus(devices))

    yield make
    for rig in opened:
        rig.files.close()
        rig.store.close()


@pytest.fixture
def queue(make_queue: Any) -> Queue:
    return make_queue()


# --- allocation and isolation ----------------------------------------------------------------------


def test_a_submit_is_answered_before_its_job_starts_and_submits_together_plan_once(queue: Queue) -> None:
    plans = queue.manager.queue.plans
    first = queue.manager.submit(OWNER, spec())
    second = queue.manager.submit(OWNER, spec())
    assert (first.state, second.state) == (JobState.QUEUED, JobState.QUEUED)
    assert queue.rig.spawner.specs == {} and queue.manager.queue.plans == plans
    queue.rig.scheduler.run_soon()
    assert [queue.job(job.id).state for job in (first, second)] == [JobState.STARTING] * 2
    assert sorted(queue.rig.spawner.specs) == [first.id, second.id]
    assert queue.manager.queue.plans == plans + 1


def test_a_loop_bound_to_a_job_whose_plan_has_not_run_yet_finds_it_started(queue: Queue) -> None:
    foreground = queue.manager.submit(OWNER, spec())
    assert foreground.state is JobState.QUEUED  # answered; the plan is still to run
    loop = queue.manager.submit(OWNER, spec(background=True, bind_to=foreground.id))
    queue.rig.scheduler.run_soon()
    assert queue.job(foreground.id).state is JobState.STARTING
    assert queue.job(loop.id).state is JobState.STARTING


def test_a_job_gets_whole_free_gpus_seen_by_uuid_and_by_its_device_cgroup(queue: Queue) -> None:
    job = queue.submit(gpus=2, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    started = queue.job(job.id)
    assert started.state is JobState.STARTING and started.gpus == (UUIDS[0], UUIDS[1])
    env = queue.env(job.id)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{UUIDS[0]},{UUIDS[1]}", "the daemon's value wins"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    properties = queue.properties(job.id)
    assert properties["DevicePolicy"] == "closed"
    allowed = [path for path, _mode in properties["DeviceAllow"]]
    assert allowed[:2] == ["/dev/nvidia10", "/dev/nvidia11"], "by NVML minor number, not index"
    assert "/dev/nvidiactl" in allowed and "/dev/nvidia-uvm" in allowed
    assert "/dev/nvidia12" not in allowed


def test_a_job_without_gpus_sees_none_by_default(queue: Queue) -> None:
    job = queue.submit()
    assert queue.env(job.id)["CUDA_VISIBLE_DEVICES"] == ""
    properties = queue.properties(job.id)
    assert properties["DevicePolicy"] == "closed" and properties["DeviceAllow"] == []


def test_unrestricted_jobs_without_gpus_get_no_device_cgroup(make_queue: Any) -> None:
    queue = make_queue(scheduler={"jobs_without_gpus": "unrestricted"})
    job = queue.submit(env={"CUDA_VISIBLE_DEVICES": "3"})
    assert queue.env(job.id)["CUDA_VISIBLE_DEVICES"] == "3"
    assert "DevicePolicy" not in queue.properties(job.id)


def test_allocation_is_exclusive_and_the_next_job_starts_when_gpus_are_released(queue: Queue) -> None:
    first = queue.submit(gpus=3)
    second = queue.submit(gpus=2)
    assert queue.job(second.id).state is JobState.QUEUED and queue.job(second.id).gpus == ()
    position, sentence = queue.wait_of(second.id)
    assert position == 1 and sentence.startswith("2 GPUs (1 free; 3 held by job 1")
    queue.run(first.id)
    queue.rig.files.write_record(first.id, exit_code=0)
    queue.rig.systemd.scope_ends(queue.job(first.id).unit)
    assert queue.job(first.id).state is JobState.SUCCEEDED
    assert queue.job(second.id).state is JobState.QUEUED, "released only once NVML saw the GPUs again"
    assert queue.gpus.refreshed == 1, "the end asks the watcher for a reading at once"
    assert "being released" in queue.wait_of(second.id)[1]
    queue.gpus.taken_at = queue.rig.clock.advance(0.5)
    queue.manager.gpus_changed()
    started = queue.job(second.id)
    assert started.state is JobState.STARTING and started.gpus == (UUIDS[0], UUIDS[1])


def test_a_gpu_release_times_out_without_a_reading(queue: Queue) -> None:
    first = queue.submit(gpus=4)
    second = queue.submit(gpus=1)
    queue.run(first.id)
    queue.rig.files.write_record(first.id, exit_code=0)
    queue.rig.systemd.scope_ends(queue.job(first.id).unit)
    assert queue.job(second.id).state is JobState.QUEUED
    queue.gpus.readable = False
    release = [callback for seconds, callback in queue.rig.scheduler.timers.values()
               if seconds == queue.rig.config.scheduler.gpu_release_timeout_s]
    assert len(release) == 1
    queue.gpus.readable = True
    release[0]()
    assert queue.job(second.id).state is JobState.STARTING


def test_a_gpu_with_a_stray_is_not_handed_out(queue: Queue) -> None:
    queue.gpus.strays = {UUIDS[0]: (4242,)}
    job = queue.submit(gpus=4)
    assert queue.job(job.id).state is JobState.QUEUED
    assert "1 with a stray process" in queue.wait_of(job.id)[1]
    behind = queue.submit(gpus=3)
    assert queue.job(behind.id).state is JobState.QUEUED, "without a timeout it could delay job 1"
    short = queue.submit(gpus=1, timeout_s=60.0)
    assert queue.job(short.id).gpus == (UUIDS[1],), "bounded: it may backfill, delaying job 1 by 60 s at most"


def test_asking_for_more_gpus_than_the_server_has_is_refused(queue: Queue) -> None:
    with pytest.raises(InvalidArgument, match="this server has 4 GPUs"):
        queue.submit(gpus=5)


def test_unreadable_gpus_keep_gpu_jobs_queued_and_say_why(queue: Queue) -> None:
    queue.gpus.readable = False
    queue.gpus.reason = "NVML: driver not loaded"
    job = queue.submit(gpus=1)
    cpu = queue.submit()
    assert queue.job(job.id).state is JobState.QUEUED
    assert "NVML: driver not loaded" in queue.wait_of(job.id)[1]
    assert queue.job(cpu.id).state is JobState.STARTING


# --- order, priorities, caps ---------------------------------------------------------------------------


def test_priority_then_fairness_then_submit_time(queue: Queue) -> None:
    holder = queue.submit(gpus=4)
    low = queue.submit(gpus=1, priority=-5)
    mine = [queue.submit(gpus=1) for _ in range(2)]
    theirs = queue.submit(SECOND, gpus=1)
    order = sorted((queue.wait_of(j.id)[0], j.id) for j in (low, *mine, theirs))
    # nobody holds 4 GPUs, daemon none: daemon's job first; priority before all of that.
    assert [job_id for _, job_id in order] == [theirs.id, mine[0].id, mine[1].id, low.id]
    assert holder.id not in [job_id for _, job_id in order]


def test_only_an_admin_may_raise_a_priority(queue: Queue) -> None:
    with pytest.raises(InvalidArgument, match="may raise a job above 0"):
        queue.submit(priority=1)
    assert queue.submit(priority=-1).state is JobState.STARTING


def test_a_users_gpu_cap_keeps_their_next_job_queued(make_queue: Any) -> None:
    queue = make_queue(scheduler={"max_gpus_per_user": 2})
    first = queue.submit(gpus=2)
    second = queue.submit(gpus=1)
    other = queue.submit(SECOND, gpus=1)
    assert queue.job(first.id).state is JobState.STARTING
    assert queue.wait_of(second.id)[1] == "nobody's GPU cap (2)"
    assert queue.job(other.id).state is JobState.STARTING


def test_stop_of_a_queued_job_ends_it_stopped_and_the_queue_moves_on(queue: Queue) -> None:
    queue.submit(gpus=4)
    blocked = queue.submit(gpus=4)
    queue.manager.stop(OWNER, blocked.id)
    stopped = queue.job(blocked.id)
    assert stopped.state is JobState.STOPPED and stopped.outcome is not None
    assert "while it was queued" in stopped.outcome.detail
    assert queue.manager.queue.wait_of(blocked.id) is None


def test_queued_to_starting_is_signalled(queue: Queue) -> None:
    queue.submit(gpus=4)
    second = queue.submit(gpus=1)
    queue.run(1)
    before = len(queue.rig.changes)
    queue.end(1)
    assert (second.id, JobState.STARTING, JobState.STARTING) in queue.rig.changes[before:]


# --- dependencies ---------------------------------------------------------------------------------


def test_after_waits_for_success_and_fails_when_the_dependency_does_not_succeed(queue: Queue) -> None:
    first = queue.submit()
    second = queue.submit(after=(first.id,))
    third = queue.submit(after_any=(first.id,))
    assert queue.wait_of(second.id)[1] == f"job {first.id} to succeed"
    assert queue.wait_of(third.id)[1] == f"job {first.id} to end"
    queue.run(first.id)
    queue.end(first.id, exit_code=3)
    failed = queue.job(second.id)
    assert failed.state is JobState.FAILED and failed.outcome is not None
    assert failed.outcome.reason is EndReason.DEPENDENCY_FAILED and failed.started_at is None
    assert second.id not in queue.rig.spawner.specs, "it never ran"
    assert queue.job(third.id).state is JobState.STARTING


def test_an_unknown_dependency_is_refused_at_submit(queue: Queue) -> None:
    with pytest.raises(InvalidArgument, match="names job 99, which does not exist"):
        queue.submit(after=(99,))


# --- arrays ----------------------------------------------------------------------------------------


def test_an_array_runs_at_most_k_tasks_at_once_with_their_index(queue: Queue) -> None:
    tasks = queue.submit_all(array="0-4%2")
    assert [t.array_index for t in tasks] == [0, 1, 2, 3, 4]
    assert {t.array_id for t in tasks} == {tasks[0].id}
    states = [queue.job(t.id).state for t in tasks]
    assert states == [JobState.STARTING] * 2 + [JobState.QUEUED] * 3
    assert queue.wait_of(tasks[2].id)[1] == "array slot (2 running)"
    env = queue.env(tasks[1].id)
    assert env["GPUJOB_ARRAY_ID"] == str(tasks[0].id) and env["GPUJOB_ARRAY_INDEX"] == "1"
    queue.run(tasks[0].id)
    queue.end(tasks[0].id)
    assert queue.job(tasks[2].id).state is JobState.STARTING


def test_an_array_stagger_spaces_starts_by_timer(queue: Queue) -> None:
    tasks = queue.submit_all(array="0-2", stagger_s=5.0)
    assert [queue.job(t.id).state for t in tasks] == [JobState.STARTING, JobState.QUEUED, JobState.QUEUED]
    assert queue.wait_of(tasks[1].id)[1] == "array stagger (5 s between starts)"
    wakes = [callback for seconds, callback in queue.rig.scheduler.timers.values() if seconds == 5.0]
    assert len(wakes) == 1
    queue.rig.clock.advance(5.0)
    wakes[0]()
    assert queue.job(tasks[1].id).state is JobState.STARTING
    assert queue.job(tasks[2].id).state is JobState.QUEUED


def test_stop_of_an_array_id_stops_every_task(queue: Queue) -> None:
    tasks = queue.submit_all(array="1,3,5%1")
    queue.manager.stop(OWNER, tasks[0].id)
    assert queue.job(tasks[1].id).state is JobState.STOPPED
    assert queue.job(tasks[2].id).state is JobState.STOPPED
    assert queue.job(tasks[0].id).state is JobState.STOPPING


# --- resubmit, drain, restart ----------------------------------------------------------------------


def test_resubmit_with_dependents_resumes_a_pipeline_without_its_finished_stages(queue: Queue) -> None:
    a = queue.submit(name="a")
    b = queue.submit(name="b", after=(a.id,))
    c = queue.submit(name="c", after=(b.id,))
    d = queue.submit(name="d", after=(a.id, c.id))
    queue.run(a.id)
    queue.end(a.id)
    queue.run(b.id)
    queue.end(b.id, exit_code=1)
    assert queue.job(c.id).state is JobState.FAILED and queue.job(d.id).state is JobState.FAILED
    new = queue.manager.resubmit(OWNER, b.id, with_dependents=True)
    assert [job.spec.name for job in new] == ["b", "c", "d"]
    assert [job.resubmit_of for job in new] == [b.id, c.id, d.id]
    nb, nc, nd = new
    assert nb.spec.after == (a.id,), "a succeeded: it counts as met"
    assert nc.spec.after == (nb.id,) and nd.spec.after == (a.id, nc.id)
    assert queue.job(nb.id).state is JobState.STARTING and queue.job(nc.id).state is JobState.QUEUED
    assert a.id not in [job.resubmit_of for job in new]


def test_resubmit_of_a_live_job_is_refused(queue: Queue) -> None:
    job = queue.submit()
    with pytest.raises(InvalidArgument, match="only a job that ended"):
        queue.manager.resubmit(OWNER, job.id, with_dependents=False)


def test_drain_starts_nothing_new_until_undrain_and_survives_a_restart(queue: Queue) -> None:
    with pytest.raises(PermissionDenied):
        queue.manager.set_draining(OWNER, True)
    queue.manager.set_draining(ADMIN, True)
    job = queue.submit(gpus=1)
    assert queue.job(job.id).state is JobState.QUEUED
    assert queue.wait_of(job.id)[1].startswith("the server to be undrained")
    queue.rig.restart()
    queue.attach().reconcile()
    assert queue.job(job.id).state is JobState.QUEUED
    queue.manager.set_draining(ADMIN, False)
    assert queue.job(job.id).state is JobState.STARTING


def test_a_restart_keeps_the_queue_in_order_and_running_jobs_with_their_gpus(queue: Queue) -> None:
    running = queue.submit(gpus=3)
    queue.run(running.id)
    waiting = [queue.submit(gpus=2) for _ in range(3)]
    before = [queue.wait_of(job.id) for job in waiting]
    queue.rig.restart()
    queue.attach().reconcile()
    assert queue.job(running.id).state is JobState.RUNNING and queue.job(running.id).gpus == tuple(UUIDS[:3])
    assert [queue.wait_of(job.id) for job in waiting] == before
    queue.end(running.id)
    assert queue.job(waiting[0].id).state is JobState.STARTING
    assert queue.job(waiting[1].id).state is JobState.STARTING
    assert queue.job(waiting[0].id).gpus != queue.job(waiting[1].id).gpus


# --- start slots (daemon.starts_in_flight_max) ------------------------------------------------------------


def test_starts_beyond_the_start_slots_wait_queued_and_start_as_scopes_become_active(make_queue: Any) -> None:
    queue = make_queue(daemon={"starts_in_flight_max": 2})
    jobs = [queue.submit() for _ in range(5)]
    assert [queue.job(job.id).state for job in jobs] == [JobState.STARTING] * 2 + [JobState.QUEUED] * 3
    assert sorted(queue.rig.spawner.specs) == [jobs[0].id, jobs[1].id], "no supervisor for a queued job"
    assert queue.wait_of(jobs[2].id) == (1, "a start slot (2 jobs starting; daemon.starts_in_flight_max)")
    queue.run(jobs[0].id)  # its scope is active: the job runs and gives its slot back
    queue.rig.scheduler.run_soon()
    assert queue.job(jobs[0].id).state is JobState.RUNNING
    assert [queue.job(job.id).state for job in jobs[1:]] == [JobState.STARTING] * 2 + [JobState.QUEUED] * 2
    assert queue.wait_of(jobs[3].id)[0] == 1 and queue.wait_of(jobs[4].id)[0] == 2  # planned again
    queue.manager.stop(OWNER, jobs[1].id)  # a start that ends another way frees its slot too
    queue.rig.systemd.scope_ends(queue.job(jobs[1].id).unit)
    queue.rig.scheduler.run_soon()
    assert [queue.job(job.id).state for job in jobs[3:]] == [JobState.STARTING, JobState.QUEUED]


# --- --bind-to a job that has not started yet ------------------------------------------------------------


def test_a_loop_bound_to_a_queued_job_waits_for_it_then_starts_bound_to_its_scope(queue: Queue) -> None:
    holder = queue.submit(gpus=4)
    foreground = queue.submit(gpus=2)
    loop = queue.submit(background=True, bind_to=foreground.id)
    assert queue.job(loop.id).state is JobState.QUEUED
    assert queue.wait_of(loop.id)[1] == f"job {foreground.id} to start (--bind-to)"
    queue.run(holder.id)
    queue.end(holder.id)
    assert queue.job(foreground.id).state is JobState.STARTING
    assert queue.job(loop.id).state is JobState.STARTING, "in the same plan as its target"
    properties = queue.properties(loop.id)
    assert properties["BindsTo"] == [queue.job(foreground.id).unit]


def test_a_loop_bound_to_a_queued_job_that_never_starts_fails_without_running(queue: Queue) -> None:
    queue.submit(gpus=4)
    foreground = queue.submit(gpus=2)
    loop = queue.submit(background=True, bind_to=foreground.id)
    queue.manager.stop(OWNER, foreground.id)
    failed = queue.job(loop.id)
    assert failed.state is JobState.FAILED and failed.outcome is not None
    assert failed.outcome.reason is EndReason.DEPENDENCY_FAILED
    assert f"job {foreground.id}, which it is bound to (--bind-to), ended before it could start" in \
        failed.outcome.detail
    assert loop.id not in queue.rig.spawner.specs


@pytest.mark.parametrize(("target", "message"), [
    ("ended", "that job is succeeded; a job can only be bound to one that has not ended"),
    ("missing", "--bind-to 999: there is no such job"),
])
def test_binding_to_an_ended_or_missing_job_is_refused(queue: Queue, target: str, message: str) -> None:
    if target == "ended":
        done = queue.submit()
        queue.run(done.id)
        queue.end(done.id)
        bind_to = done.id
    else:
        bind_to = 999
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        queue.submit(background=True, bind_to=bind_to)
