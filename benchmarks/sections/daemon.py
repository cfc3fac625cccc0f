"""6. The daemon at rest and under load: CPU time idle with 0 and 100 running jobs, D-Bus Get rate.

CPU is utime + stime from /proc/<MainPID>/stat, read at the edges of consecutive windows; each window
is one sample, as % of one core. systemd (PID 1 of the sandbox) in the same windows stands beside it.
Get: warm clients (agent.py get) calling gpujobd's Get in a loop, one client and several at once;
beside them the same clients calling systemd's Properties.Get, a C daemon behind the same bus, and
gpujobd's Get answered by floor_service.py instead of the daemon (gpujobd stopped meanwhile): its D-Bus
stack doing nothing but send the same reply, built once.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from typing import Any, Dict, Iterator, List, Tuple

from benchmarks.params import Params
from benchmarks.stats import HIGHER, Dist, Row, check
from benchmarks.testbed import Testbed, cpu_seconds, sh
from benchmarks.timing import run_timed

SECTION = "daemon"
SYSTEMD_PID = 1  # in the sandbox's PID namespace; on a host, the real PID 1


def run(bed: Testbed, p: Params) -> List[Row]:
    bed.wait_idle()
    idle = _cpu_windows(bed, p)
    jobs = _start_sleepers(bed, p.load_jobs)
    loaded = _cpu_windows(bed, p)
    _stop_all(bed, jobs)
    job_id = _any_job(bed)
    window = f"{p.idle_windows} windows of {p.idle_window_s:g} s"
    rows = [
        Row(SECTION, "daemon.cpu_idle", f"gpujobd CPU at rest, no job ({window})", idle[0], [idle[1]],
            note=_total(idle[0])),
        Row(SECTION, "daemon.cpu_load", f"gpujobd CPU at rest with {p.load_jobs} running jobs ({window})",
            loaded[0], [loaded[1]], note=_total(loaded[0])),
    ]
    for clients in (1, p.get_clients):
        ours, systemd, floor = _get_rates(bed, p, job_id, clients)
        rows.append(Row(SECTION, f"daemon.get_{clients}", f"D-Bus Get calls answered per second, "
                        f"{clients} warm client{'s' if clients > 1 else ''} in a loop", ours,
                        [systemd, floor], better=HIGHER))
    return rows


def _cpu_windows(bed: Testbed, p: Params) -> Tuple[Dist, Dist]:
    daemon = bed.main_pid()
    time.sleep(p.idle_window_s)  # warm-up window, discarded
    ours: List[float] = []
    systemd: List[float] = []
    first = cpu_seconds(daemon)
    for _ in range(p.idle_windows):
        before = (cpu_seconds(daemon), cpu_seconds(SYSTEMD_PID), time.perf_counter())
        time.sleep(p.idle_window_s)
        seconds = time.perf_counter() - before[2]
        ours.append(100 * (cpu_seconds(daemon) - before[0]) / seconds)
        systemd.append(100 * (cpu_seconds(SYSTEMD_PID) - before[1]) / seconds)
    total = cpu_seconds(daemon) - first
    return (Dist("gpujobd", "%", ours, 1, {"cpu_s_total": total,
                                           "seconds": p.idle_window_s * p.idle_windows}),
            Dist("systemd (PID 1), same windows", "%", systemd, 1))


def _total(dist: Dist) -> str:
    return (f"{dist.detail['cpu_s_total'] * 1000:.0f} ms of CPU in {dist.detail['seconds']:g} s "
            "(utime + stime, 10 ms ticks)")


def _start_sleepers(bed: Testbed, count: int) -> List[int]:
    proc = subprocess.Popen(bed.agent("burst", "--count", str(count), "--token", "load", "--sleep",
                                      "100000"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **bed.user.popen_kw())
    assert proc.stdout is not None
    check(proc.stdout.readline().strip() == "ready", "the load client did not get ready")
    out, _err = proc.communicate("go\n")
    ids = [job["id"] for job in json.loads(out)["jobs"]]
    deadline = time.monotonic() + 120
    while len(bed.client().list(all=True, state="running", raw=True)) < count:
        check(time.monotonic() < deadline, f"{count} sleeping jobs never all ran")
        time.sleep(0.1)
    return ids


def _stop_all(bed: Testbed, ids: List[int]) -> None:
    client = bed.client()
    for job_id in ids:
        client.stop(job_id)
    bed.wait_idle()


def _any_job(bed: Testbed) -> int:
    jobs = bed.client().list(all=True, limit=1, raw=True)
    if jobs:
        return jobs[0]["id"]
    job_id = int(run_timed(bed.ctl("submit", "--", "true"), bed.user).stdout.split()[0])
    bed.client().wait(job_id)
    return job_id


def _get_rates(bed: Testbed, p: Params, job_id: int, clients: int) -> Tuple[Dist, Dist, Dist]:
    """gpujobd's Get, systemd's and the floor's, a run of each in turn: a machine whose speed drifts
    during the section (a noisy VM) then moves every side alike, not only the one measured last."""
    runs: Dict[str, List[Dict[str, Any]]] = {"gpujobd": [], "systemd": [], "floor": []}
    reply = reply_of(job_id)
    for _ in range(p.get_runs):
        runs["gpujobd"].append(_concurrent(bed, p, "gpujobd", job_id, clients))
        runs["systemd"].append(_concurrent(bed, p, "systemd", job_id, clients))
        with instead_of_gpujobd(bed, bed.floor_service(reply)):
            runs["floor"].append(_concurrent(bed, p, "gpujobd", job_id, clients))
    dists = {target: _get_dist(p, target, clients, done) for target, done in runs.items()}
    return dists["gpujobd"], dists["systemd"], dists["floor"]


def reply_of(job_id: int) -> str:
    """The daemon's Get reply of the job as floor_service.py takes it: {field: [signature, value]}."""
    out = json.loads(sh("busctl", "--system", "-j", "call", "org.gpujobd1", "/org/gpujobd1",
                        "org.gpujobd1.Manager", "Get", "t", str(job_id)).stdout)
    fields = out["data"][0]
    check(bool(fields) and fields["id"]["data"] == job_id, f"Get of job {job_id} gave {out}")
    return json.dumps({key: [field["type"], field["data"]] for key, field in fields.items()})


@contextlib.contextmanager
def instead_of_gpujobd(bed: Testbed, service: List[str]) -> Iterator[None]:
    """gpujobd stopped, and `service` (as root) owning its bus name until the block ends; the service
    prints "ready" once it owns the name."""
    bed.stop_daemon()
    server = subprocess.Popen(service, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        check(server.stdout.readline().strip() == "ready", f"{service[2]} did not get the bus name")
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)
        bed.start_daemon()


_GET_LABELS = {"gpujobd": "gpujobd Get", "systemd": "systemd Properties.Get(Version)",
               "floor": "gpujobd's D-Bus stack answering Get with a prebuilt reply (floor_service.py)"}


def _get_dist(p: Params, target: str, clients: int, rates: List[Dict[str, Any]]) -> Dist:
    label = _GET_LABELS[target] + f", {clients} client{'s' if clients > 1 else ''}"
    return Dist(label, "calls/s", [r["rate"] for r in rates], 1,
                {"calls_per_client": p.get_calls, "runs": [{k: v for k, v in r.items() if k != "latencies_s"}
                                                           for r in rates],
                 "latency_p50_s": _median([x for r in rates for x in r["latencies_s"]])})


def _concurrent(bed: Testbed, p: Params, target: str, job_id: int, clients: int) -> Dict[str, Any]:
    argv = bed.agent("get", "--target", target, "--job", str(job_id), "--calls", str(p.get_calls),
                     "--warmup", str(p.get_calls // 5), "--barrier")
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              **bed.user.popen_kw()) for _ in range(clients)]
    for proc in procs:
        assert proc.stdout is not None
        check(proc.stdout.readline().strip() == "ready", "a Get client did not get ready")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    runs = [json.loads(proc.communicate()[0])["runs"][0] for proc in procs]
    seconds = max(r["finished"] for r in runs) - min(r["started"] for r in runs)
    return {"rate": clients * p.get_calls / seconds, "seconds": seconds,
            "latencies_s": [x for r in runs for x in r["latencies_s"]]}


def _median(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
