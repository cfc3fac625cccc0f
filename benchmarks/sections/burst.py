"""2. Burst: N jobs from several warm client processes at once, until every one ended and is recorded.

The clients (agent.py burst, as the bench user) warm up, wait at a barrier, then submit their share
as fast as they can; each job is `echo <unique token>`. The end of each job is taken from the
daemon's JobChanged signal (no polling load on the daemon). Then every job is checked: each id once,
each token in exactly one row of the database and printed exactly once in its log, every job
succeeded. The limit is the same number of scopes through pystemd's raw StartTransientUnit.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from typing import Any, Dict, List

from benchmarks import scopes
from benchmarks.params import Params
from benchmarks.stats import HIGHER, Dist, Row, check
from benchmarks.testbed import DB_FILE, Testbed, cpu_breakdown

SECTION = "burst"
FINAL = {"succeeded", "failed", "stopped", "timed-out", "lost", "start-failed"}


class EndWatcher:
    """When each job reached a final state, from JobChanged, stamped as the signal is received (on a
    jeepney connection of its own, opened as the client opens one)."""

    def __init__(self, client: Any) -> None:
        from collections import deque

        from jeepney import MatchRule
        from jeepney.bus_messages import message_bus

        self.ended: Dict[int, float] = {}
        self.states: Dict[int, str] = {}
        self._con = client._transport._open("watching JobChanged")
        rule = MatchRule(type="signal", interface="org.gpujobd1.Manager", member="JobChanged",
                         path="/org/gpujobd1")
        self._queue: Any = deque()
        self._filter = self._con.filter(rule, queue=self._queue)
        self._filter.__enter__()
        self._con.send_and_get_reply(message_bus.AddMatch(rule), timeout=30)

    def pump(self, seconds: float) -> None:
        """Receive signals for up to `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            while self._queue:
                job_id, state = self._queue.popleft().body[:2]
                if state in FINAL and job_id not in self.ended:
                    self.ended[job_id] = time.time()
                    self.states[job_id] = state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                self._con.recv_messages(timeout=remaining)
            except TimeoutError:
                return

    def close(self) -> None:
        self._filter.__exit__(None, None, None)
        self._con.close()


def run(bed: Testbed, p: Params) -> List[Row]:
    _burst(bed, p.burst_warmup_jobs, p.burst_clients, "warm")
    scopes.burst(p.burst_warmup_jobs, "warm")
    ours: List[Dict[str, Any]] = []
    limits: List[Dict[str, Any]] = []
    for k in range(p.burst_runs):  # in turn, so that a machine whose speed drifts moves both sides
        ours.append(_burst(bed, p.burst_jobs, p.burst_clients, f"b{k}"))
        limits.append(_limit(bed, p.burst_jobs, f"b{k}"))
    n, w = p.burst_jobs, p.burst_warmup_jobs
    return [
        Row(SECTION, "burst.rate", f"{n} jobs from {p.burst_clients} clients: first submit until the "
            "last job ended and is recorded", _dist("gpujobd", "jobs/s", ours, "rate", w),
            [_dist(f"raw pystemd StartTransientUnit loop, {n} scopes started until all gone", "jobs/s",
                   limits, "rate", w)], better=HIGHER,
            note="every job checked: one id, one row, one log line, succeeded"),
        Row(SECTION, "burst.submitted", "submits answered per second during the burst",
            _dist("gpujobd", "jobs/s", ours, "submit_rate", w),
            [_dist("raw StartTransientUnit calls per second (same loop)", "jobs/s", limits, "call_rate",
                   w)], better=HIGHER),
        Row(SECTION, "burst.latency", "submit latency inside the burst (all submits of all runs)",
            _latencies("gpujobd Client().submit()", ours, w),
            [_latencies("raw fork + StartTransientUnit call (same loop)", limits, w)]),
    ]


def _dist(label: str, unit: str, runs: List[Dict[str, Any]], key: str, warmup_jobs: int) -> Dist:
    return Dist(label, unit, [r[key] for r in runs], 1,
                {"runs": [{k: v for k, v in r.items() if k != "latencies_s"} for r in runs],
                 "warmup": f"one burst of {warmup_jobs} jobs"})


def _latencies(label: str, runs: List[Dict[str, Any]], warmup_jobs: int) -> Dist:
    return Dist(label, "s", [x for r in runs for x in r["latencies_s"]], 1,
                {"warmup": f"one burst of {warmup_jobs} jobs"})


def _limit(bed: Testbed, count: int, tag: str) -> Dict[str, Any]:
    daemon = bed.main_pid()
    cpu = cpu_breakdown(daemon)
    result = scopes.burst(count, tag)
    result.update(rate=count / result["total_s"], call_rate=count / result["calls_s"],
                  cpu_s={k: round(v - cpu[k], 3) for k, v in cpu_breakdown(daemon).items()})
    return result


def _agents(bed: Testbed, count: int, clients: int, tag: str) -> List[subprocess.Popen]:
    shares = [count // clients + (1 if k < count % clients else 0) for k in range(clients)]
    procs = [subprocess.Popen(bed.agent("burst", "--count", str(share), "--token", f"{tag}-{k}"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              **bed.user.popen_kw()) for k, share in enumerate(shares)]
    for proc in procs:
        assert proc.stdout is not None
        check(proc.stdout.readline().strip() == "ready", "a burst client did not get ready")
    return procs


def _burst(bed: Testbed, count: int, clients: int, tag: str) -> Dict[str, Any]:
    bed.wait_idle()
    watcher = EndWatcher(bed.client())
    daemon = bed.main_pid()
    cpu = cpu_breakdown(daemon)
    procs = _agents(bed, count, clients, tag)
    outputs: List[str] = []
    readers = [threading.Thread(target=lambda proc=proc: outputs.append(proc.communicate("go\n")[0]))
               for proc in procs]
    started = time.time()
    for reader in readers:
        reader.start()
    while any(reader.is_alive() for reader in readers):
        watcher.pump(0.01)
    jobs = [job for out in outputs for job in json.loads(out)["jobs"]]
    ids = [job["id"] for job in jobs]
    check(len(ids) == count and len(set(ids)) == count, f"burst {tag}: {len(set(ids))} distinct ids "
          f"for {count} submits")
    deadline = time.monotonic() + 300
    while not set(ids) <= set(watcher.ended):
        check(time.monotonic() < deadline, f"burst {tag}: {len(set(ids) - set(watcher.ended))} jobs "
              "never ended")
        watcher.pump(0.01)
    watcher.close()
    last_end = max(watcher.ended[i] for i in ids)
    used = {k: round(v - cpu[k], 3) for k, v in cpu_breakdown(daemon).items()}
    _verify(bed, jobs, watcher.states, tag)
    submitted = max(json.loads(out)["finished"] for out in outputs)
    return {"jobs": count, "seconds": last_end - started, "rate": count / (last_end - started),
            "submit_rate": count / (submitted - started), "cpu_s": used,
            "latencies_s": [job["submit_s"] for job in jobs]}


def _verify(bed: Testbed, jobs: List[Dict[str, Any]], states: Dict[int, str], tag: str) -> None:
    """No job lost, none recorded twice, every one ran exactly once."""
    bad = {job["id"]: states[job["id"]] for job in jobs if states[job["id"]] != "succeeded"}
    check(not bad, f"burst {tag}: {len(bad)} jobs did not succeed: {_why(bed, sorted(bad)[:5])}")
    with sqlite3.connect(f"file:{DB_FILE}?mode=ro", uri=True) as db:
        low, high = min(j["id"] for j in jobs), max(j["id"] for j in jobs)
        rows = db.execute("SELECT id, argv, state FROM jobs WHERE id BETWEEN ? AND ?", (low, high)).fetchall()
    recorded: Dict[str, List[int]] = {}
    for job_id, argv, state in rows:
        recorded.setdefault(json.loads(argv)[-1], []).append(job_id)
        check(state == "succeeded", f"burst {tag}: job {job_id} is recorded {state}")
    for job in jobs:
        check(recorded.get(job["token"]) == [job["id"]],
              f"burst {tag}: token {job['token']} recorded as {recorded.get(job['token'])}, "
              f"expected job {job['id']} once")
        log = bed.job_log(job["id"]).read_text()
        check(log == job["token"] + "\n", f"burst {tag}: job {job['id']} logged {log[:80]!r}")
    check(len(rows) == len(jobs), f"burst {tag}: {len(rows)} rows for {len(jobs)} jobs in its id range")


def _why(bed: Testbed, job_ids: List[int]) -> str:
    """How the daemon recorded these jobs' ends, and the start of each one's log."""
    client = bed.client()
    found = []
    for job_id in job_ids:
        job = client.get(job_id)
        log = bed.job_log(job_id).read_text(errors="replace")[:160] if bed.job_log(job_id).exists() else ""
        found.append(f"{job_id}: {job['state']} ({job.get('reason')}: {job.get('detail')!r}, exit code "
                     f"{job.get('exit_code')}, signal {job.get('signal')}), log {log!r}")
    return "; ".join(found)

