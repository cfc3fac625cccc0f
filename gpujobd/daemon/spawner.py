"""Starting a job's supervisor behind a gate, and the files the daemon keeps for each job.

The daemon (root) keeps one `python3 -I .../gpujobd/supervisor.py --zygote` running (standard library
only, so it runs as a script wherever the package is installed) and asks it to fork a gated supervisor
per job (gpujobd.daemon.zygote). The job's spec goes on a pipe, the gate. The supervisor blocks on
that pipe until the daemon has put it into the job's scope and systemd has reported the scope active;
only then does the daemon write the release line. If the daemon dies first, the pipe closes without
it and no user code ever runs.

Every file here is opened relative to a directory descriptor of a root-owned directory, with
O_NOFOLLOW and, for new files, O_EXCL: no path a user controls is ever opened as root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from gpujobd import supervisor
from gpujobd.shared.errors import PermissionDenied

LOG_SUFFIX = ".log"
RECORD_SUFFIX = ".json"
RUNS_SUFFIX = ".runs"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_private_dir(path: Path, mode: int = 0o755) -> int:
    """Create (parents included) and open a directory that must be root's and not a symlink."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    fd = os.open(path, _DIR_FLAGS)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise PermissionError(f"{path} must be owned by uid {os.geteuid()} and writable only by it")
    return fd


class LogNotOwned(PermissionDenied):
    """A job's log file is not its user's (a leftover of a lost database, or tampering)."""


def _free_bytes(fd: int) -> int:
    info = os.fstatvfs(fd)
    return info.f_bavail * info.f_frsize


class JobFiles:
    """The per-job files: logs in `log_dir`, exit records and run records in `record_dir`."""

    def __init__(self, log_dir: Path, record_dir: Path):
        self.log_dir = log_dir
        self._log_prefix = os.path.join(str(log_dir), "")  # log_path is asked on every Get and List entry
        self.record_dir = record_dir
        self._log_dir_fd = open_private_dir(log_dir)
        self._record_dir_fd = open_private_dir(record_dir, 0o700)

    def close(self) -> None:
        os.close(self._log_dir_fd)
        os.close(self._record_dir_fd)

    def log_path(self, job_id: int) -> str:
        return f"{self._log_prefix}{job_id}{LOG_SUFFIX}"

    def create_log(self, job_id: int, uid: int, gid: int) -> int:
        """A new log file owned by the job's user (mode 0600), opened for appending."""
        fd = os.open(f"{job_id}{LOG_SUFFIX}",
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self._log_dir_fd)
        os.fchown(fd, uid, gid)
        return fd

    def read_log(self, job_id: int, offset: int, max_bytes: int,
                 owner_uid: Optional[int] = None) -> Tuple[bytes, int]:
        """Bytes from `offset`; only what is asked for is read, however large the file is.

        With `owner_uid`, the open file must belong to that user (fstat, after the open: no race): a
        log left from a lost database, or any file that is not the job's, is never served."""
        try:
            fd = os.open(f"{job_id}{LOG_SUFFIX}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._log_dir_fd)
        except FileNotFoundError:
            return b"", offset
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return b"", offset
            if owner_uid is not None and info.st_uid != owner_uid:
                raise LogNotOwned(f"the log file of job {job_id} belongs to uid {info.st_uid}, not to "
                                  f"the job's user (uid {owner_uid}): it is not served; an admin should "
                                  f"look at {self.log_path(job_id)}")
            data = os.pread(fd, max_bytes, offset)
        finally:
            os.close(fd)
        return data, offset + len(data)

    def record_path(self, job_id: int) -> str:
        return str(self.record_dir / f"{job_id}{RECORD_SUFFIX}")

    def highest_job_id(self) -> int:
        """The largest job id any log or record on disk has (0 if none): after a lost database, new
        ids start above it, so no new job meets an old job's files."""
        ids = [int(stem) for fd in (self._log_dir_fd, self._record_dir_fd) for name in os.listdir(fd)
               for stem in [name.split(".", 1)[0]] if stem.isdigit() and len(stem) < 19]
        return max(ids, default=0)

    def free_space(self) -> Dict[str, int]:
        """Bytes free (to users other than root) on the logs' and the records' filesystems, by directory."""
        return {str(path): _free_bytes(fd) for path, fd in ((self.log_dir, self._log_dir_fd),
                                                           (self.record_dir, self._record_dir_fd))}

    def remove_log(self, job_id: int) -> bool:
        """Delete a job's log (retention); whether there was one."""
        try:
            os.unlink(f"{job_id}{LOG_SUFFIX}", dir_fd=self._log_dir_fd)
        except FileNotFoundError:
            return False
        return True

    def log_job_ids(self) -> List[int]:
        return sorted(int(stem) for name in os.listdir(self._log_dir_fd)
                      for stem in [name[: -len(LOG_SUFFIX)]] if name.endswith(LOG_SUFFIX) and stem.isdigit())

    def runs_path(self, job_id: int) -> str:
        return str(self.record_dir / f"{job_id}{RUNS_SUFFIX}")

    def read_exit_record(self, job_id: int) -> Optional[Dict[str, Any]]:
        text = self._read_record_file(f"{job_id}{RECORD_SUFFIX}")
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("job_id") == job_id else None

    def read_runs(self, job_id: int) -> List[Dict[str, Any]]:
        text = self._read_record_file(f"{job_id}{RUNS_SUFFIX}") or ""
        runs = []
        for line in text.splitlines():
            try:
                run = json.loads(line)
            except ValueError:
                continue  # a torn last line from a supervisor killed mid-write
            if isinstance(run, dict):
                runs.append(run)
        return runs

    def discard_records(self, job_id: int) -> None:
        for name in (f"{job_id}{RECORD_SUFFIX}", f"{job_id}{RUNS_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._record_dir_fd)

    def record_job_ids(self) -> List[int]:
        ids = set()
        for name in os.listdir(self._record_dir_fd):
            stem = name.split(".", 1)[0]
            if stem.isdigit():
                ids.add(int(stem))
        return sorted(ids)

    def _read_record_file(self, name: str) -> Optional[str]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._record_dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read()


@dataclass
class Gate:
    """The daemon's end of a supervisor's gate pipe."""

    pid: int
    fd: Optional[int]

    def release(self) -> None:
        self._write_and_close(supervisor.RELEASE_LINE)

    def abort(self) -> None:
        """Close without releasing: the supervisor exits without running user code."""
        self._write_and_close(b"")

    def _write_and_close(self, data: bytes) -> None:
        if self.fd is None:
            return
        try:
            if data:
                os.write(self.fd, data)
        except OSError as err:
            if err.errno != errno.EPIPE:
                raise
        finally:
            os.close(self.fd)
            self.fd = None


SUPERVISOR_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def gated(pid: int, write_end: int, spec: Dict[str, Any]) -> Gate:
    """The gate of supervisor `pid`, its spec written: it waits on the pipe for its release."""
    gate = Gate(pid=pid, fd=write_end)
    try:
        _write_all(write_end, supervisor.encode_spec(spec))
    except OSError:
        gate.abort()
        raise
    return gate


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
