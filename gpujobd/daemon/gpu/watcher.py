"""The GPU watcher: the tick loop that reads the GPUs, and the report of who owns what is on them.

Every gpu.poll_interval_s the watcher hands one task to the worker thread (gpu.worker.Worker): read
NVML, then inspect each listed PID in /proc (status, stat, cgroup, cmdline: reads that can block on a
wedged process, so never on the main loop). The result comes back to the main loop, where the rest is
pure: attribution (gpu.attribution), stray tracking and the kill policy (gpu.strays), the
report. A call that does not return in gpu.nvml_call_timeout_s makes the watcher `hung`; NVML that
cannot be used makes it `unavailable`, retried with back-off. See docs/gpu.md.

The seams are explicit parameters: the NVML reader (adapters.nvml.Nvml, or any object with its
`read`), the /proc reader (adapters.procfs.ProcFs(root=...), or any object with its methods), the
worker, the scheduler, the clocks, systemd's stop_unit and the callbacks, so
tests/unit/test_watcher.py drives all of it without a GPU, a /proc or a thread.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Set, Tuple

from gpujobd.daemon.gpu.attribution import OWNER_JOB, OWNER_STRAY, Attribution, ProcInfo, ProcPort, attribute
from gpujobd.daemon.gpu.reading import NvmlPort, ProcCache, Snapshot, collect
from gpujobd.daemon.gpu.report import Device, GpuProcess, NvmlReport, NvmlUnavailable
from gpujobd.daemon.gpu.strays import DEFAULT_UID_MIN, Seen, Strays, kill_verified, stray_key
from gpujobd.daemon.gpu.worker import Backoff, Done, Steps, Worker
from gpujobd.daemon.ports import SchedulerPort
from gpujobd.shared.config import Config
from gpujobd.shared.log import get_logger
from gpujobd.shared.model import job_id_from_unit

log = get_logger()

STATE_STARTING = "starting"  # no read has finished yet
STATE_OK = "ok"
STATE_UNAVAILABLE = "unavailable"  # NVML cannot be used; `reason` says why, retried with back-off
STATE_HUNG = "hung"  # an NVML call has not returned; no other call is made until it does
STATE_DISABLED = "disabled"  # gpu.watch = false


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


_Seen = Dict[Tuple[int, int], Seen]  # a tick's strays, by (pid, start ticks)
_JobMemory = Dict[int, Dict[str, int]]  # job -> GPU key -> bytes


class Watcher:
    def __init__(self, config: Config, *, live_jobs: Callable[[], Collection[int]], scheduler: SchedulerPort,
                 worker: Worker, nvml: NvmlPort, procs: ProcPort, stop_unit: Callable[[str], None],
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
        self._clock = clock
        self._monotonic = monotonic
        self.on_report = on_report
        self.on_stray_found = on_stray_found
        self.on_stray_cleared = on_stray_cleared
        self._backoff = Backoff(config.gpu.retry_initial_s, config.gpu.retry_max_s)
        self.state = STATE_STARTING if config.gpu.watch else STATE_DISABLED
        self.reason = ("the first reading of the GPUs has not finished yet" if config.gpu.watch
                       else "GPU watching is off (gpu.watch = false)")
        self._report: Optional[NvmlReport] = None  # the latest good one
        self._devices: List[Dict[str, Any]] = []
        self._job_memory: Dict[int, Dict[str, int]] = {}
        self._strays = Strays(config, procs=procs, stop_unit=stop_unit, daemon_pid=daemon_pid,
                              uid_min=uid_min, clock=clock, monotonic=monotonic, kill=kill,
                              submit=self._submit_kills, on_found=self._stray_found,
                              on_cleared=self._stray_cleared)
        self._proc_cache = ProcCache()  # the worker thread's only
        self._views: Dict[Tuple[int, int], _Viewed] = {}  # (GPU, pid) -> its view at the last tick
        self._applied: Optional[_Applied] = None  # what the last tick judged, and from what
        self._cancel_tick: Optional[Callable[[], None]] = None
        self._cancel_watchdog: Optional[Callable[[], None]] = None
        self._next_retry_s: Optional[float] = None
        self.ticks = 0
        self._refresh_wanted = False  # a reading was asked for while one was under way

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
            self._schedule(min(self._gpu.busy_recheck_s, self._gpu.poll_interval_s))
            return
        nvml, procs, cache = self._nvml, self._procs, self._proc_cache
        self._submit(lambda steps: collect(nvml, procs, steps, cache), self._tick_done)

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
        again_now, self._refresh_wanted = self._refresh_wanted, False
        self._apply(done.value)
        self._schedule(0.0 if again_now else self._gpu.poll_interval_s)

    def _set_unavailable(self, state: str, reason: str) -> None:
        changed = (state, reason) != (self.state, self.reason)
        self.state, self.reason = state, reason
        self._strays.restart_ticks()
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
        last = self._applied
        if last is not None and last.holds(snapshot, live):
            # Nothing attribution depends on changed: every view, every job's memory and the strays
            # seen are last tick's, as are the objects themselves; only the devices' own figures
            # (memory, utilization) are new.
            devices = [_device_view(device, processes)
                       for device, processes in zip(snapshot.report.devices, last.process_views)]
            seen, job_memory = last.seen, last.job_memory
        else:
            devices, seen, job_memory = self._judge(snapshot, live)
            self._applied = _Applied.of(snapshot, live, devices, seen, job_memory)
        self._report = snapshot.report
        self._devices = devices
        self._job_memory = job_memory
        self._strays.track(seen, now, mono)
        if self._config.gpu.kills_strays:
            self._strays.police(mono)
        if self.on_report is not None:
            self.on_report()

    def _judge(self, snapshot: Snapshot, live: Set[int]) -> Tuple[List[Dict[str, Any]], _Seen, _JobMemory]:
        """Every process's attribution and view (each reused while what it depends on is the same),
        the memory of every live job, and the strays seen."""
        devices: List[Dict[str, Any]] = []
        job_memory: Dict[int, Dict[str, int]] = {job_id: {} for job_id in live}
        seen: Dict[Tuple[int, int], Seen] = {}
        views: Dict[Tuple[int, int], _Viewed] = {}
        for device in snapshot.report.devices:
            key = gpu_key(device)
            processes = []
            for process in device.processes:
                info = snapshot.processes.get(process.pid)
                viewed = self._viewed(device.index, process, info, live, snapshot.pid_max)
                views[device.index, process.pid] = viewed
                who = viewed.who
                processes.append(viewed.view)
                memory = process.used_memory_bytes or 0
                if who.owner == OWNER_JOB and who.job_id is not None:
                    job_memory[who.job_id][key] = job_memory[who.job_id].get(key, 0) + memory
                elif who.owner == OWNER_STRAY and info is not None:
                    entry = seen.setdefault(stray_key(info), (info, who, {}, []))
                    entry[2][key] = entry[2].get(key, 0) + memory
                    entry[3].append(device.index)
            devices.append(_device_view(device, processes))
        self._views = views
        return devices, seen, job_memory

    def _viewed(self, gpu: int, process: GpuProcess, info: Optional[ProcInfo], live: Collection[int],
                pid_max: int) -> _Viewed:
        """The process's attribution and view: last tick's, when nothing it depends on changed (the
        same ProcInfo, which the cache keeps per PID and start time; the same NVML entry; its job as
        live or ended as then); else judged anew."""
        last = self._views.get((gpu, process.pid))
        if last is not None and last.info is info and last.process == process and \
                (last.job_id is None or (last.job_id in live) == last.job_live):
            return last
        who = attribute(process.pid, info, live, pid_max)
        job_id = job_id_from_unit(info.unit) if info is not None and info.unit else None
        return _Viewed(process, info, job_id, job_id in live if job_id is not None else False, who,
                       _process_view(process, info, who))

    # -- the hand-off of the strays' kills and events --------------------------------------------------
    def _submit_kills(self, task: Callable[[Steps], Any]) -> bool:
        return self._submit(task, self._kills_done)

    def _kills_done(self, done: Done) -> None:
        if self._cancel_watchdog is not None:
            self._cancel_watchdog()
            self._cancel_watchdog = None
        if self._after_hang():
            return
        self._strays.kills_done(done)

    def _stray_found(self, view: Dict[str, Any]) -> None:
        if self.on_stray_found is not None:
            self.on_stray_found(view)

    def _stray_cleared(self, view: Dict[str, Any]) -> None:
        if self.on_stray_cleared is not None:
            self.on_stray_cleared(view)

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
        out["strays"] = self._strays.views()
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
        return self._strays.on_gpus(chosen)

    def refresh(self) -> None:
        """Read the GPUs now rather than at the next poll (a job ended: are its GPUs free?)."""
        if self.state != STATE_OK:
            return
        if self._worker.busy:  # the reading under way began too early: take another after it
            self._refresh_wanted = True
            return
        self._schedule(0.0)

    def inventory(self) -> Optional[Tuple[float, List[Dict[str, Any]]]]:
        """(when the latest good reading was taken, its GPUs as uuid, index, minor, usable and the
        PIDs of stray processes); None when the GPUs cannot be read now."""
        if not self.available or self._report is None:
            return None
        gpus = [{"uuid": device.get("uuid") or f"index:{device['index']}", "index": device["index"],
                 "minor": device.get("minor"),
                 "usable": device.get("state") == "ok" and bool(device.get("uuid")),
                 "stray_pids": tuple(process["pid"] for process in device["processes"]
                                     if process.get("owner") == OWNER_STRAY)}
                for device in self._devices]
        return self._report.taken_at, gpus

    def strays_count(self) -> int:
        return len(self._strays)


@dataclass(frozen=True)
class _Viewed:
    process: GpuProcess
    info: Optional[ProcInfo]
    job_id: Optional[int]  # the job of its unit, if it is in a job's scope
    job_live: bool  # whether that job was live when it was judged
    who: Attribution
    view: Dict[str, Any]  # shared with the report's devices: never changed once made


@dataclass(frozen=True)
class _Applied:
    """What one tick judged (views, strays seen, jobs' memory) and what from: the PID -> ProcInfo
    mapping, each device's process tuple and GPU key, the live jobs and pid_max. A next snapshot
    holding the very same mapping and tuples (the worker's caches hand them back unchanged when
    nothing changed) with the same live jobs would be judged the same, to the last object."""

    processes: Mapping[int, Optional[ProcInfo]]
    devices: Tuple[Tuple[int, str, Tuple[GpuProcess, ...]], ...]  # (index, GPU key, processes)
    live: Set[int]
    pid_max: int
    process_views: Tuple[List[Dict[str, Any]], ...]  # each device's, shared with its view: never changed
    seen: _Seen  # handed to Strays.track again: never changed
    job_memory: _JobMemory  # never changed; job_gpu_memory hands out copies

    @classmethod
    def of(cls, snapshot: Snapshot, live: Set[int], devices: List[Dict[str, Any]], seen: _Seen,
           job_memory: _JobMemory) -> _Applied:
        return cls(processes=snapshot.processes,
                   devices=tuple((d.index, gpu_key(d), d.processes) for d in snapshot.report.devices),
                   live=live, pid_max=snapshot.pid_max,
                   process_views=tuple(view["processes"] for view in devices), seen=seen,
                   job_memory=job_memory)

    def holds(self, snapshot: Snapshot, live: Set[int]) -> bool:
        """Whether `snapshot` (with `live`) is what this was judged from."""
        if snapshot.processes is not self.processes or snapshot.pid_max != self.pid_max or live != self.live:
            return False
        devices = snapshot.report.devices
        return len(devices) == len(self.devices) and all(
            device.processes is processes and device.index == index and gpu_key(device) == key
            for device, (index, key, processes) in zip(devices, self.devices))


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
    # Not dataclasses.asdict: it would deep-copy every process only for them to be dropped here.
    view = {f.name: getattr(device, f.name) for f in dataclasses.fields(device)
            if f.name not in ("processes", "errors") and getattr(device, f.name) is not None}
    view["errors"] = dict(device.errors)
    view["processes"] = processes
    return view
