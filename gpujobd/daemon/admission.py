"""What only the daemon can check of a submission's scheduling options, and what a resubmission is.

Pure functions over what the manager looks up (jobs by id, the GPU count): they never touch the store.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional

from gpujobd.shared.model import Job, JobSpec
from gpujobd.shared.states import JobState

Lookup = Callable[[int], Optional[Job]]


def scheduling_problems(spec: JobSpec, is_admin: Callable[[], bool], lookup: Lookup, gpu_count: Optional[int],
                        admin_group: str) -> List[str]:
    """Every problem of a spec's priority, GPUs and dependencies, each saying what to do."""
    found: List[str] = []
    if spec.priority > 0 and not is_admin():
        found.append(f"priority (--priority) is {spec.priority}: only root or a member of group "
                     f"'{admin_group}' may raise a job above 0; you may lower it")
    if spec.gpus and gpu_count is not None and spec.gpus > gpu_count:
        found.append(f"gpus (--gpus) is {spec.gpus}, but this server has {gpu_count} GPU"
                     f"{'s' if gpu_count != 1 else ''}: ask for at most {gpu_count}")
    for label, ids in (("after (--after)", spec.after), ("after_any (--after-any)", spec.after_any)):
        unknown = [str(job_id) for job_id in ids if lookup(job_id) is None]
        if unknown:
            found.append(f"{label} names job {', '.join(unknown)}, which does not exist: "
                         "`gpujobctl list --all` shows the known ids")
    return found


def to_resubmit(job: Job, with_dependents: bool, dependents_of: Callable[[int], List[Job]],
                may_act_on: Callable[[Job], bool]) -> List[Job]:
    """The job, and with_dependents the jobs that (transitively) depended on it and ended without
    succeeding, that the caller may act on: in id order (a job's dependencies come before it)."""
    chosen: Dict[int, Job] = {job.id: job}
    pending = [job.id] if with_dependents else []
    while pending:
        for dependent in dependents_of(pending.pop()):
            if dependent.id in chosen or not dependent.state.is_final:
                continue
            if dependent.state is JobState.SUCCEEDED or not may_act_on(dependent):
                continue
            chosen[dependent.id] = dependent
            pending.append(dependent.id)
    return [chosen[job_id] for job_id in sorted(chosen)]


def resubmitted_spec(job: Job, new_ids: Dict[int, int]) -> JobSpec:
    """The same spec, its dependencies wired to the new jobs where those were resubmitted too (a
    dependency that succeeded keeps its id: it counts as met). A task of an array comes back alone."""
    return dataclasses.replace(job.spec, after=_remap(job.spec.after, new_ids),
                               after_any=_remap(job.spec.after_any, new_ids), array="", stagger_s=None)


def _remap(ids: Iterable[int], new_ids: Dict[int, int]) -> tuple:
    return tuple(new_ids.get(job_id, job_id) for job_id in ids)
