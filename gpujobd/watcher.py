"""The GPU watcher: who owns each process on the GPUs, and what to do about the ones nobody owns.

Every gpu.poll_interval_s the watcher hands one task to the worker thread (gpujobd.gpu.Worker): read
NVML, then inspect each listed PID in /proc (status, stat, cgroup, cmdline: reads that can block on a
wedged process, so never on the main loop). The result comes back to the main loop, where the rest is
pure: attribution, stray tracking, the kill policy, the report. See docs/gpu.md.

Attribution: PID -> /proc/<pid>/cgroup, the `0::` line only (other lines are a host's v1
hierarchies) -> the unit, the last path component ending in .scope or .service -> the job, for
`gpujob-<id>.scope`. A process is

- `job`: in the scope of a live gpujobd job;
- `unit`: in another systemd unit (a service, a user's session scope): shown, never acted on;
- `stray`: in no unit (the root cgroup, a bare slice), in init.scope though it is not PID 1, or in
  a `gpujob-<id>.scope` whose job is no longer live;
- `unknown`: NVML's PID is not a live process of this PID namespace (0, 2**32-1, a PID of another
  namespace, a process that exited between NVML's list and our look): reported, never acted on.

The seams are explicit parameters: the NVML reader, the /proc reader (`ProcFs(root=...)` or any
object with its methods), the worker, the scheduler, the clocks, systemd's stop_unit and the
callbacks, so tests/unit/test_watcher.py drives all of it without a GPU, a /proc or a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Protocol, Tuple

from gpujobd.config import Config
from gpujobd.gpu import Backoff, Device, Done, GpuProcess, Nvml, NvmlReport, NvmlUnavailable, Steps, Worker
from gpujobd.log import get_logger
from gpujobd.model import job_id_from_unit

log = get_logger()

OWNER_JOB = "job"
OWNER_UNIT = "unit"
OWNER_STRAY = "stray"
OWNER_UNKNOWN = "unknown"

STATE_STARTING = "starting"  # no read has finished yet
STATE_OK = "ok"
STATE_UNAVAILABLE = "unavailable"  # NVML cannot be used; `reason` says why, retried with back-off
STATE_HUNG = "hung"  # an NVML call has not returned; no other call is made until it does
STATE_DISABLED = "disabled"  # gpu.watch = false

DEFAULT_PID_MAX = 4194304  # the kernel's largest pid_max (PID_MAX_LIMIT on 64-bit)
DEFAULT_UID_MIN = 1000
KILL_ESCALATION_SIGNAL = signal.SIGKILL
COMMAND_LOG_CHARS = 200


# --- /proc ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What must still hold for a PID to be the process that was judged: checked after pidfd_open."""

    uid: int
    start_ticks: int
    cgroup: Optional[str]


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    uid: int  # real
    euid: int
    user: str
    comm: str
    cmdline: Tuple[str, ...]
    cgroup: Optional[str]  # the cgroup v2 path (the `0::` line); None when there is none
    start_ticks: int  # field 22 of /proc/<pid>/stat: clock ticks after boot
    started_at: float  # wall clock
    parent_comm: str = ""

    @property
    def unit(self) -> Optional[str]:
        return unit_of_cgroup(self.cgroup)

    @property
    def identity(self) -> Identity:
        return Identity(uid=self.uid, start_ticks=self.start_ticks, cgroup=self.cgroup)

    @property
    def command(self) -> Tuple[str, ...]:
        """The command line; a process without one (a kernel thread, a zombie) as `[comm]`."""
        return self.cmdline or (f"[{self.comm}]",)


def unit_of_cgroup(path: Optional[str]) -> Optional[str]:
    """The unit a cgroup belongs to: the last component ending in .scope or .service.
    `/gpujob.slice/gpujob-7.scope` -> `gpujob-7.scope`; `/` and bare slices -> None."""
    if not path:
        return None
    for part in reversed(path.split("/")):
        if part.endswith((".scope", ".service")):
            return part
    return None


def parse_cgroup(text: str) -> Optional[str]:
    """The v2 path of /proc/<pid>/cgroup: ONLY the `0::` line (the others are v1 hierarchies)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def parse_stat(text: str) -> Tuple[str, str, int, int]:
    """(comm, state, ppid, starttime) of /proc/<pid>/stat; comm may hold spaces and parentheses."""
    open_paren, close_paren = text.index("("), text.rindex(")")
    comm = text[open_paren + 1:close_paren]
    fields = text[close_paren + 2:].split()
    return comm, fields[0], int(fields[1]), int(fields[19])


def parse_status_uids(text: str) -> Tuple[int, int]:
    for line in text.splitlines():
        if line.startswith("Uid:"):
            real, effective = line.split()[1:3]
            return int(real), int(effective)
    raise ValueError("no Uid: line")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class ProcFs:
    """The real /proc (or a tree shaped like it, for tests). Used on the worker thread only."""

    def __init__(self, root: str = "/proc", user_name: Callable[[int], str] = _user_name,
                 clock_ticks: Optional[int] = None):
        self._root = root.rstrip("/")
        self._user_name = user_name
        self._ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self._pid_max: Optional[int] = None
        self._boot_time: Optional[float] = None

    def _read(self, *parts: object) -> str:
        with open("/".join([self._root, *map(str, parts)]), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def pid_max(self) -> int:
        if self._pid_max is None:
            try:
                self._pid_max = int(self._read("sys", "kernel", "pid_max").strip())
            except (OSError, ValueError):
                self._pid_max = DEFAULT_PID_MAX
        return self._pid_max

    def boot_time(self) -> float:
        if self._boot_time is None:
            self._boot_time = 0.0
            try:
                for line in self._read("stat").splitlines():
                    if line.startswith("btime "):
                        self._boot_time = float(line.split()[1])
            except OSError:
                pass
        return self._boot_time

    def identity(self, pid: int) -> Optional[Identity]:
        """uid, start time and cgroup of the process that has `pid` now; None when there is none."""
        if not 0 < pid <= self.pid_max():
            return None
        try:
            _, _, _, start = parse_stat(self._read(pid, "stat"))
            uid, _ = parse_status_uids(self._read(pid, "status"))
            cgroup = parse_cgroup(self._read(pid, "cgroup"))
            if parse_stat(self._read(pid, "stat"))[3] != start:
                return None  # the PID changed hands while we read
        except (OSError, ValueError, IndexError):
            return None
        return Identity(uid=uid, start_ticks=start, cgroup=cgroup)

    def inspect(self, pid: int) -> Optional[ProcInfo]:
        """The process that has `pid` in this PID namespace now, or None: no such process (never was,
        or it exited since NVML listed it), or a value that cannot be a PID."""
        if not 0 < pid <= self.pid_max():
            return None
        try:
            comm, _state, ppid, start = parse_stat(self._read(pid, "stat"))
            uid, euid = parse_status_uids(self._read(pid, "status"))
            cgroup = parse_cgroup(self._read(pid, "cgroup"))
            raw = self._read(pid, "cmdline")
            if parse_stat(self._read(pid, "stat"))[3] != start:
                return None  # exited and the PID was reused while we read: judge nothing
        except (OSError, ValueError, IndexError):
            return None
        cmdline = tuple(part for part in raw.split("\0") if part) if raw else ()
        parent_comm = ""
        if ppid > 0:
            with contextlib.suppress(OSError):
                parent_comm = self._read(ppid, "comm").strip()
        return ProcInfo(pid=pid, ppid=ppid, uid=uid, euid=euid, user=self._user_name(uid), comm=comm,
                        cmdline=cmdline, cgroup=cgroup, start_ticks=start,
                        started_at=self.boot_time() + start / self._ticks, parent_comm=parent_comm)


class ProcPort(Protocol):
    def pid_max(self) -> int: ...

    def inspect(self, pid: int) -> Optional[ProcInfo]: ...

    def identity(self, pid: int) -> Optional[Identity]: ...


def kill_verified(procs: ProcPort, pid: int, expected: Identity, signum: int, *,
                  pidfd_open: Callable[[int], int] = getattr(os, "pidfd_open", None),
                  send: Callable[[int, int], None] = getattr(signal, "pidfd_send_signal", None),
                  close: Callable[[int], None] = os.close) -> Tuple[bool, str]:
    """Signal `pid` only if it is still the process judged, with no PID-reuse race.

    pidfd_open pins whatever process has the PID now; /proc is read after that, and the signal goes
    through the pidfd: if the judged process exited before the open and the PID was reused, the
    identity (uid, start time, cgroup) differs and nothing is sent; if it exits after the check, the
    pidfd still names it, and the signal finds no one (ESRCH) rather than a newcomer."""
    if pid <= 1:
        return False, f"refused: PID {pid} is never signalled"
    if pidfd_open is None or send is None:
        return False, "this Python or kernel has no pidfd_open/pidfd_send_signal: not signalled"
    try:
        fd = pidfd_open(pid)
    except ProcessLookupError:
        return False, "the process had already exited"
    except OSError as err:
        return False, f"pidfd_open failed: {err.strerror or err}"
    try:
        now = procs.identity(pid)
        if now is None:
            return False, "the process had already exited"
        if now != expected:
            return False, (f"PID {pid} is no longer the process judged (now uid {now.uid}, start "
                           f"{now.start_ticks}, cgroup {now.cgroup}): not signalled")
        try:
            send(fd, signum)
        except ProcessLookupError:
            return False, "the process had already exited"
        except OSError as err:
            return False, f"pidfd_send_signal failed: {err.strerror or err}"
        return True, f"sent {signal.Signals(signum).name} through a pidfd"
    finally:
        close(fd)


# --- attribution --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    owner: str
    job_id: Optional[int] = None
    unit: Optional[str] = None
    note: str = ""


def attribute(pid: int, info: Optional[ProcInfo], live_jobs: Collection[int], pid_max: int) -> Attribution:
    if not 0 < pid <= pid_max:
        return Attribution(OWNER_UNKNOWN, note=f"NVML reported PID {pid}, which is not a valid PID here")
    if info is None:
        return Attribution(OWNER_UNKNOWN, note=f"no process {pid} in this PID namespace (it exited, or "
                                               "NVML reported a PID of another namespace)")
    unit = info.unit
    if info.cgroup is None:
        return Attribution(OWNER_STRAY, note="no cgroup v2 path: its unit is unknown")
    job_id = job_id_from_unit(unit) if unit else None
    if job_id is not None:
        if job_id in live_jobs:
            return Attribution(OWNER_JOB, job_id=job_id, unit=unit)
        return Attribution(OWNER_STRAY, unit=unit, note=f"in the scope of job {job_id}, which has ended")
    if unit is None:
        return Attribution(OWNER_STRAY, note=f"in no systemd unit (cgroup {info.cgroup})")
    if unit == "init.scope" and pid != 1:
        return Attribution(OWNER_STRAY, unit=unit, note="in init.scope, which is PID 1's own")
    return Attribution(OWNER_UNIT, unit=unit)


def is_orphan(info: ProcInfo) -> Tuple[bool, str]:
    """Parent is PID 1, or a recognised subreaper. The kernel does not show PR_SET_CHILD_SUBREAPER in
    /proc, so the one recognised is a `systemd` process (a user's service manager)."""
    if info.ppid == 1:
        return True, "its parent is PID 1"
    if info.ppid > 1 and info.parent_comm == "systemd":
        return True, f"its parent is a subreaper (PID {info.ppid}, systemd)"
    what = f"{info.parent_comm}, " if info.parent_comm else ""
    return False, f"its parent (PID {info.ppid}, {what}alive) is not PID 1 or a subreaper"


# --- the kill policy ---------------------------------------------------------------------------------

KILL = "kill"
WAIT = "wait"
SPARE = "spare"


@dataclass(frozen=True)
class Verdict:
    action: str  # kill, wait (not yet: grace or ticks), spare (never, by a rule)
    why: str
    rule: str = ""  # for a kill: the rules that matched


def kill_verdict(info: ProcInfo, unit: Optional[str], *, stray_for_s: float, ticks: int, config: Config,
                 daemon_pid: int, uid_min: int) -> Verdict:
    """Whether a stray is killed now. Never: PID 0 or 1, the daemon, root's processes (real or
    effective uid 0), system accounts (uid < UID_MIN), a process in a unit other than init.scope or
    an ended job's scope, one whose cgroup is unknown. Then only if every admin rule matches
    (gpu.stray_kill_users, gpu.stray_kill_orphans_only), and not before gpu.stray_grace_s and
    gpu.stray_kill_min_ticks."""
    gpu = config.gpu
    pid = info.pid
    if pid <= 1:
        return Verdict(SPARE, f"PID {pid} is never killed")
    if pid == daemon_pid:
        return Verdict(SPARE, "it is gpujobd itself")
    if info.uid == 0 or info.euid == 0:
        return Verdict(SPARE, "root's processes are never killed")
    if info.uid < uid_min:
        return Verdict(SPARE, f"uid {info.uid} is a system account (below UID_MIN {uid_min}): "
                              "system services' processes are never killed")
    if info.cgroup is None:
        return Verdict(SPARE, "its cgroup is unknown")
    if unit is not None and unit != "init.scope" and job_id_from_unit(unit) is None:
        return Verdict(SPARE, f"it belongs to the unit {unit}")
    rules = []
    if gpu.stray_kill_users:
        if info.user not in gpu.stray_kill_users:
            return Verdict(SPARE, f"user {info.user} is not in gpu.stray_kill_users")
        rules.append(f"user {info.user} is in gpu.stray_kill_users")
    else:
        rules.append("gpu.stray_kill_users is empty (any user)")
    if gpu.stray_kill_orphans_only:
        orphan, why = is_orphan(info)
        if not orphan:
            return Verdict(SPARE, f"gpu.stray_kill_orphans_only: {why}")
        rules.append(f"gpu.stray_kill_orphans_only: {why}")
    else:
        rules.append("gpu.stray_kill_orphans_only = false")
    if stray_for_s < gpu.stray_grace_s:
        return Verdict(WAIT, f"stray for {stray_for_s:.0f} s of gpu.stray_grace_s {gpu.stray_grace_s:g} s")
    if ticks < gpu.stray_kill_min_ticks:
        return Verdict(WAIT, f"seen on {ticks} of gpu.stray_kill_min_ticks {gpu.stray_kill_min_ticks} polls")
    return Verdict(KILL, f"stray for {stray_for_s:.0f} s over {ticks} polls", "; ".join(rules))


def system_uid_min(path: str = "/etc/login.defs") -> int:
    """UID_MIN of login.defs: the first uid of a person's account (default 1000)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "UID_MIN" and parts[1].isdigit():
                    return int(parts[1])
    except OSError:
        pass
    return DEFAULT_UID_MIN


# --- CUDA_VISIBLE_DEVICES -----------------------------------------------------------------------------


def parse_visible_devices(value: Optional[str]) -> Optional[List[str]]:
    """The GPUs a job will see: None for all (unset); else indexes and UUIDs (prefixes allowed, as CUDA
    does), read as CUDA does: up to the first entry that is neither (so "" and "-1" mean none)."""
    if value is None:
        return None
    out = []
    for token in (t.strip() for t in value.split(",")):
        if token.isdigit() or token.startswith(("GPU-", "MIG-")):
            out.append(token)
        else:
            break
    return out


def device_selected(device: Mapping[str, Any], visible: Optional[List[str]]) -> bool:
    if visible is None:
        return True
    uuid = device.get("uuid") or ""
    for token in visible:
        if token.isdigit() and int(token) == device.get("index"):
            return True
        if token.startswith("GPU-") and uuid.startswith(token):
            return True
        if token.startswith("MIG-"):  # a MIG instance's parent GPU is not known here: assume any
            return True
    return False


def gpu_key(device: Device) -> str:
    """How a GPU is named in maps (gpu_memory_bytes, a stray's gpus): its UUID, else `index:N`."""
    return device.uuid or f"index:{device.index}"


# --- the watcher ---------------------------------------------------------------------------------------


class SchedulerPort(Protocol):
    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]: ...


@dataclass(frozen=True)
class Snapshot:
    report: NvmlReport
    processes: Dict[int, Optional[ProcInfo]]
    pid_max: int


def collect(nvml: Nvml, procs: ProcPort, steps: Steps) -> Snapshot:
    """One tick's reading, on the worker thread: NVML, then /proc for every PID it listed."""
    report = nvml.read(steps)
    pid_max = procs.pid_max()
    infos: Dict[int, Optional[ProcInfo]] = {}
    for pid in report.pids():
        with steps.step(f"/proc/{pid}"):
            infos[pid] = procs.inspect(pid) if 0 < pid <= pid_max else None
    return Snapshot(report=report, processes=infos, pid_max=pid_max)


@dataclass
class _Stray:
    info: ProcInfo
    attribution: Attribution
    first_seen_mono: float
    first_seen_at: float
    gpus: Dict[str, int] = field(default_factory=dict)
    gpu_indexes: List[int] = field(default_factory=list)
    ticks: int = 1
    action: str = "report"
    spared_logged: bool = False
    kill_method: str = ""  # set once a kill was started: "systemd-stop" or "pidfd"
    term_sent_mono: Optional[float] = None
    escalated: bool = False
    rule: str = ""  # the rules that matched, once a kill was started


_KillOrder = Tuple[_Stray, int, str, str]  # the stray, the signal, why, by which rules

_Seen = Tuple[ProcInfo, Attribution, Dict[str, int], List[int]]  # info, attribution, gpus, GPU indexes


def _stray_key(info: ProcInfo) -> Tuple[int, int]:
    return info.pid, info.start_ticks


class Watcher:
    def __init__(self, config: Config, *, live_jobs: Callable[[], Collection[int]], scheduler: SchedulerPort,
                 worker: Worker, nvml: Nvml, procs: ProcPort, stop_unit: Callable[[str], None],
                 daemon_pid: int, uid_min: int = DEFAULT_UID_MIN,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 on_report: Optional[Callable[[], None]] = None,
                 on_stray_found: Optional[Callable[[Dict[str, Any]], None]] = None,
                 on_stray_cleared: Optional[Callable[[Dict[str, Any]], None]] = None,
                 kill: Callable[..., Tuple[bool, str]] = kill_verified):
        self._config = config
        self._gpu = config.gpu
        self._live_jobs = live_jobs
        self._scheduler = scheduler
        self._worker = worker
        self._nvml = nvml
        self._procs = procs
        self._stop_unit = stop_unit
        self._daemon_pid = daemon_pid
        self._uid_min = uid_min
        self._clock = clock
        self._monotonic = monotonic
        self.on_report = on_report
        self.on_stray_found = on_stray_found
        self.on_stray_cleared = on_stray_cleared
        self._kill = kill
        self._backoff = Backoff(config.gpu.retry_initial_s, config.gpu.retry_max_s)
        self.state = STATE_STARTING if config.gpu.watch else STATE_DISABLED
        self.reason = ("the first reading of the GPUs has not finished yet" if config.gpu.watch
                       else "GPU watching is off (gpu.watch = false)")
        self._report: Optional[NvmlReport] = None  # the latest good one
        self._devices: List[Dict[str, Any]] = []
        self._job_memory: Dict[int, Dict[str, int]] = {}
        self._strays: Dict[Tuple[int, int], _Stray] = {}
        self._cancel_tick: Optional[Callable[[], None]] = None
        self._cancel_watchdog: Optional[Callable[[], None]] = None
        self._next_retry_s: Optional[float] = None
        self.ticks = 0

    # -- the loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.state != STATE_DISABLED:
            self._schedule(0.0)

    def _schedule(self, seconds: float) -> None:
        if self._cancel_tick is not None:
            self._cancel_tick()
        self._cancel_tick = self._scheduler.call_later(seconds, self._tick)

    def _tick(self) -> None:
        self._cancel_tick = None
        if self._worker.busy:  # a kill task still running (a hung call never reaches here)
            self._schedule(min(1.0, self._gpu.poll_interval_s))
            return
        nvml, procs = self._nvml, self._procs
        self._submit(lambda steps: collect(nvml, procs, steps), self._tick_done)

    def _submit(self, task: Callable[[Steps], Any], on_done: Callable[[Done], None]) -> bool:
        if not self._worker.submit(task, on_done):
            return False
        self._arm_watchdog(self._gpu.nvml_call_timeout_s)
        return True

    def _arm_watchdog(self, seconds: float) -> None:
        if self._cancel_watchdog is not None:
            self._cancel_watchdog()
        self._cancel_watchdog = self._scheduler.call_later(seconds, self._watchdog)

    def _watchdog(self) -> None:
        self._cancel_watchdog = None
        if not self._worker.busy or self.state == STATE_HUNG:
            return
        timeout = self._gpu.nvml_call_timeout_s
        current = self._worker.current()
        if current is None or current[1] < timeout:
            self._arm_watchdog(timeout - current[1] if current else timeout)
            return
        what, seconds = current
        kind = "/proc read" if what.startswith("/proc/") else "nvml call"
        self._set_unavailable(
            STATE_HUNG, f"{kind} hung: {what} has not returned after {seconds:.1f} s "
                        f"(gpu.nvml_call_timeout_s {timeout:g} s); no other call is made until it returns")

    def _after_hang(self) -> bool:
        """A task finished after its call was declared hung: whatever it read is stale."""
        if self.state != STATE_HUNG:
            return False
        log.warning("gpu.call_returned", after_hang=self.reason)
        self._set_unavailable(STATE_UNAVAILABLE, "recovering after a hung call; the next read decides")
        return True

    def _tick_done(self, done: Done) -> None:
        if self._cancel_watchdog is not None:
            self._cancel_watchdog()
            self._cancel_watchdog = None
        if self._after_hang():
            return
        if isinstance(done.error, NvmlUnavailable):
            self._set_unavailable(STATE_UNAVAILABLE, str(done.error))
            return
        if done.error is not None:
            log.error("gpu.tick_failed", error=f"{type(done.error).__name__}: {done.error}")
            self._set_unavailable(STATE_UNAVAILABLE, f"the watcher failed: {type(done.error).__name__}: "
                                                     f"{done.error}")
            return
        if self.state != STATE_OK:
            log.info("gpu.available", devices=len(done.value.report.devices),
                     driver_version=done.value.report.driver_version, after=self.reason or None)
        self.state, self.reason, self._next_retry_s = STATE_OK, "", None
        self._backoff.reset()
        self.ticks += 1
        self._apply(done.value)
        self._schedule(self._gpu.poll_interval_s)

    def _set_unavailable(self, state: str, reason: str) -> None:
        changed = (state, reason) != (self.state, self.reason)
        self.state, self.reason = state, reason
        for stray in self._strays.values():
            stray.ticks = 0  # "consecutive" starts again after a gap
        if state == STATE_HUNG:  # no tick is scheduled; the late return of the call schedules one
            if self._cancel_tick is not None:
                self._cancel_tick()
                self._cancel_tick = None
            self._next_retry_s = None
            log.error("gpu.unavailable", state=state, reason=reason)
        else:
            delay = self._backoff.next_delay()
            self._next_retry_s = delay
            if changed:
                log.warning("gpu.unavailable", state=state, reason=reason, retry_in_s=delay)
            else:
                log.debug("gpu.still_unavailable", reason=reason, retry_in_s=delay)
            self._schedule(delay)
        if self.on_report is not None:
            self.on_report()

    # -- one good reading ----------------------------------------------------------------------------
    def _apply(self, snapshot: Snapshot) -> None:
        live = set(self._live_jobs())
        now, mono = self._clock(), self._monotonic()
        devices: List[Dict[str, Any]] = []
        job_memory: Dict[int, Dict[str, int]] = {job_id: {} for job_id in live}
        seen: Dict[Tuple[int, int], _Seen] = {}
        for device in snapshot.report.devices:
            key = gpu_key(device)
            processes = []
            for process in device.processes:
                info = snapshot.processes.get(process.pid)
                who = attribute(process.pid, info, live, snapshot.pid_max)
                processes.append(_process_view(process, info, who))
                memory = process.used_memory_bytes or 0
                if who.owner == OWNER_JOB and who.job_id is not None:
                    job_memory[who.job_id][key] = job_memory[who.job_id].get(key, 0) + memory
                elif who.owner == OWNER_STRAY and info is not None:
                    entry = seen.setdefault(_stray_key(info), (info, who, {}, []))
                    entry[2][key] = entry[2].get(key, 0) + memory
                    entry[3].append(device.index)
            devices.append(_device_view(device, processes))
        self._report = snapshot.report
        self._devices = devices
        self._job_memory = job_memory
        self._track_strays(seen, now, mono)
        if self._config.gpu.kills_strays:
            self._police(mono)
        if self.on_report is not None:
            self.on_report()

    def _track_strays(self, seen: Mapping[Tuple[int, int], _Seen], now: float, mono: float) -> None:
        for key, (info, who, gpus, indexes) in seen.items():
            stray = self._strays.get(key)
            if stray is None:
                stray = _Stray(info=info, attribution=who, first_seen_mono=mono, first_seen_at=now,
                               gpus=gpus, gpu_indexes=indexes)
                self._strays[key] = stray
                view = self._stray_view(stray)
                log.warning("gpu.stray_found", **_log_fields(view))
                if self.on_stray_found is not None:
                    self.on_stray_found(view)
            else:
                stray.info, stray.attribution, stray.gpus, stray.gpu_indexes = info, who, gpus, indexes
                stray.ticks += 1
        for key in [key for key in self._strays if key not in seen]:
            stray = self._strays.pop(key)
            view = self._stray_view(stray)
            view["cleared_because"] = ("killed" if stray.kill_method else "no longer on any GPU, or no "
                                                                          "longer stray")
            log.info("gpu.stray_cleared", pid=view["pid"], user=view.get("user"),
                     command=_short(view["command"]), cleared_because=view["cleared_because"],
                     stray_for_s=round(mono - stray.first_seen_mono, 1))
            if self.on_stray_cleared is not None:
                self.on_stray_cleared(view)

    # -- the kill policy -----------------------------------------------------------------------------
    def _police(self, mono: float) -> None:
        orders: List[_KillOrder] = []
        for stray in self._strays.values():
            if stray.kill_method:
                order = self._escalation(stray, mono)
                if order is not None:
                    orders.append(order)
                continue
            verdict = kill_verdict(stray.info, stray.attribution.unit,
                                   stray_for_s=mono - stray.first_seen_mono, ticks=stray.ticks,
                                   config=self._config, daemon_pid=self._daemon_pid, uid_min=self._uid_min)
            if verdict.action == WAIT:
                stray.action = f"kill pending: {verdict.why}"
            elif verdict.action == SPARE:
                stray.action = f"spared: {verdict.why}"
                if not stray.spared_logged:
                    stray.spared_logged = True
                    log.info("gpu.stray_spared", pid=stray.info.pid, user=stray.info.user,
                             command=_short(stray.info.command), why=verdict.why)
            else:
                order = self._start_kill(stray, verdict)
                if order is not None:
                    orders.append(order)
        if orders:
            procs, kill = self._procs, self._kill

            def task(steps: Steps) -> List[Tuple[_Stray, int, bool, str, str, str]]:
                results = []
                for stray, signum, why, rule in orders:
                    with steps.step(f"/proc/{stray.info.pid} (kill)"):
                        ok, what = kill(procs, stray.info.pid, stray.info.identity, signum)
                    results.append((stray, signum, ok, what, why, rule))
                return results

            if not self._submit(task, self._kills_done):
                log.warning("gpu.stray_kill_deferred", reason="the worker is busy", strays=len(orders))
                for stray, _, _, _ in orders:
                    stray.kill_method, stray.term_sent_mono = "", None

    def _start_kill(self, stray: _Stray, verdict: Verdict) -> Optional[_KillOrder]:
        unit = stray.attribution.unit
        fields = dict(_log_fields(self._stray_view(stray)), why=verdict.why, rule=verdict.rule)
        if unit is not None and job_id_from_unit(unit) is not None:
            stray.kill_method = "systemd-stop"
            stray.action = f"killed: systemd stops {unit} ({verdict.rule})"
            try:
                self._stop_unit(unit)
            except Exception as err:
                log.error("gpu.stray_kill_failed", method="systemd-stop", error=str(err), **fields)
                stray.action = f"kill failed: {err}"
                return None
            log.warning("gpu.stray_killed", method="systemd-stop", signal="SIGTERM, then SIGKILL "
                        "after the scope's stop timeout", **fields)
            return None
        stray.kill_method = "pidfd"
        stray.rule = verdict.rule
        stray.term_sent_mono = self._monotonic()
        stray.action = f"killing: SIGTERM ({verdict.rule})"
        return stray, signal.SIGTERM, verdict.why, verdict.rule

    def _escalation(self, stray: _Stray, mono: float) -> Optional[_KillOrder]:
        if stray.kill_method != "pidfd" or stray.escalated or stray.term_sent_mono is None:
            return None
        if mono - stray.term_sent_mono < self._config.jobs.stop_timeout_s:
            return None
        stray.escalated = True
        stray.action = "killing: SIGKILL (SIGTERM was ignored)"
        return stray, KILL_ESCALATION_SIGNAL, (f"still running {mono - stray.term_sent_mono:.0f} s after "
                                               "SIGTERM (jobs.stop_timeout_s)"), stray.rule

    def _kills_done(self, done: Done) -> None:
        if self._cancel_watchdog is not None:
            self._cancel_watchdog()
            self._cancel_watchdog = None
        if self._after_hang():
            return
        if done.error is not None:
            log.error("gpu.stray_kill_failed", error=f"{type(done.error).__name__}: {done.error}")
            return
        for stray, signum, ok, what, why, rule in done.value:
            fields = dict(_log_fields(self._stray_view(stray)), method="pidfd",
                          signal=signal.Signals(signum).name, why=why, rule=rule)
            if ok:
                log.warning("gpu.stray_killed", result=what, **fields)
            else:
                stray.action = f"not killed: {what}"
                log.warning("gpu.stray_kill_failed", result=what, **fields)

    # -- what the rest of the daemon asks ------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.state == STATE_OK

    def report(self) -> Dict[str, Any]:
        """The report (plain values; api.encode_gpu_report puts it on the wire)."""
        out: Dict[str, Any] = {"state": self.state, "available": self.available, "reason": self.reason,
                               "policy": self._gpu.stray_policy}
        if self._next_retry_s is not None:
            out["retry_in_s"] = self._next_retry_s
        if self._report is not None:
            out["updated_at"] = self._report.taken_at
            if self._report.driver_version:
                out["driver_version"] = self._report.driver_version
        now = self._clock()
        out["devices"] = []
        for device in self._devices if self.available else []:
            processes = [dict(process, age_s=max(0.0, now - process["started_at"]))
                         if "started_at" in process else dict(process) for process in device["processes"]]
            out["devices"].append(dict(device, processes=processes))
        out["strays"] = [self._stray_view(stray) for stray in self._strays.values()]
        return out

    def job_gpu_memory(self, job_id: int) -> Optional[Dict[str, int]]:
        """GPU memory per GPU of a live job, from the latest report; None when there is none fresh."""
        if not self.available:
            return None
        return dict(self._job_memory.get(job_id, {})) if job_id in self._job_memory else None

    def blocking_strays(self, cuda_visible_devices: Optional[str]) -> Optional[List[Dict[str, Any]]]:
        """The strays holding memory on the GPUs a job will use (its CUDA_VISIBLE_DEVICES, else all);
        None when the GPUs cannot be read now (unknown, not "none")."""
        if not self.available:
            return None
        visible = parse_visible_devices(cuda_visible_devices)
        chosen = {device["index"] for device in self._devices if device_selected(device, visible)}
        out = []
        for stray in self._strays.values():
            indexes = [index for index in stray.gpu_indexes if index in chosen]
            if indexes:
                view = self._stray_view(stray)
                view["gpu_indexes"] = indexes
                out.append(view)
        return out

    def strays_count(self) -> int:
        return len(self._strays)

    def _stray_view(self, stray: _Stray) -> Dict[str, Any]:
        info = stray.info
        view: Dict[str, Any] = {
            "pid": info.pid, "ppid": info.ppid, "user": info.user, "uid": info.uid,
            "command": list(info.command), "cgroup": info.cgroup or "", "gpus": dict(stray.gpus),
            "gpu_indexes": list(stray.gpu_indexes), "used_memory_bytes": sum(stray.gpus.values()),
            "started_at": info.started_at, "age_s": max(0.0, self._clock() - info.started_at),
            "first_seen_at": stray.first_seen_at, "ticks": stray.ticks, "action": stray.action,
            "note": stray.attribution.note,
        }
        if stray.attribution.unit:
            view["unit"] = stray.attribution.unit
        return view


def _process_view(process: GpuProcess, info: Optional[ProcInfo], who: Attribution) -> Dict[str, Any]:
    view: Dict[str, Any] = {"pid": process.pid, "type": process.type, "owner": who.owner}
    if process.used_memory_bytes is not None:
        view["used_memory_bytes"] = process.used_memory_bytes
    if who.job_id is not None:
        view["job_id"] = who.job_id
    if who.unit:
        view["unit"] = who.unit
    if who.note:
        view["note"] = who.note
    if info is not None:
        view.update(user=info.user, uid=info.uid, ppid=info.ppid, command=list(info.command),
                    started_at=info.started_at)
        if info.cgroup is not None:
            view["cgroup"] = info.cgroup
    return view


def _device_view(device: Device, processes: List[Dict[str, Any]]) -> Dict[str, Any]:
    view = {key: value for key, value in dataclasses.asdict(device).items()
            if value is not None and key != "processes"}
    view["errors"] = dict(device.errors)
    view["processes"] = processes
    return view


def _short(command: List[str] | Tuple[str, ...]) -> str:
    text = " ".join(command)
    return text if len(text) <= COMMAND_LOG_CHARS else text[:COMMAND_LOG_CHARS - 3] + "..."


def _log_fields(view: Mapping[str, Any]) -> Dict[str, Any]:
    return {"pid": view["pid"], "ppid": view["ppid"], "user": view["user"], "uid": view["uid"],
            "command": _short(view["command"]), "cgroup": view["cgroup"], "unit": view.get("unit"),
            "gpus": view["gpus"], "used_memory_bytes": view["used_memory_bytes"],
            "age_s": round(view["age_s"], 1), "note": view["note"]}


# --- the cost of one tick (python -m gpujobd.gpu --bench-tick) ----------------------------------------


def bench_tick(nvml: Nvml, repeat: int = 20, procs: Optional[ProcPort] = None) -> Dict[str, Any]:
    """Time whole ticks on this thread: NVML, /proc and the main loop's part (attribution, strays).
    Only a figure to print; nothing asserts on it."""
    from gpujobd.gpu import NoSteps

    procs = procs or ProcFs()

    class _Now:
        def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]:
            return lambda: None

    watcher = Watcher(Config(), live_jobs=lambda: (), scheduler=_Now(), worker=Worker(post=lambda f: f()),
                      nvml=nvml, procs=procs, stop_unit=lambda unit: None, daemon_pid=os.getpid())
    collect_ms, apply_ms = [], []
    snapshot = None
    for _ in range(repeat):
        started = time.perf_counter()
        snapshot = collect(nvml, procs, NoSteps())
        middle = time.perf_counter()
        watcher._apply(snapshot)
        collect_ms.append((middle - started) * 1000)
        apply_ms.append((time.perf_counter() - middle) * 1000)
    assert snapshot is not None
    total = sorted(c + a for c, a in zip(collect_ms, apply_ms))
    return {
        "devices": len(snapshot.report.devices),
        "processes": sum(len(d.processes) for d in snapshot.report.devices),
        "ticks": repeat,
        "tick_ms_median": round(total[len(total) // 2], 3),
        "tick_ms_min": round(total[0], 3),
        "tick_ms_max": round(total[-1], 3),
        "read_ms_median": round(sorted(collect_ms)[len(collect_ms) // 2], 3),
        "classify_ms_median": round(sorted(apply_ms)[len(apply_ms) // 2], 3),
    }
