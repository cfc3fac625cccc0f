"""The submitting side's view of a job: state, result, exception and log from gpujobd's records.

States are Slurm's words (what submitit users already test for): a script that checks
`job.state == "COMPLETED"` runs unchanged on both. One log per gpujobd job holds stdout and stderr
together, so `stdout()` and `stderr()` both return it (as Slurm does with stderr_to_stdout).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from submitit.core import core, utils
from submitit.core.core import R

from gpujobd.client import Client
from gpujobd.shared import errors
from gpujobd.submitit_plugin import ids
from gpujobd.submitit_plugin.settings import settings

# The longest pause between two state reads of a job without a result yet (submitit's watcher reads
# at 0, 2, 4, 8 ... seconds after the last submission, then at most this far apart): the config's
# submitit.watcher_max_delay_s. A gpujobd Get costs about a millisecond, unlike sacct, hence much
# less than Slurm's 60 s.
LOG_TAIL_LINES = 40

# gpujobd state (and, for `failed`, reason) -> Slurm's state word.
_STATES = {
    "queued": "PENDING",
    "starting": "RUNNING",
    "running": "RUNNING",
    "stopping": "COMPLETING",
    "succeeded": "COMPLETED",
    "failed": "FAILED",
    "stopped": "CANCELLED",
    "timed-out": "TIMEOUT",
    "lost": "NODE_FAIL",
}
_FAILED_REASONS = {"oom-kill": "OUT_OF_MEMORY", "dependency-failed": "CANCELLED"}
NOT_FOUND = "NOT_FOUND"  # final, for submitit: not in its list of incomplete states


def slurm_state(record: Mapping[str, Any]) -> str:
    state = str(record.get("state", ""))
    if state == "failed" and record.get("reason") in _FAILED_REASONS:
        return _FAILED_REASONS[str(record["reason"])]
    return _STATES.get(state, "UNKNOWN")


class JobEnded(utils.UncompletedJobError):
    """The job ended without a result; `record` is gpujobd's job (state, reason, exit_code, ...)."""

    def __init__(self, message: str, record: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.record = dict(record)


class JobTimedOut(JobEnded):
    """Its timeout was reached (and it was not, or no longer, requeued from a checkpoint)."""


class JobOutOfMemory(JobEnded):
    """The kernel's OOM killer acted in the job (e.g. over its MemoryMax, from mem_gb)."""


class JobKilled(JobEnded):
    """A signal nobody here sent ended it (a segfault, another process's kill)."""


class JobCancelled(JobEnded):
    """Stopped (job.cancel(), gpujobctl stop), or never run because a dependency failed."""


def _ended_class(record: Mapping[str, Any]) -> Type[JobEnded]:
    reason = record.get("reason")
    if record.get("state") == "timed-out":
        return JobTimedOut
    if reason == "oom-kill":
        return JobOutOfMemory
    if reason == "signal":
        return JobKilled
    if record.get("state") == "stopped" or reason == "dependency-failed":
        return JobCancelled
    return JobEnded


class GpujobdInfoWatcher(core.InfoWatcher):
    """Reads the state of every registered, unfinished job from gpujobd, on submitit's schedule."""

    def __init__(self, delay_s: Optional[float] = None) -> None:
        if delay_s is None:
            delay_s = settings().watcher_max_delay_s
        super().__init__(max(1, round(delay_s)))  # submitit's watcher counts whole seconds
        self._client: Optional[Client] = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        return self.get_info(job_id, mode=mode).get("State") or "UNKNOWN"

    def update(self) -> None:
        self._num_calls += 1
        for job_id in self._registered - self._finished:
            info = self._read(job_id)
            if info is not None:
                self._info_dict[job_id] = info
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _read(self, job_id: str) -> Optional[Dict[str, str]]:
        try:
            record = self.client.get(int(job_id))
        except errors.NotFound:
            return {"State": NOT_FOUND, "JobID": job_id}
        except errors.GpujobdError:  # daemon restarting, ...: keep what we knew (as submitit does)
            return None
        return {"State": slurm_state(record), "JobID": job_id, "gpujobd_state": str(record["state"]),
                "reason": str(record.get("reason") or "")}


class GpujobdJob(core.Job[R]):
    """A submitit job run by gpujobd. `job_id` is the first gpujobd job's id; after a requeue from a
    checkpoint, state, log and cancel follow the newest (`gpujobd_ids`)."""

    watcher = GpujobdInfoWatcher()

    @property
    def gpujobd_ids(self) -> List[int]:
        return ids.read_chain(self.paths.folder, self.job_id)

    @property
    def gpujobd_id(self) -> int:
        return self.gpujobd_ids[-1]

    @property
    def state(self) -> str:
        return self.watcher.get_state(str(self.gpujobd_id), mode="standard")

    def get_info(self, mode: str = "force") -> Dict[str, str]:
        return self.watcher.get_info(str(self.gpujobd_id), mode=mode)

    def done(self, force_check: bool = False) -> bool:
        if self.paths.result_pickle.exists():
            return True
        return self.watcher.is_done(str(self.gpujobd_id), mode="force" if force_check else "standard")

    def cancel(self, check: bool = True) -> None:
        """gpujobctl stop: SIGTERM to every process of the job, SIGKILL after the server's
        jobs.stop_timeout_s. With check, a failure to stop (not yours, ...) raises."""
        try:
            self.watcher.client.stop(self.gpujobd_id)
        except errors.GpujobdError:
            if check:
                raise

    def _get_logs_string(self, name: str) -> Optional[str]:
        if name not in ("stdout", "stderr"):
            raise ValueError(f'Unknown "{name}", available are ["stdout", "stderr"]')
        chunks: List[bytes] = []
        found = False
        for job_id in self.gpujobd_ids:
            try:
                chunks.extend(self.watcher.client.logs(job_id))
                found = True
            except errors.NotFound:
                continue
        return b"".join(chunks).decode("utf-8", errors="replace") if found else None

    def _get_outcome_and_result(self) -> Tuple[str, Any]:
        if self.paths.result_pickle.exists():
            return super()._get_outcome_and_result()
        raise self._ended_error()

    def _ended_error(self) -> utils.UncompletedJobError:
        try:
            record = self.watcher.client.get(self.gpujobd_id)
        except errors.GpujobdError as error:
            return utils.UncompletedJobError(f"Job {self.job_id} has produced no result, and gpujobd "
                                             f"cannot say why: {error}")
        how = record["state"] + (f", reason {record['reason']}" if record.get("reason") else "")
        lines = [f"Job {self.job_id} (gpujobd job {record['id']}) ended {how} without a result"
                 + (f": {record['detail']}" if record.get("detail") else "")]
        log = self.stdout() or ""
        tail = log.splitlines()[-LOG_TAIL_LINES:]
        if tail:
            lines += [f"Last {len(tail)} lines of its log:", "-" * 40, *tail]
        return _ended_class(record)("\n".join(lines), record)
