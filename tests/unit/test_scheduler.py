"""gpujobd.daemon.scheduler: the queue's order and the GPU allocator, as pure functions of snapshots."""

from __future__ import annotations

import dataclasses
import random

import pytest

from gpujobd.daemon.scheduler import (
    INFINITY,
    UNMET,
    Gpu,
    Holder,
    Limits,
    Snapshot,
    Waiting,
    dependency_verdict,
    free_gpus,
    plan,
    queue_order,
    reservation_for,
)

NOW = 1_000.0


def gpus(n: int) -> tuple:
    return tuple(Gpu(f"GPU-{i}", i) for i in range(n))


def waiting(job_id: int, user: str = "alice", **kw) -> Waiting:
    return Waiting(job_id=job_id, user=user, submitted_at=kw.pop("submitted_at", float(job_id)), **kw)


def snap(**kw) -> Snapshot:
    kw.setdefault("now", NOW)
    kw.setdefault("gpus", gpus(4))
    kw.setdefault("holders", ())
    kw.setdefault("waiting", ())
    return Snapshot(**kw)


def started(p) -> dict:
    return {s.job_id: s.gpus for s in p.starts}


def waits(p) -> dict:
    return {w.job_id: w.waiting_for for w in p.waits}


# --- free GPUs and allocation ----------------------------------------------------------------------------


def test_a_gpu_held_released_strayed_or_unusable_is_not_free():
    s = snap(gpus=(Gpu("GPU-0", 0), Gpu("GPU-1", 1), Gpu("GPU-2", 2, stray_pids=(4242,)),
                   Gpu("GPU-3", 3, usable=False), Gpu("GPU-4", 4)),
        holders=(Holder(7, "bob", ("GPU-0",)),), releasing={"GPU-4": 6})
    assert [g.uuid for g in free_gpus(s)] == ["GPU-1"]


def test_free_gpus_come_in_index_order_whatever_nvml_listed_first():
    s = snap(gpus=(Gpu("B", 1), Gpu("C", 2), Gpu("A", 0)))
    assert [g.uuid for g in free_gpus(s)] == ["A", "B", "C"]


def test_jobs_started_in_one_pass_never_share_a_gpu():
    p = plan(snap(waiting=(waiting(1, gpus=2), waiting(2, "bob", gpus=1), waiting(3, "carol", gpus=1))))
    assert started(p) == {1: ("GPU-0", "GPU-1"), 2: ("GPU-2",), 3: ("GPU-3",)}
    assert p.waits == () and p.fails == ()


def test_a_job_waits_with_a_sentence_naming_the_holders():
    s = snap(gpus=gpus(4), holders=(Holder(12, "bob", ("GPU-0", "GPU-1")), Holder(15, "bob", ("GPU-2",))),
             waiting=(waiting(20, gpus=2),))
    p = plan(s)
    assert p.starts == ()
    assert waits(p) == {20: "2 GPUs (1 free; 3 held by jobs 12, 15)"}


def test_the_sentence_counts_strays_and_gpus_being_released():
    s = snap(gpus=(Gpu("GPU-0", 0, stray_pids=(9,)), Gpu("GPU-1", 1)), releasing={"GPU-1": 3},
             waiting=(waiting(4, gpus=1),))
    assert waits(plan(s)) == {4: "1 GPU (0 free; 1 with a stray process; 1 being released)"}


def test_jobs_without_gpus_start_even_when_every_gpu_is_held():
    s = snap(gpus=gpus(1), holders=(Holder(1, "bob", ("GPU-0",)),), waiting=(waiting(2, gpus=0),))
    assert started(plan(s)) == {2: ()}


# --- order --------------------------------------------------------------------------------------------


def test_higher_priority_starts_first_whatever_its_submit_time():
    s = snap(gpus=gpus(1), waiting=(waiting(1, gpus=1), waiting(2, "bob", gpus=1, priority=5)))
    p = plan(s)
    assert started(p) == {2: ("GPU-0",)}
    assert [w.job_id for w in p.waits] == [1] and p.waits[0].position == 1


def test_at_equal_priority_the_user_holding_fewer_gpus_goes_first():
    s = snap(gpus=gpus(3), holders=(Holder(1, "alice", ("GPU-0", "GPU-1")),),
             waiting=(waiting(5, "alice", gpus=1), waiting(6, "bob", gpus=1)))
    assert started(plan(s)) == {6: ("GPU-2",)}


def test_two_users_streams_interleave_by_what_each_holds():
    jobs = [waiting(i, "alice", gpus=1) for i in range(1, 5)] + \
           [waiting(i, "bob", gpus=1, submitted_at=100.0 + i) for i in range(5, 9)]
    order = [j.job_id for j in queue_order(jobs, {})]
    assert order == [1, 5, 2, 6, 3, 7, 4, 8]


def test_positions_follow_the_queue_order():
    s = snap(gpus=gpus(1), holders=(Holder(1, "carol", ("GPU-0",)),),
             waiting=(waiting(3, gpus=1), waiting(2, gpus=1, priority=1), waiting(4, "bob", gpus=1)))
    # Priority first; then bob (holding nothing) before alice, whose job 2 is ahead of her job 3.
    assert [(w.job_id, w.position) for w in plan(s).waits] == [(2, 1), (4, 2), (3, 3)]


# --- starvation: the head's reservation and backfill ---------------------------------------------------


def test_a_big_request_is_not_starved_by_a_stream_of_small_ones():
    # 4 GPUs, 2 held by a job without a timeout: the 4-GPU head cannot start; small jobs behind it
    # without a timeout would hold the free GPUs past any moment it could start: they wait.
    s = snap(holders=(Holder(1, "bob", ("GPU-0", "GPU-1")),),
             waiting=(waiting(2, gpus=4), waiting(3, "carol", gpus=1), waiting(4, "dave", gpus=1)))
    p = plan(s)
    assert p.starts == ()
    assert waits(p)[3].endswith("behind job 2")


def test_backfill_a_job_that_ends_before_the_head_could_start():
    # The holder's timeout frees its GPUs at NOW+600: a 1-GPU job with a 300 s timeout ends first.
    s = snap(holders=(Holder(1, "bob", ("GPU-0", "GPU-1"), deadline=NOW + 600),),
             waiting=(waiting(2, gpus=4), waiting(3, "carol", gpus=1, timeout_s=300),
                      waiting(4, "dave", gpus=1, timeout_s=900)))
    p = plan(s)
    assert started(p) == {3: ("GPU-2",)}
    assert 4 in waits(p)


def test_backfill_onto_gpus_the_head_will_not_need():
    # 4 GPUs free at NOW+600 for a 3-GPU head: one GPU to spare, usable by a job of any length.
    s = snap(holders=(Holder(1, "bob", ("GPU-0", "GPU-1"), deadline=NOW + 600),),
             waiting=(waiting(2, gpus=3), waiting(3, "carol", gpus=1), waiting(4, "dave", gpus=1)))
    p = plan(s)
    assert started(p) == {3: ("GPU-2",)}
    assert 4 in waits(p)


def test_reservation_counts_gpus_freed_in_deadline_order():
    holders = [Holder(1, "a", ("G0",), deadline=NOW + 50), Holder(2, "b", ("G1", "G2"), deadline=NOW + 20),
               Holder(3, "c", ("G3",), deadline=INFINITY)]
    r = reservation_for(waiting(9, gpus=3), 0, holders)
    assert (r.shadow_time, r.spare) == (NOW + 50, 0)
    assert reservation_for(waiting(9, gpus=4), 0, holders).shadow_time == INFINITY


# --- dependencies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ended, failure, pending", [
    ({}, None, "job 1, 2 to succeed"),
    ({1: True}, None, "job 2 to succeed"),
    ({1: True, 2: True}, None, None),
    ({1: True, 2: False}, "job 2 ended without succeeding", None),
])
def test_after_ok(ended, failure, pending):
    assert dependency_verdict(waiting(5, after_ok=(1, 2)), ended) == (failure, pending)


def test_after_any_waits_for_the_end_not_the_success():
    job = waiting(5, after_any=(1,))
    assert dependency_verdict(job, {}) == (None, "job 1 to end")
    assert dependency_verdict(job, {1: False}) == (None, None)


def test_a_failed_dependency_fails_the_job_and_it_holds_nothing():
    s = snap(waiting=(waiting(5, gpus=1, after_ok=(1,)), waiting(6, gpus=4)), ended={1: False})
    p = plan(s)
    assert [f.job_id for f in p.fails] == [5]
    assert started(p) == {6: ("GPU-0", "GPU-1", "GPU-2", "GPU-3")}


def test_a_job_waiting_on_a_dependency_reserves_nothing():
    s = snap(gpus=gpus(1), waiting=(waiting(5, gpus=1, after_ok=(1,), priority=9), waiting(6, "bob", gpus=1)))
    p = plan(s)
    assert started(p) == {6: ("GPU-0",)} and waits(p) == {5: "job 1 to succeed"}


# --- caps, arrays, drain ---------------------------------------------------------------------------------


def test_gpu_cap_per_user():
    s = snap(holders=(Holder(1, "alice", ("GPU-0",)),), limits=Limits(max_gpus_per_user=2),
             waiting=(waiting(2, gpus=1), waiting(3, gpus=1), waiting(4, "bob", gpus=2)))
    p = plan(s)
    assert started(p) == {4: ("GPU-1", "GPU-2"), 2: ("GPU-3",)}
    assert waits(p) == {3: "alice's GPU cap (2)"}


def test_job_cap_per_user_counts_jobs_without_gpus():
    s = snap(holders=(Holder(1, "alice"),), limits=Limits(max_jobs_per_user=2),
             waiting=(waiting(2), waiting(3)))
    p = plan(s)
    assert started(p) == {2: ()} and waits(p) == {3: "alice's job cap (2)"}


def test_array_limit_runs_at_most_k_tasks():
    tasks = tuple(waiting(10 + i, gpus=0, array_id=10, array_limit=4) for i in range(20))
    s = snap(holders=(Holder(10, "alice", array_id=10),), waiting=tasks[1:])
    p = plan(s)
    assert len(p.starts) == 3
    assert set(waits(p).values()) == {"array slot (4 running)"}


def test_stagger_spaces_an_arrays_starts_and_asks_to_be_woken():
    tasks = tuple(waiting(10 + i, gpus=0, array_id=10, stagger_s=2.0) for i in range(3))
    p = plan(snap(waiting=tasks))
    assert [s.job_id for s in p.starts] == [10] and p.wake_at == NOW + 2.0
    later = plan(snap(waiting=tasks[1:], array_last_start={10: NOW - 0.5}))
    assert later.starts == () and later.wake_at == NOW + 1.5


def test_draining_starts_nothing():
    p = plan(snap(waiting=(waiting(1, gpus=1), waiting(2)), limits=Limits(draining=True)))
    assert p.starts == () and len(p.waits) == 2
    assert all("undrained" in w.waiting_for for w in p.waits)


# --- invariants over random snapshots ---------------------------------------------------------------------


def _random_snapshot(rng: random.Random) -> Snapshot:
    n = rng.randint(0, 8)
    all_gpus = tuple(Gpu(f"GPU-{i}", i, usable=rng.random() > 0.1,
                         stray_pids=(1000 + i,) if rng.random() < 0.1 else ()) for i in range(n))
    pool = [g.uuid for g in all_gpus]
    rng.shuffle(pool)
    users = ["alice", "bob", "carol"]
    holders, next_id = [], 1
    while pool and rng.random() < 0.6:
        take = [pool.pop() for _ in range(min(len(pool), rng.randint(1, 3)))]
        holders.append(Holder(next_id, rng.choice(users), tuple(take),
                              deadline=rng.choice([INFINITY, NOW + rng.uniform(1, 1000)])))
        next_id += 1
    releasing = {pool.pop(): 0} if pool and rng.random() < 0.3 else {}
    jobs = []
    for _ in range(rng.randint(0, 15)):
        after = tuple(rng.sample(range(1, next_id + 3), rng.randint(0, 2))) if rng.random() < 0.3 else ()
        jobs.append(Waiting(next_id, rng.choice(users), rng.uniform(0, 100), gpus=rng.randint(0, 3),
                            priority=rng.choice([0, 0, 1, -1]), after_ok=after,
                            array_id=1 if rng.random() < 0.3 else None, array_limit=2,
                            timeout_s=rng.choice([None, rng.uniform(1, 2000)])))
        next_id += 1
    ended = {i: rng.random() < 0.7 for i in range(1, next_id) if rng.random() < 0.3}
    return Snapshot(now=NOW, gpus=all_gpus, holders=tuple(holders), waiting=tuple(jobs), ended=ended,
                    releasing=releasing, limits=Limits(max_gpus_per_user=rng.choice([0, 2, 4]),
                                                       max_jobs_per_user=rng.choice([0, 3])))


@pytest.mark.parametrize("seed", range(300))
def test_random_snapshots_keep_every_invariant(seed):
    s = _random_snapshot(random.Random(seed))
    p = plan(s)
    accounted = [x.job_id for x in p.starts] + [x.job_id for x in p.fails] + [x.job_id for x in p.waits]
    assert sorted(accounted) == sorted(j.job_id for j in s.waiting)  # each job exactly once
    assert [w.position for w in p.waits] == list(range(1, len(p.waits) + 1))
    allocated = [uuid for start in p.starts for uuid in start.gpus]
    assert len(allocated) == len(set(allocated))  # no GPU twice
    free = {g.uuid for g in free_gpus(s)}
    assert set(allocated) <= free  # never a held, released, strayed or unusable GPU
    by_id = {j.job_id: j for j in s.waiting}
    for start in p.starts:
        job = by_id[start.job_id]
        assert len(start.gpus) == job.gpus
        assert all(s.ended.get(dep) is True for dep in job.after_ok)
    for user in {j.user for j in s.waiting}:
        held = sum(len(h.gpus) for h in s.holders if h.user == user)
        new = sum(len(x.gpus) for x in p.starts if by_id[x.job_id].user == user)
        if s.limits.max_gpus_per_user and new:
            assert held + new <= s.limits.max_gpus_per_user
        if s.limits.max_jobs_per_user:
            running = sum(1 for h in s.holders if h.user == user)
            started_now = sum(1 for x in p.starts if by_id[x.job_id].user == user)
            assert started_now == 0 or running + started_now <= s.limits.max_jobs_per_user
    array_now = sum(1 for h in s.holders if h.array_id == 1) + \
        sum(1 for x in p.starts if by_id[x.job_id].array_id == 1)
    assert array_now <= max(2, sum(1 for h in s.holders if h.array_id == 1))


def _random_slotted_snapshot(rng: random.Random) -> Snapshot:
    """A random snapshot with start slots, some taken, arrays with a stagger, and draining now and
    then: what ends a pass without waits early."""
    s = _random_snapshot(rng)
    holders = tuple(dataclasses.replace(h, starting=rng.random() < 0.5,
                                        array_id=1 if rng.random() < 0.2 else None) for h in s.holders)
    jobs = tuple(dataclasses.replace(j, stagger_s=rng.choice([0.0, 0.0, 5.0])) for j in s.waiting)
    limits = dataclasses.replace(s.limits, starts_max=rng.choice([0, 1, 2, 3, 5]),
                                 draining=rng.random() < 0.1)
    return dataclasses.replace(s, holders=holders, waiting=jobs, limits=limits,
                               array_last_start={1: NOW - rng.uniform(0, 10)})


@pytest.mark.parametrize("seed", range(300))
def test_a_plan_without_waits_starts_and_fails_exactly_what_the_full_plan_does(seed):
    s = _random_slotted_snapshot(random.Random(seed))
    full, lean = plan(s), plan(s, with_waits=False)
    assert (lean.starts, lean.fails, lean.waits) == (full.starts, full.fails, ())
    if not s.limits.starts_max and not s.limits.draining:
        assert lean.wake_at == full.wake_at  # the pass ran to its end: the same wake
    started_ids = {h.job_id for h in s.holders}
    for job in s.waiting:
        failure, pending = dependency_verdict(job, s.ended, started_ids)
        assert dependency_verdict(job, s.ended, started_ids, describe=False) == (
            failure, UNMET if pending is not None else None)


def test_a_plan_without_waits_starts_what_the_slots_allow_and_lists_no_wait():
    s = snap(holders=(Holder(1, "alice", starting=True),),
             waiting=tuple(waiting(i) for i in range(5, 5 + 500)), limits=Limits(starts_max=3))
    lean = plan(s, with_waits=False)
    assert list(started(lean)) == [5, 6] and lean.waits == ()
    assert len(plan(s).waits) == 498


# --- start slots (daemon.starts_in_flight_max) and --bind-to --------------------------------------------


def test_starts_stop_at_the_start_slots_and_the_rest_wait_in_order():
    s = snap(holders=(Holder(1, "alice", starting=True), Holder(2, "bob")),
             waiting=tuple(waiting(i) for i in (5, 6, 7)), limits=Limits(starts_max=3))
    p = plan(s)
    assert list(started(p)) == [5, 6], "one slot is taken by job 1; a running job (2) takes none"
    assert [(w.job_id, w.position) for w in p.waits] == [(7, 1)]
    assert waits(p)[7] == "a start slot (3 jobs starting; daemon.starts_in_flight_max)"


def test_no_start_cap_when_the_limit_is_zero():
    s = snap(holders=tuple(Holder(i, "alice", starting=True) for i in range(1, 100)),
             waiting=(waiting(500),))
    assert list(started(plan(s))) == [500]


def test_a_job_bound_to_a_queued_one_waits_for_it_to_start():
    s = snap(waiting=(waiting(5, gpus=4, priority=0), waiting(6, bound_to=5, priority=9),
                      waiting(7, bound_to=3)), holders=(Holder(3, "alice", gpus=("GPU-0",)),))
    p = plan(s)
    assert 6 not in started(p) and waits(p)[6] == "job 5 to start (--bind-to)"
    assert 7 in started(p), "its target (3) holds a slot: it has started"


def test_a_job_bound_to_one_that_ended_before_it_could_start_fails():
    s = snap(waiting=(waiting(6, bound_to=5),), ended={5: True})
    p = plan(s)
    assert [(f.job_id, f.detail) for f in p.fails] == [
        (6, "job 5, which it is bound to (--bind-to), ended before it could start")]
    assert started(p) == {}
