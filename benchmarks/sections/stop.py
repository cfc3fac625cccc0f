"""3. Stop: a job that built a 500-process tree, from `gpujobctl stop` until its cgroup is empty and the
job is recorded stopped; beside it `systemctl stop` of a `systemd-run --scope` running the same tree.

The tree (tree.sh) is a fork chain fanned out at every link, half of it setsid, half double-forked;
in one variant 1 process in 10 ignores SIGTERM, so the stop takes systemd's SIGTERM -> SIGKILL grace:
jobs.stop_timeout_s for gpujobd, TimeoutStopSec= (set to the same value) for the raw scope. After
each stop no process of the tree may be left anywhere.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path
from typing import Callable, List

from benchmarks.params import Params
from benchmarks.stats import Dist, Row, check
from benchmarks.testbed import CGROUP_ROOT, Testbed, cgroup_pids, cgroup_populated, processes_matching
from benchmarks.timing import run_timed

SECTION = "stop"
MARK_BASE = 7700  # sleep time and marker: 7701, 7702, ... one per tree
WAIT_S = 120.0


def run(bed: Testbed, p: Params) -> List[Row]:
    rows = []
    for ignore in (True, False):
        what = (f"{p.tree_levels * 10}-process tree, {p.tree_levels} ignore SIGTERM" if ignore
                else f"{p.tree_levels * 10}-process tree, none ignores SIGTERM")
        ours = _repeat(f"gpujobctl stop ({what})", _stop_job, bed, p, ignore)
        raw = _repeat(f"systemctl stop of a systemd-run --scope ({what})", _stop_raw, bed, p, ignore)
        timeout = f" (jobs.stop_timeout_s = {p.stop_timeout_s:g} s, TimeoutStopSec= the same)"
        rows.append(Row(SECTION, "stop.ignoring" if ignore else "stop.plain",
                        f"stop a {what}: until the cgroup is empty and the job recorded stopped"
                        + (timeout if ignore else ""), ours, [raw],
                        note="0 survivors checked after every stop"))
    return rows


def _repeat(label: str, stop: Callable[[Testbed, Params, bool], float], bed: Testbed, p: Params,
            ignore: bool) -> Dist:
    samples = [stop(bed, p, ignore) for _ in range(p.stop_warmup + p.stop_runs)][p.stop_warmup:]
    return Dist(label, "s", samples, p.stop_warmup)


_marks = iter(range(MARK_BASE + 1, MARK_BASE + 1000))


def _tree_argv(bed: Testbed, p: Params, ignore: bool, mark: int) -> List[str]:
    return ["sh", str(bed.workdir / "tree.sh"), str(p.tree_levels), "1" if ignore else "0", str(mark)]


def _wait_tree(cgroup: Path, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(cgroup_pids(cgroup)) < count:
        check(time.monotonic() < deadline, f"{cgroup} never reached {count} processes")
        time.sleep(0.01)
    time.sleep(0.2)  # let the last forks settle: everything is up and waiting


def _wait_empty(cgroup: Path) -> float:
    """Until the kernel reports the cgroup empty (or it is gone); returns the time it was seen."""
    deadline = time.monotonic() + WAIT_S
    try:
        fd = os.open(cgroup / "cgroup.events", os.O_RDONLY)
    except FileNotFoundError:
        return time.perf_counter()
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while cgroup_populated(cgroup):
            check(time.monotonic() < deadline, f"{cgroup} still populated after {WAIT_S}s")
            poller.poll(10)
        return time.perf_counter()
    finally:
        os.close(fd)


def _no_survivors(mark: int) -> None:
    left = processes_matching(f"sleep {mark}") + processes_matching(f"tree.sh {mark}")
    check(not left, f"{len(left)} processes of tree {mark} survived the stop: {left[:10]}")


def _stop_job(bed: Testbed, p: Params, ignore: bool) -> float:
    mark = next(_marks)
    job_id = int(run_timed(bed.ctl("submit", "--", *_tree_argv(bed, p, ignore, mark)), bed.user)
                 .stdout.split()[0])
    cgroup = bed.scope_cgroup(f"gpujob-{job_id}.scope")
    _wait_tree(cgroup, p.tree_levels * 10 + 1)  # + the supervisor
    started = time.perf_counter()
    run_timed(bed.ctl("stop", str(job_id)), bed.user)
    empty = _wait_empty(cgroup)
    job = bed.client().wait(job_id, raw=True)
    recorded = time.perf_counter()
    check(job["state"] == "stopped", f"job {job_id} ended {job['state']}, not stopped")
    _no_survivors(mark)
    return max(empty, recorded) - started


def _stop_raw(bed: Testbed, p: Params, ignore: bool) -> float:
    mark = next(_marks)
    unit = f"gjbench-stop-{mark}.scope"
    proc = subprocess.Popen(
        ["systemd-run", "--scope", "-q", f"--unit={unit}", f"--property=TimeoutStopSec={p.stop_timeout_s}",
         f"--uid={bed.user.name}", f"--gid={bed.user.name}", "--", *_tree_argv(bed, p, ignore, mark)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=bed.user.home)
    cgroup = CGROUP_ROOT / "system.slice" / unit
    _wait_tree(cgroup, p.tree_levels * 10)
    started = time.perf_counter()
    run_timed(["systemctl", "stop", unit])
    empty = _wait_empty(cgroup)
    proc.wait(timeout=WAIT_S)
    _no_survivors(mark)
    return empty - started
