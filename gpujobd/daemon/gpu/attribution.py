"""Who owns a GPU process: what /proc/<pid> says, parsed, and the owner it makes. Pure.

The reads themselves (status, stat, cgroup, cmdline) are the adapter's,
gpujobd.daemon.adapters.procfs.ProcFs: they can block on a wedged process, so they run on the GPU
worker thread only (gpujobd.daemon.gpu.watcher hands them there).

Attribution: PID -> /proc/<pid>/cgroup, the `0::` line only (other lines are a host's v1
hierarchies) -> the unit, the last path component ending in .scope or .service -> the job, for
`gpujob-<id>.scope`. A process is

- `job`: in the scope of a live gpujobd job;
- `unit`: in another systemd unit (a service, a user's session scope): shown, never acted on;
- `stray`: in no unit (the root cgroup, a bare slice), in init.scope though it is not PID 1, or in
  a `gpujob-<id>.scope` whose job is no longer live;
- `unknown`: NVML's PID is not a live process of this PID namespace (0, 2**32-1, a PID of another
  namespace, a process that exited between NVML's list and our look): reported, never acted on.

The /proc reader is a seam (`ProcPort`): adapters.procfs.ProcFs(root=...) or any object with its
methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional, Protocol, Set, Tuple

from gpujobd.shared.model import job_id_from_unit

OWNER_JOB = "job"
OWNER_UNIT = "unit"
OWNER_STRAY = "stray"
OWNER_UNKNOWN = "unknown"

DEFAULT_PID_MAX = 4194304  # the kernel's largest pid_max (PID_MAX_LIMIT on 64-bit)


# --- what /proc says, parsed ----------------------------------------------------------------------


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


class ProcPort(Protocol):
    def pid_max(self) -> int: ...

    def inspect(self, pid: int) -> Optional[ProcInfo]: ...

    def same_processes(self, known: Mapping[int, int]) -> Set[int]: ...  # pid -> start ticks: still them

    def identity(self, pid: int) -> Optional[Identity]: ...


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

