#!/usr/bin/env python3
"""Write tests/data/state-v1.sqlite3: a frozen job database of schema version 1.

The file is committed and tests/unit/test_store.py checks that every future gpujobd still reads it
correctly. It was generated once; regenerating it defeats its purpose, so this script refuses to
overwrite it unless given --force, and refuses to run at all once the code's schema is past version 1
(it would no longer write a version 1 file).

    python tests/data/make_state_v1.py [--force] [PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from gpujobd.daemon import store, store_schema
from gpujobd.shared.model import Job, JobSpec, Outcome, transition
from gpujobd.shared.states import EndReason, JobState

DEFAULT_PATH = Path(__file__).resolve().parent / "state-v1.sqlite3"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z; every time in the file is T0 + a few seconds


def _spec(*argv: str, **fields: object) -> JobSpec:
    return JobSpec(argv=argv, cwd=str(fields.pop("cwd", "/home/alice")), **fields)  # type: ignore[arg-type]


def _run(db: store.Store, job: Job, started_at: float, pid: int) -> Job:
    job = transition(job, JobState.RUNNING, started_at=started_at, pid=pid)
    db.save(job)
    return job


def _end(db: store.Store, job: Job, state: JobState, ended_at: float, outcome: Outcome,
         stopped_by: Optional[str] = None) -> Job:
    changes = {"ended_at": ended_at, "outcome": outcome, "pid": None}
    if stopped_by is not None:
        changes["stopped_by"] = stopped_by
    job = transition(job, state, **changes)
    db.save(job)
    return job


def populate(db: store.Store) -> List[Job]:
    """Eleven jobs, one per state and most end reasons, ids 1..11 in this order."""
    new = db.create
    jobs = [
        new("alice", 1000, 1000, _spec("python3", "train.py", "--epochs", "10"), T0 + 1,
            state=JobState.QUEUED),
        new("bob", 1001, 1001, _spec("sleep", "600", cwd="/home/bob"), T0 + 2),
    ]
    running = new("alice", 1000, 1000, _spec("nvidia-smi", "-l", "1", timeout_s=3600.0), T0 + 3)
    jobs.append(_run(db, running, T0 + 3.5, 4242))
    stopping = _run(db, new("bob", 1001, 1001, _spec("bash", "-c", "sleep 1000", cwd="/tmp"), T0 + 4),
                    T0 + 4.5, 4343)
    stopping = transition(stopping, JobState.STOPPING, stopped_by="carol")
    db.save(stopping)
    jobs.append(stopping)

    def ended(user: str, uid: int, spec: JobSpec, second: float, state: JobState, outcome: Outcome,
              stopped_by: Optional[str] = None) -> Job:
        job = _run(db, new(user, uid, uid, spec, T0 + second), T0 + second + 0.25, 5000 + int(second))
        return _end(db, job, state, T0 + second + 2.5, outcome, stopped_by)

    exit_ok = Outcome(EndReason.EXIT_CODE, exit_code=0)
    jobs += [
        ended("alice", 1000, _spec("true"), 5, JobState.SUCCEEDED, exit_ok),
        ended("bob", 1001, _spec("false", name="fails"), 6, JobState.FAILED,
              Outcome(EndReason.EXIT_CODE, exit_code=3, detail="exited with status 3")),
        ended("alice", 1000, _spec("python3", "big.py"), 7, JobState.FAILED,
              Outcome(EndReason.OOM_KILL, signal=9, detail="the OOM killer ended python3 (pid 5007)")),
        ended("alice", 1000, _spec("sleep", "infinity"), 8, JobState.STOPPED,
              Outcome(EndReason.STOPPED, signal=15, leftover_processes=1), stopped_by="alice"),
        ended("bob", 1001, _spec("sleep", "100", timeout_s=2.0), 9, JobState.TIMED_OUT,
              Outcome(EndReason.TIMEOUT, signal=15, detail="RuntimeMaxSec=2s reached",
                      leftover_processes=2)),
        ended("carol", 1002, _spec("make", cwd="/srv/build"), 10, JobState.LOST,
              Outcome(EndReason.LOST, detail="the daemon restarted and the scope was gone")),
    ]
    unicode_spec = JobSpec(
        argv=("./run me.sh", "données d'entrée.txt", "--label=日本語", ""),
        cwd="/home/alice/mes projets",
        env={"LANG": "C.UTF-8", "GREETING": "héllo wörld = 1", "EMPTY": ""},
        name="ünïcode job",
        properties={"MemoryMax": "8G", "CPUQuota": "200%"},
        timeout_s=90.5,
    )
    starting = new("alice", 1000, 1000, unicode_spec, T0 + 11)
    jobs.append(_end(db, starting, JobState.FAILED, T0 + 11.5,
                     Outcome(EndReason.EXEC_FAILED, exit_code=203, detail="./run me.sh: not found")))
    db.record_run(5, 1, T0 + 5.25, T0 + 6.0, 0, None, EndReason.EXIT_CODE, "")
    db.record_run(5, 2, T0 + 6.5, T0 + 7.5, None, 9, EndReason.SIGNAL, "killed by SIGKILL")
    return jobs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.path.exists() and not args.force:
        print(f"{args.path} exists and is frozen; use --force to overwrite it", file=sys.stderr)
        return 1
    if store_schema.SCHEMA_VERSION != 1:
        print(f"the code writes schema version {store_schema.SCHEMA_VERSION}, not 1; the v1 fixture is"
              " frozen", file=sys.stderr)
        return 1
    for suffix in ("", "-wal", "-shm"):
        Path(f"{args.path}{suffix}").unlink(missing_ok=True)
    with store.Store(args.path) as db:
        jobs = populate(db)
    print(f"wrote {len(jobs)} jobs to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
