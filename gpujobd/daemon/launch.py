"""What a job's supervisor is told: its command, ids, environment and files. Pure: no I/O."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence

from gpujobd.daemon.ports import User
from gpujobd.daemon.properties import Encoded
from gpujobd.shared import environment
from gpujobd.shared.config import JobsConfig, SchedulerConfig
from gpujobd.shared.model import Job


class JobPaths(Protocol):
    def record_path(self, job_id: int) -> str: ...

    def runs_path(self, job_id: int) -> str: ...


def supervisor_spec(job: Job, user: User, jobs: JobsConfig, paths: JobPaths,
                    scheduler: Optional[SchedulerConfig] = None) -> Dict[str, Any]:
    """The one JSON line the gated supervisor reads (gpujobd/supervisor.py documents each key)."""
    return {
        "job_id": job.id,
        "argv": list(job.spec.argv),
        "cwd": job.spec.cwd,
        "env": job_environment(job, user, jobs, scheduler),
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
        "log_drain_s": jobs.log_drain_s,
    }


def job_environment(job: Job, user: User, jobs: JobsConfig,
                    scheduler: Optional[SchedulerConfig] = None) -> Dict[str, str]:
    """The job's environment: a safe base (never the daemon's environment), then what the user sent
    (their captured environment and --env; applied by the supervisor only after dropping
    privileges), then gpujobd's own variables, which always win (`with_own_variables`)."""
    env = {"PATH": jobs.default_path, "HOME": user.home, "SHELL": user.shell or "/bin/sh"}
    env.update(job.spec.env)
    env.setdefault(environment.PYTHON_UNBUFFERED, "1")  # `--env PYTHONUNBUFFERED=` turns it off
    return with_own_variables(env, own_variables(job, scheduler))


def own_variables(job: Job, scheduler: Optional[SchedulerConfig] = None) -> Dict[str, str]:
    """What gpujobd itself sets in a job: its id, its owner's names, its array's ids and its GPUs
    (GPUJOB_RUN is the supervisor's, per run)."""
    own = {"GPUJOB_ID": str(job.id), "USER": job.user, "LOGNAME": job.user}
    if job.array_id is not None and job.array_index is not None:
        own["GPUJOB_ARRAY_ID"] = str(job.array_id)
        own["GPUJOB_ARRAY_INDEX"] = str(job.array_index)
    own.update(gpu_environment(job, scheduler))
    return own


def with_own_variables(env: Dict[str, str], own: Dict[str, str]) -> Dict[str, str]:
    """The one rule: gpujobd's own variables always win over the user's. Any other GPUJOB_* the user
    sent (a job submitted from inside a job carries its parent's) is dropped."""
    kept = {name: value for name, value in env.items() if not environment.is_own_variable(name)}
    kept.update(own)
    return kept


def gpu_environment(job: Job, scheduler: Optional[SchedulerConfig]) -> Dict[str, str]:
    """CUDA_VISIBLE_DEVICES: the allocated GPUs' UUIDs (docs/gpu.md says why UUIDs), empty for a
    job without GPUs unless jobs_without_gpus is unrestricted (then the user's own value stays)."""
    if not job.gpus and (scheduler is None or scheduler.jobs_without_gpus == "unrestricted"):
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(job.gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "GPUJOB_GPUS": ",".join(job.gpus)}


def device_properties(gpus: Sequence[str], minors: Mapping[str, Optional[int]],
                      scheduler: SchedulerConfig) -> List[Encoded]:
    """The scope's device cgroup: DevicePolicy=closed (the standard pseudo devices only) plus the
    job's own /dev/nvidiaN by NVML minor number and, with GPUs, the control devices CUDA opens.
    None for a job without GPUs when such jobs are unrestricted, or when isolation is off."""
    if not scheduler.isolate_devices or (not gpus and scheduler.jobs_without_gpus == "unrestricted"):
        return []
    allow = [(f"/dev/nvidia{minor}", "rw") for minor in (minors.get(uuid) for uuid in gpus)
             if minor is not None]
    if gpus:
        allow += [(device, "rw") for device in scheduler.control_devices]
    return [("DevicePolicy", "s", "closed"), ("DeviceAllow", "a(ss)", allow)]
