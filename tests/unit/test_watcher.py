"""gpu.watcher: /proc parsing, attribution, the kill policy, and the watcher's loop, driven with
fakes of its seams (NVML reader, /proc, worker, scheduler, clocks, systemd's stop_unit, the kill);
and the manager's check of the GPUs before a job starts (refuse, wait), with test_manager's rig.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import pytest

from gpujobd.daemon.adapters import users
from gpujobd.daemon.adapters.procfs import ProcFs
from gpujobd.daemon.gpu import reading
from gpujobd.daemon.gpu import watcher as w
from gpujobd.daemon.gpu.attribution import (
    Identity,
    ProcInfo,
    attribute,
    parse_cgroup,
    parse_stat,
    unit_of_cgroup,
)
from gpujobd.daemon.gpu.report import Device, GpuProcess, NvmlReport, NvmlUnavailable
from gpujobd.daemon.gpu.strays import Verdict, kill_verdict, kill_verified, system_uid_min
from gpujobd.daemon.gpu.watcher import Watcher
from gpujobd.daemon.gpu.worker import NO_STEPS, Done
from gpujobd.daemon.manager import Manager
from gpujobd.daemon.store import Store
from gpujobd.shared.config import Config
from gpujobd.shared.config_toml import config_from_mapping
from gpujobd.shared.errors import InvalidArgument, Refused
from gpujobd.shared.states import EndReason, JobState
from tests.unit import test_manager as tm
from tests.unit.test_manager import OWNER, Rig, spec

WALL0 = 1_750_000_000.0
DAEMON_PID = 777
UUID0, UUID1 = "GPU-0000aaaa-1111", "GPU-1111bbbb-2222"


def proc(pid: int, *, user: str = "alice", uid: int = 1000, euid: Optional[int] = None, ppid: int = 1,
         cgroup: Optional[str] = "/", start: int = 1000, cmd: Tuple[str, ...] = ("python", "train.py"),
         parent_comm: str = "systemd") -> ProcInfo:
    return ProcInfo(pid=pid, ppid=ppid, uid=uid, euid=uid if euid is None else euid, user=user,
                    comm=cmd[0] if cmd else "x", cmdline=cmd, cgroup=cgroup, start_ticks=start,
                    started_at=WALL0 - 3600 + start / 100, parent_comm=parent_comm)


# ---------------------------------------------------------------------------------------------------
# /proc.


def test_only_the_v2_line_of_proc_cgroup_counts() -> None:
    text = ("12:memory:/user.slice\n11:cpu,cpuacct:/system.slice/sshd.service\n"
            "0::/gpujob.slice/gpujob-7.scope\n")
    assert parse_cgroup(text) == "/gpujob.slice/gpujob-7.scope"
    assert parse_cgroup("0::/\n") == "/"
    assert parse_cgroup("5:cpuset:/gpujob.slice/gpujob-9.scope\n") is None, "v1 lines are the host's"


@pytest.mark.parametrize(("path", "unit"), [
    ("/gpujob.slice/gpujob-7.scope", "gpujob-7.scope"),
    ("/gpujob.slice/gpujob-7.scope/inner", "gpujob-7.scope"),
    ("/system.slice/sshd.service", "sshd.service"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.scope", "app-x.scope"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/init.scope", "init.scope"),
    ("/", None),
    ("/user.slice", None),
    ("", None),
    (None, None),
])
def test_the_unit_is_the_last_scope_or_service_component(path: Optional[str], unit: Optional[str]) -> None:
    assert unit_of_cgroup(path) == unit


def test_stat_is_parsed_past_a_comm_with_blanks_and_parentheses() -> None:
    fields = " ".join(str(n) for n in range(4, 53))  # ppid is field 4, starttime field 22
    assert parse_stat(f"4242 (a b) (c)) S {fields}") == ("a b) (c)", "S", 4, 22)


def write_proc(root: Path, pid: int, *, comm: str = "python", ppid: int = 1, uid: int = 1000,
               euid: int = 1000, start: int = 5000, cgroup: str = "0::/\n",
               cmdline: bytes = b"python\0train.py\0") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    rest = " ".join(["0"] * 17)  # fields 5..21
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {rest} {start} 0 0\n")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{euid}\t{euid}\t{euid}\nGid:\t1\t1\t1\t1\n")
    (d / "cgroup").write_text(cgroup)
    (d / "cmdline").write_bytes(cmdline)
    (d / "comm").write_text(comm + "\n")


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    (root / "sys" / "kernel").mkdir(parents=True)
    (root / "sys" / "kernel" / "pid_max").write_text("32768\n")
    (root / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    return root


def test_procfs_inspects_a_process(fake_proc: Path) -> None:
    write_proc(fake_proc, 1, comm="systemd", ppid=0, uid=0, euid=0)
    write_proc(fake_proc, 4242, ppid=1, uid=1000, euid=1001, start=25000,
               cgroup="1:name=systemd:/x\n0::/gpujob.slice/gpujob-7.scope\n")
    procs = ProcFs(root=str(fake_proc), user_name=lambda uid: {1000: "alice"}.get(uid, str(uid)),
                   clock_ticks=100)
    info = procs.inspect(4242)
    assert info is not None
    assert (info.pid, info.ppid, info.uid, info.euid, info.user) == (4242, 1, 1000, 1001, "alice")
    assert info.cmdline == ("python", "train.py") and info.parent_comm == "systemd"
    assert info.cgroup == "/gpujob.slice/gpujob-7.scope" and info.unit == "gpujob-7.scope"
    assert info.started_at == 1700000000 + 250.0
    assert procs.identity(4242) == Identity(uid=1000, start_ticks=25000,
                                            cgroup="/gpujob.slice/gpujob-7.scope")


def test_procfs_says_none_for_what_is_not_a_live_process_here(fake_proc: Path) -> None:
    procs = ProcFs(root=str(fake_proc), clock_ticks=100)
    assert procs.pid_max() == 32768
    for pid in (0, -1, 4294967295, 40000, 4243):
        assert procs.inspect(pid) is None and procs.identity(pid) is None, pid


def test_procfs_shows_a_process_without_command_line_by_its_comm(fake_proc: Path) -> None:
    write_proc(fake_proc, 4242, comm="kworker", cmdline=b"")
    info = ProcFs(root=str(fake_proc), clock_ticks=100).inspect(4242)
    assert info is not None and info.command == ("[kworker]",)


def test_procfs_reads_this_very_process() -> None:
    info = ProcFs().inspect(os.getpid())
    assert info is not None and info.pid == os.getpid() and info.ppid == os.getppid()
    assert info.uid == os.getuid() and abs(info.started_at - time.time()) < 24 * 3600 * 365
    assert info.cmdline and "python" in info.cmdline[0]


# ---------------------------------------------------------------------------------------------------
# Attribution.


@pytest.mark.parametrize(("pid", "info", "owner", "job_id", "unit"), [
    (4242, proc(4242, cgroup="/gpujob.slice/gpujob-7.scope"), "job", 7, "gpujob-7.scope"),
    (4242, proc(4242, cgroup="/gpujob.slice/gpujob-8.scope"), "stray", None, "gpujob-8.scope"),
    (4242, proc(4242, cgroup="/"), "stray", None, None),
    (4242, proc(4242, cgroup="/user.slice"), "stray", None, None),
    (4242, proc(4242, cgroup="/init.scope"), "stray", None, "init.scope"),
    (1, proc(1, cgroup="/init.scope", uid=0), "unit", None, "init.scope"),
    (4242, proc(4242, cgroup="/system.slice/jupyter.service"), "unit", None, "jupyter.service"),
    (4242, proc(4242, cgroup="/user.slice/user-1000.slice/session-3.scope"), "unit", None, "session-3.scope"),
    (4242, proc(4242, cgroup=None), "stray", None, None),
    (4242, None, "unknown", None, None),
    (0, None, "unknown", None, None),
    (4294967295, None, "unknown", None, None),
])
def test_attribution(pid: int, info: Optional[ProcInfo], owner: str, job_id: Optional[int],
                     unit: Optional[str]) -> None:
    who = attribute(pid, info, live_jobs={7}, pid_max=4194304)
    assert (who.owner, who.job_id, who.unit) == (owner, job_id, unit)
    if owner in ("stray", "unknown") and info is None:
        assert who.note


def test_an_invalid_pid_is_named_as_such() -> None:
    assert "not a valid PID" in attribute(4294967295, None, (), 4194304).note
    assert "no process 4242 in this PID namespace" in attribute(4242, None, (), 4194304).note


# ---------------------------------------------------------------------------------------------------
# The kill policy, as a function.


def kill_config(**gpu: Any) -> Config:
    values: Dict[str, Any] = {"stray_policy": "kill", "stray_grace_s": 60.0, "stray_kill_min_ticks": 3}
    values.update(gpu)
    return config_from_mapping({"gpu": values})


def verdict(info: ProcInfo, unit: Optional[str] = None, *, stray_for_s: float = 100.0, ticks: int = 5,
            config: Optional[Config] = None) -> Verdict:
    return kill_verdict(info, unit, stray_for_s=stray_for_s, ticks=ticks, config=config or kill_config(),
                        daemon_pid=DAEMON_PID, uid_min=1000)


@pytest.mark.parametrize(("info", "unit", "fragment"), [
    (proc(1, uid=1000), None, "PID 1 is never killed"),
    (proc(0, uid=1000), None, "PID 0 is never killed"),
    (proc(DAEMON_PID, uid=1000), None, "gpujobd itself"),
    (proc(4242, uid=0, user="root"), None, "root's processes"),
    (proc(4242, uid=1000, euid=0), None, "root's processes"),
    (proc(4242, uid=110, user="postgres"), None, "system account"),
    (proc(4242, cgroup=None), None, "cgroup is unknown"),
    (proc(4242, cgroup="/system.slice/x.service"), "x.service", "belongs to the unit x.service"),
])
def test_never_killed_whatever_the_rules(info: ProcInfo, unit: Optional[str], fragment: str) -> None:
    config = kill_config(stray_grace_s=0.0, stray_kill_min_ticks=1, stray_kill_orphans_only=False)
    result = verdict(info, unit, config=config)
    assert result.action == "spare" and fragment in result.why


def test_not_before_the_grace_nor_before_enough_polls() -> None:
    orphan = proc(4242)
    assert verdict(orphan, stray_for_s=59.0, ticks=10).action == "wait"
    assert verdict(orphan, stray_for_s=600.0, ticks=2).action == "wait"
    assert verdict(orphan, stray_for_s=60.0, ticks=3).action == "kill"


def test_the_users_rule() -> None:
    config = kill_config(stray_kill_users=["alice"])
    assert verdict(proc(4242, user="alice"), config=config).action == "kill"
    spared = verdict(proc(4242, user="bob", uid=1001), config=config)
    assert spared.action == "spare" and "bob is not in gpu.stray_kill_users" in spared.why
    killed = verdict(proc(4242, user="alice"), config=config)
    assert "user alice is in gpu.stray_kill_users" in killed.rule


def test_the_orphans_rule() -> None:
    assert verdict(proc(4242, ppid=1)).action == "kill"
    subreaped = verdict(proc(4242, ppid=900, parent_comm="systemd"))
    assert subreaped.action == "kill" and "subreaper" in subreaped.rule
    spared = verdict(proc(4242, ppid=900, parent_comm="bash"))
    assert spared.action == "spare" and "PID 900, bash" in spared.why
    anyone = verdict(proc(4242, ppid=900, parent_comm="bash"),
                     config=kill_config(stray_kill_orphans_only=False))
    assert anyone.action == "kill" and "stray_kill_orphans_only = false" in anyone.rule


def test_a_stray_in_an_ended_jobs_scope_or_init_scope_may_be_killed() -> None:
    assert verdict(proc(4242, cgroup="/gpujob.slice/gpujob-8.scope"), "gpujob-8.scope").action == "kill"
    assert verdict(proc(4242, cgroup="/init.scope"), "init.scope").action == "kill"


def test_uid_min_comes_from_login_defs(tmp_path: Path) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("# comment\nUID_MIN\t\t 2000\nUID_MAX 60000\n")
    assert system_uid_min(str(defs)) == 2000
    assert system_uid_min(str(tmp_path / "missing")) == 1000


# ---------------------------------------------------------------------------------------------------
# The verified kill.


class Recorder:
    def __init__(self, identities: List[Optional[Identity]]):
        self.identities = identities
        self.opened: List[int] = []
        self.sent: List[Tuple[int, int]] = []
        self.closed: List[int] = []

    def pidfd_open(self, pid: int) -> int:
        self.opened.append(pid)
        return 100 + pid

    def send(self, fd: int, signum: int) -> None:
        self.sent.append((fd, signum))

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def identity(self, pid: int) -> Optional[Identity]:
        return self.identities.pop(0)

    def kill(self, pid: int, expected: Identity, signum: int = signal.SIGTERM) -> Tuple[bool, str]:
        return kill_verified(self, pid, expected, signum, pidfd_open=self.pidfd_open,  # type: ignore[arg-type]
                             send=self.send, close=self.close)


def test_the_kill_signals_through_the_pidfd_after_reverifying() -> None:
    expected = Identity(1000, 5000, "/")
    rec = Recorder([expected])
    ok, what = rec.kill(4242, expected)
    assert ok and "SIGTERM" in what
    assert rec.opened == [4242] and rec.sent == [(4342, signal.SIGTERM)] and rec.closed == [4342]


@pytest.mark.parametrize("now", [Identity(1000, 5001, "/"), Identity(1001, 5000, "/"),
                                 Identity(1000, 5000, "/system.slice/x.service")])
def test_a_pid_that_changed_hands_is_not_signalled(now: Identity) -> None:
    rec = Recorder([now])
    ok, what = rec.kill(4242, Identity(1000, 5000, "/"))
    assert not ok and "no longer the process judged" in what
    assert rec.sent == [] and rec.closed == [4342]


def test_a_process_gone_before_the_check_is_not_signalled() -> None:
    rec = Recorder([None])
    ok, what = rec.kill(4242, Identity(1000, 5000, "/"))
    assert not ok and "exited" in what and rec.sent == []


def test_pid_1_and_0_are_refused_before_anything_is_opened() -> None:
    rec = Recorder([])
    assert not rec.kill(1, Identity(0, 1, "/init.scope"))[0]
    assert not rec.kill(0, Identity(0, 1, "/"))[0]
    assert rec.opened == []


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux >= 5.3)")
def test_the_real_pidfd_kill_hits_the_judged_process_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        procs = ProcFs()
        judged = procs.identity(child.pid)
        assert judged is not None
        wrong = Identity(judged.uid, judged.start_ticks + 1, judged.cgroup)
        ok, what = kill_verified(procs, child.pid, wrong, signal.SIGTERM)
        assert not ok and child.poll() is None, "a different start time: untouched"
        ok, what = kill_verified(procs, child.pid, judged, signal.SIGTERM)
        assert ok, what
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# ---------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES.


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", []), ("0,1", ["0", "1"]), (" 1 , 0", ["1", "0"]), ("-1", []),
    ("0,-1,1", ["0"]), ("GPU-1111,2", ["GPU-1111", "2"]), ("NoDevFiles", []), ("MIG-abc", ["MIG-abc"]),
])
def test_visible_devices_are_read_as_cuda_reads_them(value: Optional[str],
                                                     expected: Optional[List[str]]) -> None:
    assert w.parse_visible_devices(value) == expected


def test_device_selection_by_index_or_uuid_prefix() -> None:
    device = {"index": 1, "uuid": UUID1}
    assert w.device_selected(device, None)
    assert w.device_selected(device, ["1"]) and not w.device_selected(device, ["0"])
    assert w.device_selected(device, ["GPU-1111"]) and not w.device_selected(device, ["GPU-0000"])
    assert not w.device_selected(device, [])


# ---------------------------------------------------------------------------------------------------
# The watcher, over fakes.


class Loop:
    """The GLib main loop, faked: timers on a monotonic clock, and the worker's posted results."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.timers: Dict[int, Tuple[float, float, Callable[[], None]]] = {}
        self.posted: List[Callable[[], None]] = []
        self._next = 0

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]:
        self._next += 1
        token = self._next
        self.timers[token] = (self.mono + seconds, seconds, callback)
        return lambda: self.timers.pop(token, None)

    def wall(self) -> float:
        return WALL0 + (self.mono - 1000.0)

    def pending(self) -> List[float]:
        """The delays of the armed timers, as asked for, soonest first."""
        return [delay for _, delay, _ in sorted(self.timers.values(), key=lambda t: t[0])]

    def run(self, seconds: float = 0.0) -> None:
        """Let `seconds` pass, running posted results and due timers in order."""
        end = self.mono + seconds
        while True:
            while self.posted:
                self.posted.pop(0)()
            due = [(when, token) for token, (when, _, _) in self.timers.items() if when <= end]
            if not due:
                break
            when, token = min(due)
            self.mono = max(self.mono, when)
            _, _, callback = self.timers.pop(token)
            callback()
        self.mono = end


class FakeWorker:
    """Runs a task at once (unless held, like a call stuck in the kernel) and posts its result."""

    def __init__(self, loop: Loop):
        self._loop = loop
        self.busy = False
        self.hold = False
        self.stuck: Optional[Tuple[str, float]] = None
        self._held: Optional[Tuple[Callable[..., Any], Callable[[Done], None]]] = None
        self.tasks = 0

    def submit(self, task: Callable[..., Any], on_done: Callable[[Done], None]) -> bool:
        if self.busy:
            return False
        self.busy = True
        self.tasks += 1
        if self.hold:
            self._held = (task, on_done)
        else:
            self._run(task, on_done)
        return True

    def _run(self, task: Callable[..., Any], on_done: Callable[[Done], None]) -> None:
        try:
            done = Done(value=task(self))
        except Exception as err:
            done = Done(error=err)

        def finish() -> None:
            self.busy = False
            on_done(done)

        self._loop.posted.append(finish)

    def release(self) -> None:
        assert self._held is not None
        task, on_done = self._held
        self._held, self.hold, self.stuck = None, False, None
        self._run(task, on_done)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        yield

    def current(self) -> Optional[Tuple[str, float]]:
        return self.stuck


class FakeNvml:
    def __init__(self) -> None:
        self.devices: List[Device] = [Device(index=0, uuid=UUID0, name="H100", memory_total_bytes=80 << 30,
                                             memory_used_bytes=1 << 30),
                                      Device(index=1, uuid=UUID1, name="H100", memory_total_bytes=80 << 30,
                                             memory_used_bytes=0)]
        self.error: Optional[str] = None
        self.reads = 0

    def place(self, index: int, pid: int, memory: Optional[int] = 1 << 30, kind: str = "C") -> None:
        device = self.devices[index]
        self.devices[index] = Device(**{**device.__dict__, "processes": (
            *device.processes, GpuProcess(pid=pid, type=kind, used_memory_bytes=memory))})

    def clear(self, index: Optional[int] = None) -> None:
        for i, device in enumerate(self.devices):
            if index is None or i == index:
                self.devices[i] = Device(**{**device.__dict__, "processes": ()})

    def read(self, steps: Any = None) -> NvmlReport:
        self.reads += 1
        if self.error is not None:
            raise NvmlUnavailable(self.error)
        return NvmlReport(devices=tuple(self.devices), driver_version="550.54.14", taken_at=WALL0)


class FakeProcs:
    def __init__(self) -> None:
        self.table: Dict[int, ProcInfo] = {}
        self.inspected: List[int] = []  # every full look, in order

    def add(self, info: ProcInfo) -> ProcInfo:
        self.table[info.pid] = info
        return info

    def pid_max(self) -> int:
        return 4194304

    def inspect(self, pid: int) -> Optional[ProcInfo]:
        self.inspected.append(pid)
        return self.table.get(pid)

    def same_processes(self, known: Mapping[int, int]) -> Set[int]:
        return {pid for pid, start in known.items()
                if pid in self.table and self.table[pid].start_ticks == start}

    def identity(self, pid: int) -> Optional[Identity]:
        info = self.table.get(pid)
        return info.identity if info else None


class Rigw:
    def __init__(self, config: Config, live: Optional[List[int]] = None):
        self.loop = Loop()
        self.worker = FakeWorker(self.loop)
        self.nvml = FakeNvml()
        self.procs = FakeProcs()
        self.live: List[int] = live if live is not None else [7]
        self.stopped_units: List[str] = []
        self.kills: List[Tuple[int, Identity, int]] = []
        self.found: List[Dict[str, Any]] = []
        self.cleared: List[Dict[str, Any]] = []
        self.reports = 0
        self.kill_result: Tuple[bool, str] = (True, "sent")
        self.watcher = Watcher(
            config, live_jobs=lambda: self.live, scheduler=self.loop, worker=self.worker,  # type: ignore[arg-type]
            nvml=self.nvml, procs=self.procs, stop_unit=self.stopped_units.append,  # type: ignore[arg-type]
            daemon_pid=DAEMON_PID, uid_min=1000, clock=self.loop.wall, monotonic=lambda: self.loop.mono,
            on_report=self._reported, on_stray_found=self.found.append, on_stray_cleared=self.cleared.append,
            kill=self._kill)

    def _reported(self) -> None:
        self.reports += 1

    def _kill(self, procs: Any, pid: int, identity: Identity, signum: int) -> Tuple[bool, str]:
        self.kills.append((pid, identity, signum))
        return self.kill_result

    def start(self) -> Watcher:
        self.watcher.start()
        self.loop.run()
        return self.watcher


def gpu_config(**gpu: Any) -> Config:
    values: Dict[str, Any] = {"poll_interval_s": 5.0, "retry_initial_s": 5.0, "retry_max_s": 40.0,
                              "nvml_call_timeout_s": 2.0}
    values.update(gpu)
    return config_from_mapping({"gpu": values, "jobs": {"stop_timeout_s": 10.0}})


@pytest.fixture
def rigw() -> Rigw:
    return Rigw(gpu_config())


def populate(r: Rigw) -> None:
    """Job 7 on GPU 0, a service on GPU 1, an orphan stray of bob on both, a bogus PID on GPU 1."""
    r.procs.add(proc(100, cgroup="/gpujob.slice/gpujob-7.scope", ppid=50, user="alice"))
    r.procs.add(proc(200, cgroup="/system.slice/jupyter.service", uid=1002, user="carol", ppid=1))
    r.procs.add(proc(300, cgroup="/", uid=1001, user="bob", ppid=1, cmd=("python", "leftover.py")))
    r.nvml.place(0, 100, 3 << 30)
    r.nvml.place(0, 300, 1 << 30)
    r.nvml.place(1, 200, 2 << 30, "G")
    r.nvml.place(1, 300, 1 << 29)
    r.nvml.place(1, 4294967295, None)


def test_a_tick_attributes_every_process_and_reports_the_stray(rigw: Rigw) -> None:
    populate(rigw)
    watcher = rigw.start()
    report = watcher.report()
    assert (report["state"], report["available"], report["reason"]) == ("ok", True, "")
    assert report["policy"] == "report" and report["driver_version"] == "550.54.14"
    gpu0, gpu1 = report["devices"]
    owners = {(p["pid"], p["owner"]) for p in gpu0["processes"] + gpu1["processes"]}
    assert owners == {(100, "job"), (300, "stray"), (200, "unit"), (4294967295, "unknown")}
    job_process = next(p for p in gpu0["processes"] if p["pid"] == 100)
    assert job_process["job_id"] == 7 and job_process["unit"] == "gpujob-7.scope"
    assert job_process["user"] == "alice" and job_process["age_s"] == pytest.approx(3600 - 10)
    bogus = next(p for p in gpu1["processes"] if p["pid"] == 4294967295)
    assert "not a valid PID" in bogus["note"] and "used_memory_bytes" not in bogus
    (stray,) = report["strays"]
    assert (stray["pid"], stray["ppid"], stray["user"], stray["uid"]) == (300, 1, "bob", 1001)
    assert stray["command"] == ["python", "leftover.py"] and stray["cgroup"] == "/"
    assert stray["gpus"] == {UUID0: 1 << 30, UUID1: 1 << 29} and stray["gpu_indexes"] == [0, 1]
    assert stray["used_memory_bytes"] == (1 << 30) + (1 << 29)
    assert stray["action"] == "report" and "in no systemd unit" in stray["note"]
    assert watcher.job_gpu_memory(7) == {UUID0: 3 << 30}
    assert watcher.job_gpu_memory(8) is None  # not a live job
    assert len(rigw.found) == 1 and rigw.found[0]["pid"] == 300 and rigw.cleared == []
    assert rigw.loop.pending() == [5.0], "the next tick, at gpu.poll_interval_s"


def test_inventory_lists_each_gpu_with_its_strays_for_the_queue(rigw: Rigw) -> None:
    populate(rigw)
    assert rigw.watcher.inventory() is None, "nothing read yet"
    rigw.start()
    reading = rigw.watcher.inventory()
    assert reading is not None
    taken_at, gpus = reading
    assert taken_at == rigw.watcher.report()["updated_at"]
    assert [(gpu["uuid"], gpu["index"], gpu["usable"], gpu["stray_pids"]) for gpu in gpus] == [
        (UUID0, 0, True, (300,)), (UUID1, 1, True, (300,))]


def test_refresh_reads_now_or_right_after_the_reading_under_way(rigw: Rigw) -> None:
    rigw.start()
    assert rigw.loop.pending() == [5.0]
    rigw.watcher.refresh()
    assert rigw.loop.pending() == [0.0], "a job ended: read the GPUs now, not at the next poll"
    rigw.loop.run()
    assert rigw.worker.tasks == 2 and rigw.loop.pending() == [5.0]
    rigw.worker.hold = True
    rigw.loop.run(5.0)
    assert rigw.worker.busy
    rigw.watcher.refresh()
    rigw.worker.release()
    rigw.loop.run()
    assert rigw.worker.tasks == 4, "the reading under way began before the end: one more at once"
    assert rigw.loop.pending() == [5.0]


def test_a_live_job_without_gpu_processes_uses_no_memory(rigw: Rigw) -> None:
    watcher = rigw.start()
    assert watcher.job_gpu_memory(7) == {}


def test_strays_are_announced_once_and_cleared_when_they_go(rigw: Rigw) -> None:
    populate(rigw)
    rigw.start()
    rigw.loop.run(5.0)
    rigw.loop.run(5.0)
    assert len(rigw.found) == 1 and rigw.watcher.report()["strays"][0]["ticks"] == 3
    rigw.nvml.clear()
    rigw.loop.run(5.0)
    assert [c["pid"] for c in rigw.cleared] == [300] and rigw.watcher.report()["strays"] == []
    assert "no longer on any GPU" in rigw.cleared[0]["cleared_because"]


def test_a_reused_pid_is_a_new_stray(rigw: Rigw) -> None:
    populate(rigw)
    rigw.start()
    rigw.procs.add(proc(300, cgroup="/", uid=1001, user="bob", start=99999))
    rigw.loop.run(5.0)
    assert [f["pid"] for f in rigw.found] == [300, 300] and [c["pid"] for c in rigw.cleared] == [300]


def test_a_job_that_ended_leaves_a_stray_in_its_scope(rigw: Rigw) -> None:
    populate(rigw)
    rigw.start()
    rigw.live = []
    rigw.loop.run(5.0)
    stray = next(s for s in rigw.watcher.report()["strays"] if s["pid"] == 100)
    assert stray["unit"] == "gpujob-7.scope" and "job 7, which has ended" in stray["note"]


def test_unavailable_nvml_backs_off_and_recovers(rigw: Rigw) -> None:
    rigw.nvml.error = "Driver Not Loaded (NVML error 9)"
    watcher = rigw.start()
    report = watcher.report()
    assert (report["state"], report["available"]) == ("unavailable", False)
    assert report["reason"] == "Driver Not Loaded (NVML error 9)" and report["devices"] == []
    assert report["retry_in_s"] == 5.0
    delays = []
    for _ in range(5):
        delays.append(rigw.loop.pending()[0])
        rigw.loop.run(rigw.loop.pending()[0])
    assert delays == [5.0, 10.0, 20.0, 40.0, 40.0], "doubling up to gpu.retry_max_s"
    assert rigw.nvml.reads == 6, "one read per wait, never a hot loop"
    assert watcher.job_gpu_memory(7) is None and watcher.blocking_strays(None) is None
    rigw.nvml.error = None
    rigw.loop.run(40.0)
    assert watcher.report()["state"] == "ok" and "retry_in_s" not in watcher.report()
    assert rigw.loop.pending() == [5.0]
    rigw.nvml.error = "Unknown Error (NVML error 999)"
    rigw.loop.run(5.0)
    assert watcher.report()["state"] == "unavailable" and rigw.loop.pending() == [5.0], "back-off restarts"


def test_a_failing_nvml_mid_run_keeps_the_strays_but_restarts_their_count(rigw: Rigw) -> None:
    populate(rigw)
    rigw.start()
    rigw.loop.run(5.0)
    rigw.nvml.error = "GPU is lost (NVML error 15)"
    rigw.loop.run(5.0)
    report = rigw.watcher.report()
    assert report["state"] == "unavailable" and report["strays"][0]["ticks"] == 0
    assert rigw.cleared == [], "not knowing is not clearing"
    rigw.nvml.error = None
    rigw.loop.run(5.0)
    assert rigw.watcher.report()["strays"][0]["ticks"] == 1 and len(rigw.found) == 1


def test_a_hung_call_is_reported_and_no_second_call_is_made(rigw: Rigw) -> None:
    watcher = rigw.start()
    rigw.worker.hold = True
    rigw.loop.run(5.0)  # the tick's task is now stuck in the kernel
    rigw.worker.stuck = ("nvmlDeviceGetComputeRunningProcesses(GPU 1)", 1.0)
    rigw.loop.run(2.0)  # the watchdog: 1 s into the call, not yet hung
    assert watcher.report()["state"] == "ok"
    rigw.worker.stuck = ("nvmlDeviceGetComputeRunningProcesses(GPU 1)", 2.5)
    rigw.loop.run(1.0)
    report = watcher.report()
    assert (report["state"], report["available"]) == ("hung", False)
    assert report["reason"].startswith("nvml call hung: nvmlDeviceGetComputeRunningProcesses(GPU 1)")
    assert rigw.loop.pending() == [], "nothing is scheduled while the call is stuck"
    tasks = rigw.worker.tasks
    rigw.loop.run(600.0)
    assert rigw.worker.tasks == tasks, "no second call while one is stuck"
    rigw.worker.release()  # the call returns at last
    rigw.loop.run()
    assert watcher.report()["state"] == "unavailable" and "recovering" in watcher.report()["reason"]
    assert rigw.loop.pending() == [5.0]
    rigw.loop.run(5.0)
    assert watcher.report()["state"] == "ok"


def test_a_hung_proc_read_is_named_as_such(rigw: Rigw) -> None:
    watcher = rigw.start()
    rigw.worker.hold = True
    rigw.worker.stuck = ("/proc/4242", 3.0)
    rigw.loop.run(7.0)
    assert watcher.report()["reason"].startswith("/proc read hung: /proc/4242")


def test_the_watcher_is_off_when_configured_so() -> None:
    r = Rigw(gpu_config(watch=False))
    watcher = r.start()
    assert watcher.report()["state"] == "disabled" and "gpu.watch = false" in watcher.report()["reason"]
    assert r.loop.pending() == [] and r.nvml.reads == 0


def test_blocking_strays_follow_cuda_visible_devices(rigw: Rigw) -> None:
    rigw.procs.add(proc(300, cgroup="/", uid=1001, user="bob"))
    rigw.nvml.place(1, 300, 1 << 30)
    rigw.start()
    assert [s["pid"] for s in rigw.watcher.blocking_strays(None)] == [300]  # type: ignore[union-attr]
    assert rigw.watcher.blocking_strays("0") == []
    assert [s["gpu_indexes"] for s in rigw.watcher.blocking_strays("0,1")] == [[1]]  # type: ignore[union-attr]
    assert len(rigw.watcher.blocking_strays(UUID1[:12])) == 1  # type: ignore[arg-type]
    assert rigw.watcher.blocking_strays("") == [] and rigw.watcher.blocking_strays("-1") == []


# -- the kill policy through the watcher ---------------------------------------------------------------


def killing(**gpu: Any) -> Rigw:
    values: Dict[str, Any] = {"stray_policy": "kill", "stray_grace_s": 12.0, "stray_kill_min_ticks": 3}
    values.update(gpu)
    return Rigw(gpu_config(**values))


def test_the_report_policy_never_kills(rigw: Rigw) -> None:
    populate(rigw)
    rigw.start()
    rigw.loop.run(600.0)
    assert rigw.kills == [] and rigw.stopped_units == []


def test_kill_waits_for_the_grace_and_the_ticks_then_kills_exactly_what_the_rules_match() -> None:
    r = killing(stray_kill_users=["bob"])
    populate(r)
    victim = r.procs.table[300]
    other = r.procs.add(proc(400, cgroup="/", uid=1003, user="dave", ppid=1))  # not a listed user
    rooted = r.procs.add(proc(500, cgroup="/", uid=0, user="root", ppid=1))
    r.nvml.place(0, 400)
    r.nvml.place(0, 500)
    r.start()  # t=0, tick 1
    r.loop.run(5.0)  # t=5, tick 2
    r.loop.run(5.0)  # t=10, tick 3: enough ticks, grace not over
    assert r.kills == []
    strays = {s["pid"]: s for s in r.watcher.report()["strays"]}
    assert strays[300]["action"].startswith("kill pending: stray for 10 s")
    assert strays[400]["action"].startswith("spared: user dave is not in gpu.stray_kill_users")
    assert strays[500]["action"].startswith("spared: root's processes")
    r.loop.run(5.0)  # t=15: grace over
    assert r.kills == [(300, victim.identity, signal.SIGTERM)]
    assert r.stopped_units == []
    r.loop.run(50.0)
    assert [k[0] for k in r.kills] == [300, 300] and r.kills[1][2] == signal.SIGKILL, \
        "SIGKILL once jobs.stop_timeout_s after an ignored SIGTERM, and only once"
    assert other.pid not in [k[0] for k in r.kills] and rooted.pid not in [k[0] for k in r.kills]
    r.nvml.clear()
    r.loop.run(5.0)
    cleared = {c["pid"]: c["cleared_because"] for c in r.cleared}
    assert cleared[300] == "killed" and "no longer" in cleared[400]


def test_a_stray_in_an_ended_jobs_scope_is_stopped_through_systemd() -> None:
    r = killing(stray_grace_s=0.0, stray_kill_min_ticks=1)
    r.live = []
    r.procs.add(proc(100, cgroup="/gpujob.slice/gpujob-7.scope", ppid=1))
    r.nvml.place(0, 100)
    r.start()
    assert r.stopped_units == ["gpujob-7.scope"] and r.kills == []
    r.loop.run(60.0)
    assert r.stopped_units == ["gpujob-7.scope"], "asked once; systemd escalates by itself"


def test_a_live_jobs_process_and_a_units_are_never_killed() -> None:
    r = killing(stray_grace_s=0.0, stray_kill_min_ticks=1, stray_kill_orphans_only=False)
    populate(r)
    r.procs.table.pop(300)
    r.start()
    r.loop.run(600.0)
    assert r.kills == [] and r.stopped_units == [] and r.watcher.report()["strays"] == []


def test_a_kill_that_finds_another_process_is_logged_and_not_retried_blindly() -> None:
    r = killing(stray_grace_s=0.0, stray_kill_min_ticks=1)
    r.procs.add(proc(300, cgroup="/", uid=1001, user="bob"))
    r.nvml.place(0, 300)
    r.kill_result = (False, "PID 300 is no longer the process judged")
    r.start()
    assert len(r.kills) == 1
    stray = r.watcher.report()["strays"][0]
    assert stray["action"] == "not killed: PID 300 is no longer the process judged"


def test_the_orphans_only_rule_spares_a_process_whose_parent_lives() -> None:
    r = killing(stray_grace_s=0.0, stray_kill_min_ticks=1)
    r.procs.add(proc(300, cgroup="/", uid=1001, user="bob", ppid=299, parent_comm="bash"))
    r.nvml.place(0, 300)
    r.start()
    r.loop.run(60.0)
    assert r.kills == []
    assert "not PID 1 or a subreaper" in r.watcher.report()["strays"][0]["action"]


# ---------------------------------------------------------------------------------------------------
# The check before a job starts (the manager, with test_manager's rig and a fake watcher).


class FakeGpus:
    def __init__(self) -> None:
        self.strays: Optional[List[Dict[str, Any]]] = []
        self.asked: List[Optional[str]] = []

        self.reason = ""
        self.refreshed = 0

    def blocking_strays(self, cuda_visible_devices: Optional[str]) -> Optional[List[Dict[str, Any]]]:
        self.asked.append(cuda_visible_devices)
        return None if self.strays is None else list(self.strays)

    def inventory(self) -> Optional[Tuple[float, List[Dict[str, Any]]]]:
        return None if self.strays is None else (0.0, [])

    def refresh(self) -> None:
        self.refreshed += 1


STRAY = {"pid": 4242, "user": "bob", "command": ["python", "leftover.py"], "gpu_indexes": [0],
         "used_memory_bytes": 3 << 30, "cgroup": "/", "unit": None}


def with_gpus(rig: Rig, gpus: FakeGpus) -> Rig:
    rig.manager = Manager(rig.config, rig.store, rig.systemd, rig.files, rig.spawner, rig.scheduler,
                          rig._changed, users=users, clock=rig.clock, gpus=gpus)
    rig.systemd.manager = rig.manager
    return rig


@pytest.fixture
def gpus() -> FakeGpus:
    return FakeGpus()


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path, gpus: FakeGpus) -> Iterator[MakeRig]:
    """test_manager's rig (a Manager over stateful fakes and a real store), with the fake watcher."""
    opened: List[Rig] = []

    def make(**sections: Dict[str, Any]) -> Rig:
        store = Store(tmp_path / f"state-{len(opened)}.sqlite3")
        journal = tm.Journal(store)
        rig = tm.Rig(config=config_from_mapping({**tm.LEGACY, **sections}), store=store,
                     journal=journal, clock=tm.FakeClock(), systemd=tm.FakeSystemd(journal),
                     files=tm.FakeFiles(journal), spawner=tm.FakeSpawner(journal),
                     scheduler=tm.FakeScheduler())
        opened.append(rig)
        return with_gpus(rig, gpus)

    yield make
    for rig in opened:
        rig.files.close()
        rig.store.close()


def test_check_off_by_default_asks_nothing(make_rig: MakeRig, gpus: FakeGpus) -> None:
    rig = make_rig()
    gpus.strays = [STRAY]
    job = rig.submit()
    assert job.state is JobState.STARTING and gpus.asked == []


def test_refuse_names_the_stray_and_creates_nothing(make_rig: MakeRig, gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "refuse"})
    gpus.strays = [STRAY]
    with pytest.raises(Refused) as caught:
        rig.manager.submit(OWNER, spec(env={"CUDA_VISIBLE_DEVICES": "0"}))
    message = str(caught.value)
    for fragment in ("GPU 0", "PID 4242", "bob", "`python leftover.py`", "3.0 GiB", "gpujobctl gpus"):
        assert fragment in message, fragment
    assert gpus.asked == ["0"] and rig.store.count_jobs() == 0 and rig.systemd.scopes == {}


def test_a_jobs_own_check_overrides_the_servers(make_rig: MakeRig, gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "refuse"})
    gpus.strays = [STRAY]
    assert rig.submit(gpu_check="off").state is JobState.STARTING
    rig2 = make_rig()
    with pytest.raises(Refused):
        rig2.manager.submit(OWNER, spec(gpu_check="refuse"))


def test_free_gpus_or_unreadable_ones_start_at_once(make_rig: MakeRig, gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "refuse"})
    assert rig.submit().state is JobState.STARTING
    gpus.strays = None  # NVML unavailable: unknown is not "held"
    assert rig.submit().state is JobState.STARTING


def test_wait_queues_the_job_and_starts_it_when_the_gpus_are_free(make_rig: MakeRig,
                                                                   gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "wait", "prestart_wait_s": 120.0})
    gpus.strays = [STRAY]
    job = rig.submit()
    assert job.state is JobState.QUEUED and rig.spawner.gates == {} and rig.systemd.scopes == {}
    assert [seconds for seconds, _ in rig.scheduler.timers.values()] == [120.0]
    rig.manager.gpus_changed()  # still held
    assert rig.job(job.id).state is JobState.QUEUED
    wait = rig.manager.queue.wait_of(job.id)
    assert wait is not None and wait.waiting_for.startswith("strays to leave its GPUs: ")
    gpus.strays = []
    rig.manager.gpus_changed()
    assert rig.job(job.id).state is JobState.STARTING and rig.spawner.gates[job.id]
    assert [seconds for seconds, _ in rig.scheduler.timers.values()] == [rig.config.daemon.start_timeout_s], \
        "the wait's timer is gone; only the start timer is armed"
    rig.systemd.finish_start_job(job.unit, "done")
    assert rig.job(job.id).state is JobState.RUNNING
    assert rig.states(job.id) == [JobState.STARTING, JobState.RUNNING]


def test_a_wait_that_runs_out_fails_the_job_naming_the_stray(make_rig: MakeRig,
                                                             gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "wait", "prestart_wait_s": 30.0})
    gpus.strays = [STRAY]
    job = rig.submit()
    rig.scheduler.fire_all()
    ended = rig.job(job.id)
    assert ended.state is JobState.FAILED and ended.outcome is not None
    assert ended.outcome.reason is EndReason.START_FAILED
    assert "waited 30 s (gpu.prestart_wait_s)" in ended.outcome.detail and "PID 4242" in ended.outcome.detail
    assert rig.spawner.gates == {}


def test_stopping_a_queued_job_ends_it_at_once(make_rig: MakeRig, gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "wait"})
    gpus.strays = [STRAY]
    job = rig.submit()
    rig.manager.stop(OWNER, job.id)
    ended = rig.job(job.id)
    assert ended.state is JobState.STOPPED and ended.stopped_by == OWNER.user
    assert rig.scheduler.timers == {} and rig.systemd.stop_requests == []
    gpus.strays = []
    rig.manager.gpus_changed()
    assert rig.job(job.id).state is JobState.STOPPED and rig.spawner.gates == {}


def test_a_job_queued_when_the_daemon_stopped_waits_again_after_reconcile(make_rig: MakeRig,
                                                                        gpus: FakeGpus) -> None:
    rig = make_rig(gpu={"prestart_check": "wait"})
    gpus.strays = [STRAY]
    job = rig.submit()
    manager = rig.restart()
    with_gpus(rig, gpus)
    rig.manager.reconcile()
    assert manager is not rig.manager
    waiting = rig.job(job.id)
    assert waiting.state is JobState.QUEUED and job.id not in rig.spawner.gates
    gpus.strays = []
    rig.manager.gpus_changed()
    assert rig.job(job.id).state is JobState.STARTING


def test_live_job_ids_are_the_non_final_jobs(make_rig: MakeRig) -> None:
    rig = make_rig()
    running = rig.start()
    ended = rig.start()
    rig.systemd.scope_ends(ended.unit)
    assert rig.manager.live_job_ids() == [running.id]


# ---------------------------------------------------------------------------------------------------
# On the wire: the Gpus report, the stray signals, a job's gpu_memory_bytes, the gpu_check field.


def test_the_report_goes_on_the_wire_and_back_to_json(rigw: Rigw) -> None:
    from gi.repository import GLib

    from gpujobd.daemon.adapters.dbus_service import variants
    from gpujobd.shared import api

    populate(rigw)
    rigw.nvml.devices[1] = Device(**{**rigw.nvml.devices[1].__dict__, "state": "ok",
                                     "errors": {"utilization": "Insufficient Permissions"}})
    rigw.start()
    wire = variants(api.encode_gpu_report(rigw.watcher.report()))
    received = GLib.Variant("a{sv}", wire).unpack()
    out = api.gpu_report_to_json(received)
    assert list(out) == list(api.GPU_REPORT_FIELDS)
    assert out["state"] == "ok" and out["updated_at"].endswith("Z") and out["retry_in_s"] is None
    gpu0, gpu1 = out["devices"]
    assert gpu1["errors"] == {"utilization": "Insufficient Permissions"}
    assert list(gpu0["processes"][0]) == list(api.GPU_PROCESS_FIELDS)
    bogus = next(p for p in gpu1["processes"] if p["pid"] == 4294967295)
    assert bogus["owner"] == "unknown" and bogus["used_memory_bytes"] is None and bogus["user"] is None
    (stray,) = out["strays"]
    assert stray["gpus"] == {UUID0: 1 << 30, UUID1: 1 << 29} and stray["started_at"].endswith("Z")
    assert stray["command"] == ["python", "leftover.py"]
    signal_args = variants(api.encode_stray(rigw.found[0]))
    assert api.stray_to_json(GLib.Variant("a{sv}", signal_args).unpack())["pid"] == 300


def test_an_unavailable_report_on_the_wire(rigw: Rigw) -> None:
    from gi.repository import GLib

    from gpujobd.daemon.adapters.dbus_service import NO_WATCHER_REPORT, variants
    from gpujobd.shared import api

    rigw.nvml.error = "Driver Not Loaded (NVML error 9)"
    rigw.start()
    out = api.gpu_report_to_json(GLib.Variant("a{sv}", variants(api.encode_gpu_report(
        rigw.watcher.report()))).unpack())
    assert (out["available"], out["reason"], out["devices"], out["retry_in_s"]) == (
        False, "Driver Not Loaded (NVML error 9)", [], 5.0)
    assert api.gpu_report_to_json(GLib.Variant("a{sv}", variants(api.encode_gpu_report(
        NO_WATCHER_REPORT))).unpack())["state"] == "disabled"


def test_a_live_jobs_wire_form_carries_its_gpu_memory() -> None:
    from gpujobd.daemon.adapters.dbus_service import ManagerService
    from gpujobd.daemon.manager import Caller
    from gpujobd.shared import api
    from gpujobd.shared.model import Job, JobSpec, Outcome

    class Files:
        @staticmethod
        def log_path(job_id: int) -> str:
            return f"/var/log/gpujobd/jobs/{job_id}.log"

    class Gpus:
        def report(self) -> Dict[str, Any]:
            return {}

        def job_gpu_memory(self, job_id: int) -> Optional[Dict[str, int]]:
            return {UUID0: 5 << 30} if job_id == 7 else None

    svc = ManagerService(Files(), None, gpus=Gpus())  # type: ignore[arg-type]
    owner = Caller(uid=1000, user="alice", gid=1000, admin=lambda: False)
    running = Job(id=7, user="alice", uid=1000, gid=1000, spec=JobSpec(argv=("x",), cwd="/"),
                  state=JobState.RUNNING, created_at=WALL0, unit="gpujob-7.scope", started_at=WALL0)
    assert svc._encode(running, owner)["gpu_memory_bytes"].unpack() == {UUID0: 5 << 30}
    ended = Job(id=7, user="alice", uid=1000, gid=1000, spec=JobSpec(argv=("x",), cwd="/"),
                state=JobState.SUCCEEDED, created_at=WALL0, unit="gpujob-7.scope", started_at=WALL0,
                ended_at=WALL0 + 1, outcome=Outcome(EndReason.EXIT_CODE, exit_code=0))
    assert "gpu_memory_bytes" not in svc._encode(ended, owner)
    assert api.job_to_json({"gpu_memory_bytes": {UUID0: 1}})["gpu_memory_bytes"] == {UUID0: 1}
    assert "gpu_memory_bytes" in api.JSON_FIELDS


def test_the_gpu_check_of_a_spec() -> None:
    from gpujobd.shared import api, config, jobspec

    assert api.GPU_CHECKS == config.PRESTART_CHECKS
    assert jobspec.decode({"argv": ["true"], "cwd": "/", "gpu_check": "wait"}).gpu_check == "wait"
    assert jobspec.decode({"argv": ["true"], "cwd": "/"}).gpu_check is None
    sometimes = jobspec.decode({"argv": ["true"], "cwd": "/", "gpu_check": "sometimes"})
    assert jobspec.problems(sometimes, config.JobsConfig()) == [
        "gpu_check (--gpu-check) is 'sometimes': give one of off, refuse, wait"]
    with pytest.raises(InvalidArgument, match="'gpu_check': expected a string"):
        jobspec.decode({"argv": ["true"], "cwd": "/", "gpu_check": 1})


# ---------------------------------------------------------------------------------------------------
# gpujobctl gpus, and the warning of gpujobctl status.


class GpuClient:
    def __init__(self, report: Dict[str, Any]):
        self.report = report

    def gpus(self, *, raw: bool = False) -> Dict[str, Any]:
        from gpujobd.shared import api

        return dict(self.report) if raw else api.gpu_report_to_json(self.report)

    def get(self, job_id: int, *, raw: bool = False) -> Dict[str, Any]:
        return {"id": job_id, "state": "running", "user": "alice", "unit": f"gpujob-{job_id}.scope"}


def wire_report(rigw: Rigw) -> Dict[str, Any]:
    from gi.repository import GLib

    from gpujobd.daemon.adapters.dbus_service import variants
    from gpujobd.shared import api

    return GLib.Variant("a{sv}", variants(api.encode_gpu_report(rigw.watcher.report()))).unpack()


def test_gpujobctl_gpus_shows_owners_like_nvidia_smi(rigw: Rigw, capsys: pytest.CaptureFixture) -> None:
    from gpujobd.cli import main as cli

    populate(rigw)
    rigw.start()
    capsys.readouterr()  # the watcher's log lines
    assert cli.main(["gpus"], client_factory=lambda: GpuClient(wire_report(rigw))) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["GPU", "UUID", "NAME", "MEMORY", "UTIL", "STATE"]
    assert lines[1].split()[:3] == ["0", UUID0, "H100"] and "1.0 GiB / 80.0 GiB" in lines[1]
    table = {line.split()[1]: line for line in lines if line[:1].isdigit() and len(line.split()) > 6}
    assert "job 7" in table["100"] and "gpujob-7.scope" in table["100"] and "3.0 GiB" in table["100"]
    assert "STRAY" in table["300"] and "bob" in table["300"] and "python leftover.py" in table["300"]
    assert "jupyter.service" in table["200"] and " G " in table["200"]
    assert "not a valid PID" in table["4294967295"] and " ? " in table["4294967295"]
    assert "1 stray process (policy report):" in out
    assert "PID 300 (parent 1) of bob on GPU 0,1, 1.5 GiB" in out


def test_gpujobctl_gpus_json_is_the_documented_report(rigw: Rigw, capsys: pytest.CaptureFixture) -> None:
    import json

    from gpujobd.cli import main as cli
    from gpujobd.shared import api

    populate(rigw)
    rigw.start()
    capsys.readouterr()
    assert cli.main(["gpus", "--json"], client_factory=lambda: GpuClient(wire_report(rigw))) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(api.GPU_REPORT_FIELDS) and out["strays"][0]["pid"] == 300


def test_gpujobctl_gpus_when_nvml_is_unavailable(rigw: Rigw, capsys: pytest.CaptureFixture) -> None:
    from gpujobd.cli import main as cli

    rigw.nvml.error = "Driver Not Loaded (NVML error 9)"
    rigw.start()
    capsys.readouterr()  # the watcher's log lines
    assert cli.main(["gpus"], client_factory=lambda: GpuClient(wire_report(rigw))) == 0
    assert capsys.readouterr().out == "GPUs unavailable: Driver Not Loaded (NVML error 9) (next try in 5 s)\n"


def test_gpujobctl_status_warns_of_strays(rigw: Rigw, capsys: pytest.CaptureFixture) -> None:
    from gpujobd.cli import main as cli

    populate(rigw)
    rigw.start()
    capsys.readouterr()
    assert cli.main(["status", "7", "--json"], client_factory=lambda: GpuClient(wire_report(rigw))) == 0
    err = capsys.readouterr().err
    assert "warning: 1 stray GPU process outside any job (PID 300 of bob on GPU 0,1)" in err
    assert "gpujobctl gpus" in err
    rigw.nvml.clear()
    rigw.loop.run(5.0)
    capsys.readouterr()
    assert cli.main(["status", "7", "--json"], client_factory=lambda: GpuClient(wire_report(rigw))) == 0
    assert capsys.readouterr().err == ""


def test_size_and_age_words() -> None:
    from gpujobd.cli.gpus import age, size

    assert [size(n) for n in (None, 0, 1023, 1024, 3 << 30, 5 << 40)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "3.0 GiB", "5.0 TiB"]
    assert [age(s) for s in (None, 5, 65, 3700, 90000)] == ["-", "5s", "1m05s", "1h01m", "1d01h"]


def test_status_shows_a_jobs_gpu_memory() -> None:
    from gpujobd.cli.gpus import gpu_memory_line

    assert gpu_memory_line({"gpu_memory_bytes": {UUID1: 1 << 30, UUID0: 5 << 30}}) == (
        f"gpu memory: {UUID0} 5.0 GiB, {UUID1} 1.0 GiB")
    assert gpu_memory_line({"gpu_memory_bytes": {}}) is None and gpu_memory_line({}) is None


def test_the_client_sends_gpu_check_and_reads_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpujobd import client

    assert client.spec_values(["true"], cwd="/", gpu_check="wait")["gpu_check"] == "wait"
    assert "gpu_check" not in client.spec_values(["true"], cwd="/")
    with pytest.raises(InvalidArgument, match=r"gpu_check \(--gpu-check\): expected a string"):
        client.spec_values(["true"], cwd="/", gpu_check=1)
    calls = []

    class Reply:
        body = ({"state": ("s", "ok"), "available": ("b", True)},)

    def call(self: Any, method: str, signature: Any, args: Any) -> Reply:
        calls.append((method, signature, args))
        return Reply()

    from gpujobd.client.transport import Transport

    monkeypatch.setattr(Transport, "_call", call)
    report = client.Client().gpus()
    assert calls == [("Gpus", None, ())]
    assert report["state"] == "ok" and report["devices"] == [] and report["updated_at"] is None
    assert client.Client().gpus(raw=True) == {"state": "ok", "available": True}


# ---------------------------------------------------------------------------------------------------
# A tick reads only what changed (issue 13).


def test_a_tick_where_nothing_changed_reads_no_process_in_full_and_reuses_every_view(rigw: Rigw) -> None:
    populate(rigw)
    watcher = rigw.start()
    first = [p for d in watcher._devices for p in d["processes"]]
    looked = list(rigw.procs.inspected)
    assert sorted(looked) == [100, 200, 300]  # each once, though 300 is on two GPUs
    rigw.loop.run(5.0)  # the next tick
    assert rigw.watcher.ticks >= 0 and rigw.procs.inspected == looked, "only start times were read"
    again = [p for d in watcher._devices for p in d["processes"]]
    assert len(again) == len(first) and all(a is b for a, b in zip(again, first))


def test_a_reused_pid_is_read_again_and_judged_anew(rigw: Rigw) -> None:
    populate(rigw)
    watcher = rigw.start()
    rigw.procs.add(proc(300, cgroup="/gpujob.slice/gpujob-7.scope", start=9999))  # a new process
    rigw.loop.run(5.0)
    assert rigw.procs.inspected.count(300) == 2
    owners = {p["pid"]: p["owner"] for d in watcher._devices for p in d["processes"]}
    assert owners[300] == "job"


def test_a_job_that_ended_makes_its_process_a_stray_at_the_next_tick(rigw: Rigw) -> None:
    populate(rigw)
    watcher = rigw.start()
    rigw.live.clear()  # job 7 ended; its process on GPU 0 did not
    rigw.loop.run(5.0)
    view = next(p for p in watcher._devices[0]["processes"] if p["pid"] == 100)
    assert view["owner"] == "stray" and rigw.procs.inspected.count(100) == 1


# Which processes are still the ones read (ProcFs.same_processes): a pidfd, else a mark of /proc/PID.


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux >= 5.3)")
def test_a_process_read_in_full_is_pinned_by_a_pidfd_and_its_exit_is_seen() -> None:
    child = sleeper()
    procs = ProcFs()
    try:
        info = procs.inspect(child.pid)
        assert info is not None and child.pid in procs._pidfds and child.pid not in procs._marks
        assert procs.same_processes({child.pid: info.start_ticks}) == {child.pid}
        assert procs.same_processes({child.pid: info.start_ticks + 1}) == set()  # another start: not it
        assert child.pid not in procs._pidfds
    finally:
        child.kill()
        child.wait()
    info2 = procs.inspect(os.getpid())
    assert info2 is not None
    known = {child.pid: info.start_ticks, os.getpid(): info2.start_ticks}
    assert procs.same_processes(known) == {os.getpid()}
    procs.close()
    assert procs._pidfds == {}


def test_past_the_pidfd_budget_a_process_is_checked_by_its_mark() -> None:
    child = sleeper()
    procs = ProcFs(pidfd_max=0)
    try:
        info = procs.inspect(child.pid)
        assert info is not None and procs._pidfds == {} and child.pid in procs._marks
        assert procs.same_processes({child.pid: info.start_ticks}) == {child.pid}
    finally:
        child.kill()
        child.wait()
    assert procs.same_processes({child.pid: info.start_ticks}) == set()
    assert child.pid not in procs._marks


def test_a_proc_tree_that_is_not_the_real_one_gets_no_pidfds(fake_proc: Path) -> None:
    write_proc(fake_proc, os.getpid())  # a real PID: a pidfd would name this very process
    procs = ProcFs(root=str(fake_proc), clock_ticks=100)
    assert procs.inspect(os.getpid()) is not None
    assert procs._pidfds == {} and os.getpid() in procs._marks


def test_a_pid_taken_over_in_the_same_clock_tick_is_read_again_for_its_mark(fake_proc: Path) -> None:
    """The start time alone cannot tell a process from one that took over its PID within the same clock
    tick; /proc/PID itself is new for the newcomer (here: another directory in its place)."""
    write_proc(fake_proc, 4242, cgroup="0::/\n", start=5000)
    procs = ProcFs(root=str(fake_proc), clock_ticks=100)
    cache = reading.ProcCache()
    cache.check(procs, [4242])
    first = cache.infos(procs, [4242], procs.pid_max(), NO_STEPS)
    cache.check(procs, [4242])
    assert cache.infos(procs, [4242], procs.pid_max(), NO_STEPS) is first, "unchanged: the same mapping"
    write_proc(fake_proc / "new", 4242, cgroup="0::/gpujob.slice/gpujob-9.scope\n", start=5000)
    (fake_proc / "4242").rename(fake_proc / "gone")  # kept, so its inode number is not handed out again
    (fake_proc / "new" / "4242").rename(fake_proc / "4242")
    cache.check(procs, [4242])
    again = cache.infos(procs, [4242], procs.pid_max(), NO_STEPS)
    old, new = first[4242], again[4242]
    assert old is not None and new is not None and old.start_ticks == new.start_ticks == 5000
    assert again is not first and new.unit == "gpujob-9.scope"


REUSE_IN_A_PID_NAMESPACE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from gpujobd.daemon.adapters.procfs import ProcFs

def child():
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return pid

out = {}
for name, pidfd_max in (("pidfd", 512), ("mark", 0)):
    procs = ProcFs(pidfd_max=pidfd_max)
    first = child()
    info = procs.inspect(first)
    os.kill(first, 9)
    os.waitpid(first, 0)
    for _ in range(5):  # the next PID handed out is the one just freed
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(first - 1))
        second = child()
        if second == first:
            break
        os.kill(second, 9)
        os.waitpid(second, 0)
    same = sorted(procs.same_processes({first: info.start_ticks}))  # as the next tick asks
    stat = open(f"/proc/{second}/stat").read()
    out[name] = {"reused": second == first, "same": same,
                 "same_tick": int(stat[stat.rindex(")") + 2:].split()[19]) == info.start_ticks}
    os.kill(second, 9)
    os.waitpid(second, 0)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a private PID namespace needs root")
def test_a_reused_pid_is_never_the_same_process_by_pidfd_or_by_mark() -> None:
    """A real PID reuse, forced inside a private PID namespace (ns_last_pid): the process read, then a
    newcomer with its PID, often started in the same clock tick. Neither check takes one for the other."""
    checkout = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                           REUSE_IN_A_PID_NAMESPACE, checkout], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"no private PID namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for name in ("pidfd", "mark"):
        assert out[name]["reused"], out
        assert out[name]["same"] == [], out


# The main loop's part when nothing changed.


def test_a_snapshot_where_nothing_changed_is_not_judged_again(rigw: Rigw,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    populate(rigw)
    judged: List[int] = []
    real = Watcher._judge

    def counting(self: Watcher, snapshot: reading.Snapshot, live: Set[int]) -> Any:
        judged.append(rigw.watcher.ticks)
        return real(self, snapshot, live)

    monkeypatch.setattr(Watcher, "_judge", counting)
    watcher = rigw.start()
    lists = [d["processes"] for d in watcher._devices]
    memory = watcher.job_gpu_memory(7)
    rigw.loop.run(5.0)
    rigw.loop.run(5.0)
    assert judged == [1] and watcher.ticks == 3
    assert all(a is b for a, b in zip((d["processes"] for d in watcher._devices), lists))
    assert watcher.job_gpu_memory(7) == memory == {UUID0: 3 << 30}
    assert watcher.report()["strays"][0]["ticks"] == 3 and len(rigw.found) == 1 and rigw.cleared == []
    # A device's own figures are read anew though its processes are the same.
    rigw.nvml.devices[1] = Device(**{**rigw.nvml.devices[1].__dict__, "memory_used_bytes": 5 << 30})
    rigw.loop.run(5.0)
    assert judged == [1] and watcher.report()["devices"][1]["memory_used_bytes"] == 5 << 30
    rigw.nvml.place(0, 4242, 1)  # NVML lists a new process: judged again, read in full
    rigw.loop.run(5.0)
    assert judged == [1, 5] and rigw.procs.inspected.count(4242) == 1
    rigw.live.append(8)  # another live job: judged again
    rigw.loop.run(5.0)
    assert judged == [1, 5, 6] and watcher.job_gpu_memory(8) == {}


def test_the_worker_hands_back_the_very_mapping_when_no_process_changed(rigw: Rigw) -> None:
    populate(rigw)
    cache = reading.ProcCache()
    first = reading.collect(rigw.nvml, rigw.procs, NO_STEPS, cache)
    second = reading.collect(rigw.nvml, rigw.procs, NO_STEPS, cache)
    assert first.processes and second.processes is first.processes
    rigw.procs.add(proc(300, cgroup="/", start=4242))  # PID 300 is another process now
    third = reading.collect(rigw.nvml, rigw.procs, NO_STEPS, cache)
    assert third.processes is not first.processes
    old, new = first.processes[300], third.processes[300]
    assert old is not None and new is not None and (old.start_ticks, new.start_ticks) == (1000, 4242)
    assert rigw.procs.inspected.count(300) == 2 and rigw.procs.inspected.count(100) == 1


@pytest.mark.parametrize(("recheck_s", "poll_s", "expected"), [(0.5, 5.0, 0.5), (10.0, 2.0, 2.0)])
def test_a_tick_that_finds_the_worker_busy_looks_again_after_busy_recheck_s(
        recheck_s: float, poll_s: float, expected: float) -> None:
    r = Rigw(gpu_config(busy_recheck_s=recheck_s, poll_interval_s=poll_s))
    r.start()
    r.worker.busy = True  # a kill task still under way when the tick comes
    r.loop.run(poll_s)
    assert r.loop.pending() == [expected]
    r.worker.busy = False
    tasks = r.worker.tasks
    r.loop.run(expected)
    assert r.worker.tasks == tasks + 1, "the next look reads the GPUs"
