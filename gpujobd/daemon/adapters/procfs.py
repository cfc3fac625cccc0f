"""The real /proc (or a tree shaped like it, for tests): what the GPU watcher learns of a process.

Read on the GPU worker thread only (a read can block on a wedged process); the parsing and what it
means are gpujobd.daemon.gpu.attribution's.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

from gpujobd.daemon.adapters.users import user_name
from gpujobd.daemon.gpu.attribution import (
    DEFAULT_PID_MAX,
    Identity,
    ProcInfo,
    parse_cgroup,
    parse_stat,
    parse_status_uids,
)


class ProcFs:
    """The real /proc (or a tree shaped like it, for tests). Used on the worker thread only."""

    def __init__(self, root: str = "/proc", user_name: Callable[[int], str] = user_name,
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
