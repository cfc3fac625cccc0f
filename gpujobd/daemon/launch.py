"""What a job's supervisor is told: its command, ids, environment and files. Pure: no I/O."""

from __future__ import annotations

from typing import Any, Dict, Protocol

from gpujobd.daemon.ports import User
from gpujobd.shared import environment
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
    }


def job_environment(job: Job, user: User, jobs: JobsConfig) -> Dict[str, str]:
    """The job's environment: a safe base (never the daemon's environment), then what the user sent
    (their captured environment and --env; applied by the supervisor only after dropping
    privileges), then gpujobd's own variables, which always win (`with_own_variables`)."""
    env = {"PATH": jobs.default_path, "HOME": user.home, "SHELL": user.shell or "/bin/sh"}
    env.update(job.spec.env)
    env.setdefault(environment.PYTHON_UNBUFFERED, "1")  # `--env PYTHONUNBUFFERED=` turns it off
    return with_own_variables(env, own_variables(job))


def own_variables(job: Job) -> Dict[str, str]:
    """What gpujobd itself sets in every job: its id and its owner's names (CUDA_VISIBLE_DEVICES too
    once GPUs are allocated to the job; GPUJOB_RUN is the supervisor's, per run)."""
    return {"GPUJOB_ID": str(job.id), "USER": job.user, "LOGNAME": job.user}


def with_own_variables(env: Dict[str, str], own: Dict[str, str]) -> Dict[str, str]:
    """The one rule: gpujobd's own variables always win over the user's. Any other GPUJOB_* the user
    sent (a job submitted from inside a job carries its parent's) is dropped."""
    kept = {name: value for name, value in env.items() if not environment.is_own_variable(name)}
    kept.update(own)
    return kept
