"""benchmarks.seed: the history section's ended jobs, written beside gpujobd's own Store."""

from __future__ import annotations

from pathlib import Path
from typing import List

from benchmarks.seed import seed_ended_jobs
from gpujobd.daemon.store import Store
from gpujobd.shared.model import Job, JobSpec, Outcome, transition, unit_name
from gpujobd.shared.states import EndReason, JobState

NOW = 1_750_000_000.0
HOUR = 3600.0


def ids(jobs: List[Job]) -> List[int]:
    return [job.id for job in jobs]


def test_seed_100k_ended_jobs_then_default_view(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with Store(path) as db:
        running = db.create("alice", 1000, 1000, JobSpec(argv=("true",), cwd="/"), NOW)
        running = transition(running, JobState.RUNNING, started_at=NOW + 1, pid=4242)
        db.save(running)
    seed_ended_jobs(path, 100_000, "bench", 2000, 2000, NOW)
    with Store(path) as db:
        assert db.count_jobs() == 100_001
        # Seeded jobs end 10 s apart, the newest 10 s before NOW: 360 ended in the last hour.
        view = db.list_jobs(include_ended=False, ended_since=NOW - HOUR, user=None, state=None,
                            limit=100_000)
        assert len(view) == 361 and view[0] == running
        assert ids(view[1:]) == list(range(100_001 - 359, 100_002))
        oldest, newest = db.get(2), db.get(100_001)
        assert oldest is not None and newest is not None
        assert newest.unit == unit_name(100_001) and newest.state is JobState.SUCCEEDED
        assert newest.user == "bench" and newest.uid == 2000 and newest.spec.argv == ("true",)
        assert newest.outcome == Outcome(EndReason.EXIT_CODE, exit_code=0)
        assert newest.ended_at == NOW - 10 and newest.started_at is not None
        assert newest.created_at <= newest.started_at <= newest.ended_at
        assert oldest.ended_at == NOW - 100_000 * 10 and oldest.unit == unit_name(2)
        all_view = db.list_jobs(include_ended=True, ended_since=None, user=None, state=None, limit=2)
        assert ids(all_view) == [100_000, 100_001]
        assert ids(db.active_jobs()) == [running.id]


def test_ids_after_a_seed_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    seed_ended_jobs(path, 3, "bench", 2000, 2000, NOW)
    with Store(path) as db:
        assert db.create("alice", 1000, 1000, JobSpec(argv=("true",), cwd="/"), NOW).id == 4
