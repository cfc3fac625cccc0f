"""The limits: what systemd itself does, asked directly from a warm process, with nothing of gpujobd.

- `start_latency`: one transient scope at a time over Gio (what gpujobd's daemon does): fork a child
  that blocks on a pipe, StartTransientUnit(PIDs=[child]), then wait for the start job's JobRemoved
  signal. Gives the call's own latency and the time until the scope is active.
- `burst`: pystemd's StartTransientUnit in a tight loop, one forked child per scope, all scopes
  started before any child is released, then every child released; the time until the last scope is
  gone. pystemd 0.11's signature table has no PIDs entry, so PIDs goes in as `_custom`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from benchmarks.stats import Dist, check
from benchmarks.testbed import CGROUP_ROOT

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
LIMIT_SLICE = "gjbench.slice"
WAIT_S = 120.0


def _gated_child() -> Tuple[int, int]:
    """A forked child that exits as soon as the returned write end is closed (or written)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(write_end)
            os.read(read_end, 1)
        finally:
            os._exit(0)
    os.close(read_end)
    return pid, write_end


class _Gio:
    def __init__(self) -> None:
        from gi.repository import Gio, GLib

        self.GLib = GLib
        self.con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        self.done: Dict[str, str] = {}
        self.sub = self.con.signal_subscribe(SYSTEMD, MANAGER, "JobRemoved", SYSTEMD_PATH, None,
                                             Gio.DBusSignalFlags.NONE, self._job_removed)
        self._call("Subscribe", None, None)

    def _job_removed(self, *args: Any) -> None:
        _id, job, _unit, result = args[-1].unpack()
        self.done[job] = result

    def _call(self, method: str, args: Any, reply: Any) -> Any:
        from gi.repository import Gio

        return self.con.call_sync(SYSTEMD, SYSTEMD_PATH, MANAGER, method, args, reply,
                                  Gio.DBusCallFlags.NONE, 30_000, None)

    def start_scope(self, unit: str, pid: int) -> str:
        V = self.GLib.Variant
        props = [("PIDs", V("au", [pid])), ("Slice", V("s", LIMIT_SLICE)),
                 ("CollectMode", V("s", "inactive-or-failed"))]
        args = V("(ssa(sv)a(sa(sv)))", (unit, "fail", props, []))
        (job,) = self._call("StartTransientUnit", args, self.GLib.VariantType.new("(o)")).unpack()
        return job

    def wait_job(self, job: str) -> str:
        context = self.GLib.MainContext.default()
        deadline = time.monotonic() + WAIT_S
        while job not in self.done:
            check(time.monotonic() < deadline, f"systemd never finished start job {job}")
            context.iteration(True)
        return self.done.pop(job)

    def close(self) -> None:
        self.con.signal_unsubscribe(self.sub)
        # The system bus connection is this process's shared one: a later _Gio (another section's)
        # subscribes again, which systemd refuses while this subscription stands.
        self._call("Unsubscribe", None, None)


# Quiet before each paced start. systemd 252 (measured in this sandbox) runs a start job about 12 ms
# after StartTransientUnit's reply when its previous start was more than ~10 ms earlier, and within
# a millisecond when starts come back to back: the PID enters the scope's cgroup that late, so no
# client can see a scope active sooner. A job submitted by a person comes after such a quiet.
PACED_PAUSE_S = 0.05


def start_latency(runs: int, warmup: int, pause_s: float = 0.0) -> Tuple[Dist, Dist]:
    """(StartTransientUnit call, StartTransientUnit until the scope is active), warm, one at a time,
    each start `pause_s` after the previous scope ended."""
    bus = _Gio()
    calls: List[float] = []
    actives: List[float] = []
    try:
        for index in range(warmup + runs):
            time.sleep(pause_s)
            pid, gate = _gated_child()
            started = time.perf_counter()
            job = bus.start_scope(f"gjlimit-one-{os.getpid()}-{index}-{round(pause_s * 1000)}.scope", pid)
            called = time.perf_counter()
            result = bus.wait_job(job)
            active = time.perf_counter()
            os.close(gate)
            os.waitpid(pid, 0)
            check(result == "done", f"a raw scope's start job ended {result!r}")
            if index >= warmup:
                calls.append(called - started)
                actives.append(active - started)
    finally:
        bus.close()
    paced = f", each {pause_s * 1000:g} ms after the last ended" if pause_s else ", back to back"
    return (Dist("raw StartTransientUnit call (warm, Gio)", "s", calls, warmup),
            Dist(f"raw StartTransientUnit until active (warm, Gio{paced})", "s", actives, warmup))


def _slice_scopes(prefix: str) -> List[str]:
    try:
        return [name for name in os.listdir(CGROUP_ROOT / LIMIT_SLICE) if name.startswith(prefix)]
    except FileNotFoundError:
        return []


def _wait_scopes(prefix: str, count: int, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(_slice_scopes(prefix)) != count:
        check(time.monotonic() < deadline, f"timed out waiting for {what}")
        time.sleep(0.002)


def burst(count: int, tag: str) -> Dict[str, Any]:
    """`count` scopes through pystemd, as fast as one process can; seconds for the whole round trip."""
    from pystemd.systemd1 import Manager

    manager = Manager()
    manager.load()
    prefix = f"gjlimit-{tag}-"
    read_end, write_end = os.pipe()
    pids: List[int] = []
    latencies: List[float] = []
    started = time.perf_counter()
    for index in range(count):
        sent = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        pids.append(pid)
        manager.Manager.StartTransientUnit(
            f"{prefix}{index}.scope".encode(), b"fail",
            {b"Slice": LIMIT_SLICE.encode(), b"_custom": (b"PIDs", b"au", [pid])})
        latencies.append(time.perf_counter() - sent)
    called = time.perf_counter()
    os.close(read_end)
    _wait_scopes(prefix, count, f"{count} raw scopes to be active")
    active = time.perf_counter()
    reaper = threading.Thread(target=lambda: [os.waitpid(pid, 0) for pid in pids])
    reaper.start()
    os.close(write_end)  # every child reads EOF and exits; each scope then ends by itself
    _wait_scopes(prefix, 0, f"{count} raw scopes to be gone")
    gone = time.perf_counter()
    reaper.join()
    return {"calls_s": called - started, "active_s": active - started, "total_s": gone - started,
            "latencies_s": latencies}


def slice_cgroup() -> Path:
    return CGROUP_ROOT / LIMIT_SLICE
