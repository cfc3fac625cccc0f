"""The real /proc (or a tree shaped like it, for tests): what the GPU watcher learns of a process.

Read on the GPU worker thread only (a read can block on a wedged process); the parsing and what it
means are gpujobd.daemon.gpu.attribution's.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import Callable, Dict, Mapping, Optional, Set, Tuple

from gpujobd.daemon.adapters.users import user_name
from gpujobd.daemon.gpu.attribution import (
    DEFAULT_PID_MAX,
    Identity,
    ProcInfo,
    parse_cgroup,
    parse_stat,
    parse_status_uids,
)

# The most pidfds held (one per GPU process, see ProcFs.same_processes); past it, a process is
# re-checked by one stat() of its /proc/PID. Half a service's default soft RLIMIT_NOFILE (1024), which
# the daemon keeps: raising it would raise it for every job, which inherits it.
PIDFD_MAX = 512

Mark = Tuple[int, int]  # (st_ino, st_ctime_ns) of /proc/PID: see ProcFs.same_processes


class ProcFs:
    """The real /proc (or a tree shaped like it, for tests). Used on the worker thread only."""

    def __init__(self, root: str = "/proc", user_name: Callable[[int], str] = user_name,
                 clock_ticks: Optional[int] = None, pidfd_max: Optional[int] = None):
        self._root = root.rstrip("/")
        self._user_name = user_name
        self._ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self._pid_max: Optional[int] = None
        self._boot_time: Optional[float] = None
        # A pidfd names a process of the kernel's, which only the real /proc shows: none for a tree.
        self._pidfd_max = (PIDFD_MAX if self._root == "/proc" else 0) if pidfd_max is None else pidfd_max
        # pid -> (a pidfd of the process, its start ticks), and fd -> pid: every pidfd is registered in
        # one poller, kept from tick to tick, that says which of them exited.
        self._pidfds: Dict[int, Tuple[int, int]] = {}
        self._pids_of_fds: Dict[int, int] = {}
        self._poller = select.poll()
        self._marks: Dict[int, Tuple[Mark, int]] = {}  # pid -> (its /proc/PID's mark, start ticks)

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

    def same_processes(self, known: Mapping[int, int]) -> Set[int]:
        """The PIDs of `known` (pid -> start ticks) that still name the process read then (`inspect`).

        A process read in full is pinned then: by a pidfd, opened before anything is read, so it
        refers to the very process whose start time is read next; one poll() over every pidfd, kept
        registered from tick to tick, tells which exited, however many there are. Past the most
        pidfds held (or without pidfd_open), by its mark instead: (inode, ctime) of its /proc/PID,
        also taken before anything is read, checked with one stat() each. The kernel makes a new
        /proc/PID inode, with a new inode number (and ctime), for each process: a dentry is only
        valid while the process it was made for lives, so a process that took over the PID never
        shows the old inode. A mark that changed (that, or only the dentry was evicted) is not "the
        same": the PID is read in full again. A known PID with neither (read by another ProcFs) is
        pinned now if its start time still matches. Pidfds and marks of PIDs no longer asked about,
        or of another start time, are dropped. docs/gpu.md, "Cost", argues this."""
        for pid in [pid for pid, (_, start) in self._pidfds.items() if known.get(pid) != start]:
            self._unpin(pid)
        for pid in [pid for pid, (_, start) in self._marks.items() if known.get(pid) != start]:
            del self._marks[pid]
        exited = self._exited()
        same = set()
        for pid, start in known.items():
            if pid in self._pidfds:
                same.add(pid)
                continue
            if pid in exited:
                continue
            marked = self._marks.get(pid)
            if marked is not None:
                if self._mark(pid) == marked[0]:
                    same.add(pid)
                else:
                    del self._marks[pid]
            elif self._pin_checked(pid, start):
                same.add(pid)
        return same

    def _exited(self) -> Set[int]:
        if not self._pidfds:
            return set()
        gone = {self._pids_of_fds[fd] for fd, _event in self._poller.poll(0)}
        for pid in gone:
            self._unpin(pid)
        return gone

    def _open_pidfd(self, pid: int) -> Optional[int]:
        if len(self._pidfds) >= self._pidfd_max or not hasattr(os, "pidfd_open"):
            return None
        try:
            return os.pidfd_open(pid)
        except OSError:
            return None

    def _keep(self, pid: int, fd: int, start: int) -> None:
        self._pidfds[pid] = (fd, start)
        self._pids_of_fds[fd] = pid
        self._poller.register(fd, select.POLLIN)

    def _unpin(self, pid: int) -> None:
        held = self._pidfds.pop(pid, None)
        if held is not None:
            self._poller.unregister(held[0])
            del self._pids_of_fds[held[0]]
            os.close(held[0])

    def _pin_checked(self, pid: int, start: int) -> bool:
        """Pin `pid` (a pidfd, else a mark) if it is still the process that started at `start`."""
        fd = self._open_pidfd(pid)
        mark = self._mark(pid) if fd is None else None
        if self._start_ticks(pid) != start or (fd is None and mark is None):
            if fd is not None:
                os.close(fd)
            return False
        self._pin(pid, fd, mark, start)
        return True

    def _pin(self, pid: int, fd: Optional[int], mark: Optional[Mark], start: int) -> None:
        self._unpin(pid)
        self._marks.pop(pid, None)
        if fd is not None:
            self._keep(pid, fd, start)
        elif mark is not None:
            self._marks[pid] = (mark, start)

    def _mark(self, pid: int) -> Optional[Mark]:
        try:
            st = os.stat(f"{self._root}/{pid}")
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def _start_ticks(self, pid: int) -> Optional[int]:
        try:  # os.open/os.read: a third cheaper than a file object, for what is read every tick
            fd = os.open(f"{self._root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            try:
                text = os.read(fd, 4096).decode("utf-8", "replace")
            finally:
                os.close(fd)
            return parse_stat(text)[3]
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        for pid in list(self._pidfds):
            self._unpin(pid)
        self._marks.clear()

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
        or it exited since NVML listed it), or a value that cannot be a PID. The process read is
        pinned for `same_processes`: a pidfd, else a mark, taken before anything is read."""
        if not 0 < pid <= self.pid_max():
            return None
        fd = self._open_pidfd(pid)
        mark = self._mark(pid) if fd is None else None
        try:
            info = self._inspect(pid)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if info is None:
            if fd is not None:
                os.close(fd)
        else:
            self._pin(pid, fd, mark, info.start_ticks)
        return info

    def _inspect(self, pid: int) -> Optional[ProcInfo]:
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
