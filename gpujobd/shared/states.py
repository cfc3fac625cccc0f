"""A job's states and the reasons it ends: the vocabulary the daemon, the client and gpujobctl share.

Apart from gpujobd.shared.model (the job record and its transitions) so that the client and
gpujobctl, which see jobs as plain dicts, do not build the record's dataclasses at every import.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed-out"
    LOST = "lost"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT, JobState.LOST}
)
ACTIVE_STATES = frozenset({JobState.STARTING, JobState.RUNNING, JobState.STOPPING})


class EndReason(str, enum.Enum):
    """Why a job ended; a tuner grades a failure by this and by how far it got."""

    EXIT_CODE = "exit-code"  # the command exited by itself (code 0 included)
    SIGNAL = "signal"  # the command was killed by a signal nobody here sent
    TIMEOUT = "timeout"  # RuntimeMaxSec= was reached
    OOM_KILL = "oom-kill"  # the kernel's OOM killer acted in the job's cgroup
    STOPPED = "stopped"  # somebody ran `gpujobctl stop`
    BOUND_JOB_ENDED = "bound-job-ended"  # the foreground job it was bound to ended
    EXEC_FAILED = "exec-failed"  # the command could not be executed (not found, not executable)
    CHDIR_FAILED = "chdir-failed"  # the user cannot enter the working directory
    SETUP_FAILED = "setup-failed"  # dropping privileges or opening the log failed
    START_FAILED = "start-failed"  # the scope never started, or the daemon died before release
    DEPENDENCY_FAILED = "dependency-failed"  # a job it had to wait for (--after) did not succeed
    LOST = "lost"  # no record of the end can exist; `detail` says why
