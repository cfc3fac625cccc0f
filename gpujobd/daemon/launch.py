"""What a job's supervisor is told: its command, ids, environment and files. Pure: no I/O."""

from __future__ import annotations

from typing import Any, Dict, Protocol

from gpujobd.daemon.ports import User
from gpujobd.shared.config import JobsConfig
from gpujobd.shared.model import Job


class JobPaths(Protocol):
    def record_path(self, job_id: int) -> str: ...

    def runs_path(self, job_id: int) -> str: ...


def supervisor_spec(job: Job, user: User, jobs: JobsConfig, paths: JobPaths) -> Dict[str, Any]:
    """The one JSON line the gated supervisor reads (gpujobd/supervisor.py documents each key)."""
    return {
        "job_id": job.id,
        "argv": list(job.spec.argv),
        "cwd": job.spec.cwd,
        "env": job_environment(job, user, jobs),
        "uid": job.uid,
        "gid": job.gid,
        "user": job.user,
        "umask": jobs.umask_int,
        "exit_record": paths.record_path(job.id),
        "runs_file": paths.runs_path(job.id),
        "max_runs": job.spec.max_runs or 1,
        "restart_delay_s": job.spec.restart_delay_s or 0.0,
        "stop_on_failure": job.spec.stop_on_failure,
        "log_max_bytes": jobs.log_max_bytes,
    }


def job_environment(job: Job, user: User, jobs: JobsConfig) -> Dict[str, str]:
    """A safe base (never the daemon's environment), then the user's explicit --env, then GPUJOB_ID."""
    env = {"PATH": jobs.default_path, "HOME": user.home, "USER": job.user, "LOGNAME": job.user,
           "SHELL": user.shell or "/bin/sh"}
    env.update(job.spec.env)
    env["GPUJOB_ID"] = str(job.id)
    return env
