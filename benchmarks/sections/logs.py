"""5. Logs: `gpujobctl logs -f` following a job that writes log_bytes (params; halved if it does not fit).

The job is `head -c SIZE /dev/zero`; the follower starts as soon as submit returned. Measured from
the client side: the bytes `gpujobctl logs -f` wrote to its stdout (counted here) per byte in the log
file, its CPU time (wait4's rusage) and the daemon's CPU time meanwhile (/proc/MainPID/stat), each
per GB. Beside them: `cat` of the same finished log into the same counting pipe, the floor of moving
those bytes from the file to a reader.

Warm-up follows measure the follow rate: the first of log_probe_bytes, each next one 4 times larger,
until one takes an eighth of log_budget_s or reaches log_bytes (a small follow's rate is mostly the
submit and the client's start, and would understate the rate of a large one). If following log_bytes at
the last warm-up's rate would take longer than log_budget_s, the size is halved until it fits, and the
rows name the size followed and say why. While each measured follow runs, a warm client times Get
calls to the daemon, beside the same calls on an idle daemon: what one follower costs everyone else.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Any, Dict, List, Sequence

from benchmarks.params import Params
from benchmarks.stats import HIGHER, Dist, Row, check
from benchmarks.testbed import Testbed, User, cpu_seconds
from benchmarks.timing import run_timed

SECTION = "logs"
GB = 1e9
GIB = 1 << 30
CHUNK = 1 << 20
GET_CALLS = 10  # spread over each measured follow


def run(bed: Testbed, p: Params) -> List[Row]:
    probe = _probe(bed, p)
    size = _fitting_size(p, probe["follow_mb_s"])
    pause = size / 1e6 / probe["follow_mb_s"] / GET_CALLS
    idle_get = _get_latencies(bed, probe["job"], pause=0.0)
    runs = [_follow(bed, size, probe["job"], pause) for _ in range(p.log_runs)]
    shown = _size(size)
    scaled = "" if size == p.log_bytes else (
        f"measured at {shown}, not {_size(p.log_bytes)}: at the warm-up's {probe['follow_mb_s']:.2f} MB/s "
        f"({_size(probe['bytes'])}), {_size(p.log_bytes)} would take "
        f"{p.log_bytes / 1e6 / probe['follow_mb_s']:.0f} s, past the {p.log_budget_s:g} s budget")
    detail = {"runs": runs, "bytes": size, "target_bytes": p.log_bytes, "probe": probe}

    def dist(label: str, unit: str, key: str) -> Dist:
        return Dist(label, unit, [r[key] for r in runs], 1, detail)

    return [
        Row(SECTION, "logs.bytes_ratio", f"`gpujobctl logs -f` on a job writing {shown}: bytes received "
            "per byte in the log", dist("gpujobctl logs -f", "B/B", "ratio"),
            [Dist("limit: each byte once", "B/B", [1.0] * len(runs))], note=scaled),
        Row(SECTION, "logs.follower_cpu", "CPU time of `gpujobctl logs -f`, per GB followed",
            dist("gpujobctl logs -f", "cpu-s/GB", "follower_cpu_per_gb"),
            [dist("cat of the same log into the same pipe", "cpu-s/GB", "cat_cpu_per_gb")]),
        Row(SECTION, "logs.daemon_cpu", "gpujobd's CPU time while it is followed, per GB",
            dist("gpujobd (serving ReadLog)", "cpu-s/GB", "daemon_cpu_per_gb"),
            [dist("cat of the same log into the same pipe", "cpu-s/GB", "cat_cpu_per_gb")]),
        Row(SECTION, "logs.throughput", "follow throughput (submit until the last byte arrived)",
            dist("gpujobctl logs -f", "MB/s", "follow_mb_s"),
            [dist("cat of the same log into the same pipe", "MB/s", "cat_mb_s")], better=HIGHER),
        Row(SECTION, "logs.get_during_follow", "another client's `Get` while one log is followed",
            Dist("Client().get() during logs -f", "s", [x for r in runs for x in r["get_s"]], 1),
            [Dist("Client().get() on the idle daemon", "s", idle_get, 1)], ratio_of="max",
            note="the daemon serves one call at a time; the ratio compares the slowest calls"),
    ]


def _probe(bed: Testbed, p: Params) -> Dict[str, Any]:
    """The warm-up follows, growing x4 until one takes an eighth of the budget: the last one."""
    sizes = [p.log_probe_bytes]
    while True:
        probe = _follow(bed, sizes[-1])
        if sizes[-1] >= p.log_bytes or probe["follow_s"] >= p.log_budget_s / 8:
            return {**probe, "warmup_sizes": sizes}
        sizes.append(min(sizes[-1] * 4, p.log_bytes))


def _size(n_bytes: int) -> str:
    return f"{n_bytes / GIB:g} GiB" if n_bytes >= GIB else f"{n_bytes / (1 << 20):g} MiB"


def _fitting_size(p: Params, mb_s: float) -> int:
    size = p.log_bytes
    while size > p.log_probe_bytes and size / 1e6 / mb_s > p.log_budget_s:
        size //= 2
    return size


def _count(argv: Sequence[str], user: User) -> Dict[str, float]:
    """Run argv as user, count the bytes of its stdout; wall time and its CPU time."""
    started = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, **user.popen_kw())
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    received = 0
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            break
        received += len(chunk)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    check(proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}")
    return {"bytes": received, "seconds": time.perf_counter() - started,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def _get_latencies(bed: Testbed, job_id: int, pause: float) -> List[float]:
    ran = run_timed(bed.agent("get", "--target", "gpujobd", "--job", str(job_id), "--calls",
                              str(GET_CALLS), "--warmup", "1", "--pause", f"{pause:.3f}"), bed.user)
    return json.loads(ran.stdout)["runs"][0]["latencies_s"]


def _follow(bed: Testbed, size: int, get_job: int = 0, pause: float = 0.0) -> Dict[str, Any]:
    daemon = bed.main_pid()
    daemon_cpu = cpu_seconds(daemon)
    started = time.perf_counter()
    job_id = int(run_timed(bed.ctl("submit", "--", "head", "-c", str(size), "/dev/zero"), bed.user)
                 .stdout.split()[0])
    got: List[float] = []
    getter = threading.Thread(target=lambda: got.extend(_get_latencies(bed, get_job, pause)))
    if get_job:
        getter.start()
    follow = _count(bed.ctl("logs", "-f", str(job_id)), bed.user)
    followed = time.perf_counter() - started
    daemon_used = cpu_seconds(daemon) - daemon_cpu
    if get_job:
        getter.join()
    check(bed.client().wait(job_id, raw=True)["state"] == "succeeded", f"log job {job_id} failed")
    log = bed.job_log(job_id)
    on_disk = log.stat().st_size
    check(on_disk == size, f"job {job_id} wrote {on_disk} bytes, not {size}")
    cat = _count(["cat", str(log)], bed.user)
    log.unlink()  # the sandbox's disk is memory
    check(follow["bytes"] == on_disk, f"logs -f received {follow['bytes']} of {on_disk} bytes")
    gb = on_disk / GB
    return {"job": job_id, "bytes": on_disk, "received": follow["bytes"],
            "ratio": follow["bytes"] / on_disk, "follow_s": followed,
            "follower_cpu_per_gb": follow["cpu_s"] / gb, "daemon_cpu_per_gb": daemon_used / gb,
            "cat_cpu_per_gb": cat["cpu_s"] / gb, "follow_mb_s": on_disk / 1e6 / followed,
            "cat_mb_s": on_disk / 1e6 / cat["seconds"], "get_s": got}
