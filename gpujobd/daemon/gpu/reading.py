"""The worker thread's part of a watch tick: NVML's reading, then /proc for every PID it listed, through
a cache of what /proc said of each process (`ProcCache`), into one `Snapshot` the main loop judges
(gpujobd.daemon.gpu.watcher). Reads that may block run here, each named through `Steps`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Dict, Optional, Protocol, Set

from gpujobd.daemon.gpu.attribution import ProcInfo, ProcPort
from gpujobd.daemon.gpu.report import NvmlReport
from gpujobd.daemon.gpu.worker import Steps


class NvmlPort(Protocol):
    """Reads the GPUs (gpujobd.daemon.adapters.nvml.Nvml); raises NvmlUnavailable when it cannot."""

    def read(self, steps: Steps) -> NvmlReport: ...


@dataclass(frozen=True)
class Snapshot:
    report: NvmlReport
    processes: Dict[int, Optional[ProcInfo]]
    pid_max: int


class ProcCache:
    """What /proc said of each GPU process, kept per (PID, start time), on the worker thread only. At
    each tick the processes seen before are checked at once (`ProcPort.same_processes`: one poll of
    their pidfds); only a PID new to the lists, or one whose process changed, is read in full. PIDs
    gone from NVML's lists are forgotten. A tick whose every PID says what it said at the last tick
    gets the last tick's mapping itself (`infos`), so the main loop can tell "nothing changed"."""

    def __init__(self) -> None:
        self._known: Dict[int, ProcInfo] = {}
        self._starts: Dict[int, int] = {}  # pid -> start ticks of _known's, as same_processes takes them
        self._same: Set[int] = set()
        self._last: Dict[int, Optional[ProcInfo]] = {}

    def check(self, procs: ProcPort, pids: Collection[int]) -> None:
        """Forget what NVML no longer lists; learn which known PIDs still name the same process."""
        if len(self._known) > len(pids) or not self._known.keys() <= set(pids):
            self._known = {pid: info for pid, info in self._known.items() if pid in pids}
            self._starts = {pid: info.start_ticks for pid, info in self._known.items()}
        self._same = procs.same_processes(self._starts)

    def known(self, pid: int) -> Optional[ProcInfo]:
        """What was read of `pid` before, if it still names the same process."""
        return self._known.get(pid) if pid in self._same else None

    def read(self, procs: ProcPort, pid: int) -> Optional[ProcInfo]:
        info = procs.inspect(pid)
        if info is None:
            self._known.pop(pid, None)
            self._starts.pop(pid, None)
        else:
            self._known[pid] = info
            self._starts[pid] = info.start_ticks
        return info

    def infos(self, procs: ProcPort, pids: Collection[int], pid_max: int,
              steps: Steps) -> Dict[int, Optional[ProcInfo]]:
        """Every PID's ProcInfo (None: not a process here), after `check`: the last tick's mapping
        itself when every PID's is the very one it was then."""
        last = self._last
        same = len(pids) == len(last)
        infos: Dict[int, Optional[ProcInfo]] = {}
        for pid in pids:
            info = self.known(pid) if 0 < pid <= pid_max else None
            if info is None and 0 < pid <= pid_max:
                with steps.step(f"/proc/{pid}"):  # named, in case this read hangs
                    info = self.read(procs, pid)
            infos[pid] = info
            if same and (last.get(pid, _ABSENT) is not info):
                same = False
        if same:
            return last
        self._last = infos
        return infos


_ABSENT = object()


def collect(nvml: NvmlPort, procs: ProcPort, steps: Steps, cache: Optional[ProcCache] = None) -> Snapshot:
    """One tick's reading, on the worker thread: NVML, then /proc for every PID it listed (through
    `cache`, which only this thread may use; a fresh one reads every PID in full)."""
    cache = cache if cache is not None else ProcCache()
    report = nvml.read(steps)
    pid_max = procs.pid_max()
    pids = report.pids()
    with steps.step("/proc: the known processes"):
        cache.check(procs, pids)
    return Snapshot(report=report, processes=cache.infos(procs, pids, pid_max, steps), pid_max=pid_max)
