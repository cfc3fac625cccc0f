"""The ports the manager uses: small protocols, so the core is tested with stateful fakes and
never imports a D-Bus, systemd, NVML or user-database library (checked in `make lint`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from gpujobd.daemon.properties import Encoded
from gpujobd.shared.model import Job, JobSpec
from gpujobd.shared.states import JobState


class GatePort(Protocol):
    pid: int

    def release(self) -> None: ...

    def abort(self) -> None: ...


class SystemdPort(Protocol):
    def start_scope(self, job: Job, pid: int, properties: Sequence[Encoded],
                    on_done: Callable[[str], None]) -> None: ...

    def stop_unit(self, unit: str) -> None: ...

    def watch_units(self, units: Sequence[str]) -> None: ...  # their changes reach on_unit_changed

    def unwatch_unit(self, unit: str) -> None: ...

    def list_job_units(self) -> Mapping[str, str]: ...  # unit name -> ActiveState

    def scope_result(self, unit: str) -> Optional[str]: ...


class JobFilesPort(Protocol):
    def create_log(self, job_id: int, uid: int, gid: int) -> int: ...

    def log_path(self, job_id: int) -> str: ...

    # With owner_uid, a file that is not that user's is refused (PermissionDenied), never served.
    def read_log(self, job_id: int, offset: int, max_bytes: int,
                 owner_uid: Optional[int] = None) -> Tuple[bytes, int]: ...

    def free_space(self) -> Dict[str, int]: ...  # directory -> bytes free on its filesystem

    def remove_log(self, job_id: int) -> bool: ...

    def record_path(self, job_id: int) -> str: ...

    def runs_path(self, job_id: int) -> str: ...

    def read_exit_record(self, job_id: int) -> Optional[Dict[str, Any]]: ...

    def read_runs(self, job_id: int) -> List[Dict[str, Any]]: ...

    def discard_records(self, job_id: int) -> None: ...

    def record_job_ids(self) -> List[int]: ...


class StorePort(Protocol):
    def create(self, user: str, uid: int, gid: int, spec: JobSpec, created_at: float,
               state: JobState = ..., resubmit_of: Optional[int] = None) -> Job: ...

    def create_array(self, user: str, uid: int, gid: int, spec: JobSpec, created_at: float,
                     indices: Sequence[int]) -> List[Job]: ...

    def array_tasks(self, array_id: int) -> List[Job]: ...

    def dependents(self, job_id: int) -> List[Job]: ...

    def setting(self, key: str) -> Optional[str]: ...

    def set_setting(self, key: str, value: str) -> None: ...

    def save(self, job: Job) -> None: ...

    def get(self, job_id: int) -> Optional[Job]: ...

    def list_jobs(self, *, include_ended: bool, ended_since: Optional[float], user: Optional[str],
                  state: Optional[JobState], limit: int, after_id: Optional[int] = None) -> List[Job]: ...

    def active_jobs(self) -> List[Job]: ...

    def count_active_jobs(self, uid: int) -> int: ...

    def ensure_ids_above(self, job_id: int) -> bool: ...

    def prunable_job_ids(self, ended_before: float, limit: int) -> List[int]: ...

    def delete_jobs(self, job_ids: Sequence[int]) -> int: ...

    def record_run(self, job_id: int, run: int, started_at: Optional[float], ended_at: Optional[float],
                   exit_code: Optional[int], signal: Optional[int], reason: str, detail: str) -> None: ...

    def runs(self, job_id: int) -> List[Dict[str, Any]]: ...


class SchedulerPort(Protocol):
    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]: ...


class GpuPort(Protocol):
    """The GPU watcher, for the check before a job starts (gpujobd.daemon.gpu.watcher.Watcher)."""

    reason: str  # why the GPUs cannot be read now ("" when they can)

    def blocking_strays(self, cuda_visible_devices: Optional[str]) -> Optional[List[Dict[str, Any]]]: ...

    def inventory(self) -> Optional[Tuple[float, List[Dict[str, Any]]]]: ...  # gpu.watcher.Watcher.inventory

    def refresh(self) -> None: ...  # read the GPUs now


@dataclass(frozen=True)
class User:
    """A passwd entry (group memberships: UsersPort.group_ids)."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


class UsersPort(Protocol):
    """The user and group database (gpujobd.daemon.adapters.users, a module that satisfies this)."""

    def user_name(self, uid: int) -> str: ...  # the login name, else the uid as text

    def user_by_name(self, name: str) -> Optional[User]: ...

    def group_ids(self, name: str, gid: int) -> Tuple[int, ...]: ...  # its groups, primary included

    def group_gid(self, name: str) -> Optional[int]: ...


# spawn(supervisor spec, log fd, on_gate, on_error): a gated supervisor, asked for now and handed to
# on_gate later on the main loop (or on_error(text)); a bad spec raises at once.
Spawn = Callable[[Dict[str, Any], int, Callable[[GatePort], None], Callable[[str], None]], None]
