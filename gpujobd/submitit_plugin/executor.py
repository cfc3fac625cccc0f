"""submitit's parameters onto a gpujobd submit; map_array and batch() as one gpujobd array."""

from __future__ import annotations

import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Union

from submitit.core import core, utils

from gpujobd.client import Client
from gpujobd.shared import errors
from gpujobd.submitit_plugin import ids
from gpujobd.submitit_plugin.job import GpujobdJob
from gpujobd.submitit_plugin.settings import settings

# Timings (gpujobd's configuration, [submitit]): affinity() asks gpujobd whether it runs and must
# have an answer within affinity_timeout_s (submitit asks every plugin when AutoExecutor picks a
# cluster); the checkpoint signal comes signal_delay_s before the timeout, as Slurm's executor sends
# USR2 90 s before (its signal_delay_s default).
DEFAULT_NAME = "submitit"  # Slurm's executor's default job name

# AutoExecutor's shared parameters, and gpujobd's own (AutoExecutor: prefixed `gpujobd_`).
GENERIC = {"name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
           "stderr_to_stdout"}
SPECIFIC = {"array_parallelism", "signal_delay_s", "stagger_s", "priority", "properties", "after",
            "after_any", "gpu_check"}
ONE_TASK = ("nodes", "tasks_per_node")


class GpujobdExecutor(core.PicklingExecutor):
    """Runs each submission as a gpujobd job, as you, in your environment and with your Python.

    folder: where pickles go (must be writable by you: the job runs as you). python: the interpreter
    the job runs (default: this one, sys.executable). max_num_timeout: how many times a
    Checkpointable is requeued after its timeout.
    """

    job_class = GpujobdJob

    def __init__(self, folder: Union[str, Path], max_num_timeout: int = 3, max_pickle_size_gb: float = 1.0,
                 python: Optional[str] = None) -> None:
        super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb)
        self.python = sys.executable if python is None else python
        self._client: Optional[Client] = None
        utils.JobPaths.get_first_id_independent_folder(self.folder).mkdir(parents=True, exist_ok=True)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    @classmethod
    def affinity(cls) -> int:
        """2 (a cluster-class executor) where gpujobd answers, -1 where it does not."""
        try:
            Client(call_timeout_s=settings().affinity_timeout_s).list(limit=1)
        except errors.Unavailable:
            return -1
        except errors.GpujobdError:  # it answered (e.g. refused this caller): it runs here
            return 2
        except Exception:  # no system bus, ...: not here
            return -1
        return 2

    @classmethod
    def _valid_parameters(cls) -> Set[str]:
        return GENERIC | SPECIFIC

    def _internal_update_parameters(self, **kwargs: Any) -> None:
        valid = GENERIC | SPECIFIC
        problems = [f"{name}: not a parameter of the gpujobd executor (valid: {', '.join(sorted(valid))})"
                    for name in kwargs if name not in valid]
        problems += [f"{name}={kwargs[name]}: gpujobd runs a job as one task on one server; use {name}=1 "
                     "(or Slurm for more)" for name in ONE_TASK if kwargs.get(name, 1) != 1]
        if problems:
            raise ValueError("; ".join(problems))
        super()._internal_update_parameters(**kwargs)

    # -- submission --

    def _internal_process_submissions(
        self, delayed_submissions: List[utils.DelayedSubmission]
    ) -> List[core.Job[Any]]:
        pickles = [self._dump(delayed, len(delayed_submissions)) for delayed in delayed_submissions]
        try:
            records = self._submit(len(pickles))
        except BaseException:
            for pickle in pickles:
                pickle.unlink(missing_ok=True)
            raise
        jobs: List[core.Job[Any]] = []
        for record, pickle in zip(records, pickles):
            job: GpujobdJob[Any] = GpujobdJob(folder=self.folder, job_id=str(record["id"]))
            job.paths.move_temporary_file(pickle, "submitted_pickle")
            jobs.append(job)
        return jobs

    def _dump(self, delayed: utils.DelayedSubmission, count: int) -> Path:
        path = utils.JobPaths.get_first_id_independent_folder(self.folder) / f"{uuid.uuid4().hex}.pkl"
        delayed.set_timeout(self.parameters.get("timeout_min") or 0, self.max_num_timeout)
        delayed.dump(path)
        size_gb = path.stat().st_size / 1024**3
        if count * size_gb > self.max_pickle_size_gb:
            path.unlink()
            raise RuntimeError(f"Submitting about {count} x {size_gb:.2f} GB of pickled functions and "
                               f"arguments, over max_pickle_size_gb={self.max_pickle_size_gb}: pass less "
                               "data through arguments (paths instead), or raise executor.max_pickle_size_gb")
        return path

    def _submit(self, count: int) -> List[Dict[str, Any]]:
        argv = [self.python, "-u", "-m", "submitit.core._submit", str(self.folder)]
        options = self.submit_options()
        if count == 1:
            return [self.client.submit(argv, **options)]
        parallelism = self.parameters.get("array_parallelism")
        options["array"] = f"0-{count - 1}" + (f"%{int(parallelism)}" if parallelism else "")
        if self.parameters.get("stagger_s"):
            options["stagger_s"] = float(self.parameters["stagger_s"])
        return sorted(self.client.submit_all(argv, **options), key=lambda job: int(job["array_index"]))

    def submit_options(self) -> Dict[str, Any]:
        """The gpujobd submit keywords these parameters give (gpujobd.client.Client.submit)."""
        p = self.parameters
        timeout_s = int(p["timeout_min"] * 60) if p.get("timeout_min") else None
        options: Dict[str, Any] = {
            "name": str(p.get("name") or DEFAULT_NAME),
            "env": {"SUBMITIT_EXECUTOR": ids.EXECUTOR_NAME, ids.ENV_JOB_ID: "",
                    ids.ENV_TIMEOUT_S: str(timeout_s or ""),
                    ids.ENV_SIGNAL_DELAY_S: f'{p.get("signal_delay_s", settings().signal_delay_s):g}'},
        }
        if timeout_s:
            options["timeout_s"] = timeout_s
        if p.get("gpus_per_node"):
            options["gpus"] = int(p["gpus_per_node"])
        properties = scope_properties(p)
        if properties:
            options["properties"] = properties
        for name in ("priority", "gpu_check"):
            if p.get(name) is not None:
                options[name] = p[name]
        for name in ("after", "after_any"):
            if p.get(name):
                options[name] = [job_ids(item) for item in _as_list(p[name])]
        return options

    # -- PicklingExecutor's sbatch-shaped hooks: gpujobd takes the command directly, not a file --

    @property
    def _submitit_command_str(self) -> str:
        return " ".join(shlex.quote(a) for a in [self.python, "-u", "-m", "submitit.core._submit",
                                                  str(self.folder)])

    def _num_tasks(self) -> int:
        return 1

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        raise NotImplementedError("gpujobd runs the command itself: no submission file")

    def _make_submission_command(self, submission_file_path: Path) -> List[str]:
        raise NotImplementedError("gpujobd runs the command itself: no submission file")

    @staticmethod
    def _get_job_id_from_submission_command(string: Union[bytes, str]) -> str:
        raise NotImplementedError("gpujobd returns the job itself: nothing to parse")

    def _throttle(self) -> None:  # one D-Bus call per submission, whole arrays in one
        self._last_job_submitted = time.time()


def scope_properties(parameters: Dict[str, Any]) -> Dict[str, str]:
    """mem_gb -> MemoryMax, cpus_per_task -> CPUQuota (100% per CPU), over `properties`: both are in
    gpujobd's default allowlist (jobs.allowed_properties)."""
    properties = {str(k): str(v) for k, v in dict(parameters.get("properties") or {}).items()}
    if parameters.get("mem_gb"):
        properties["MemoryMax"] = f"{int(float(parameters['mem_gb']) * 1024)}M"
    if parameters.get("cpus_per_task"):
        properties["CPUQuota"] = f"{int(parameters['cpus_per_task']) * 100}%"
    return properties


def job_ids(item: Any) -> int:
    """A dependency: a submitit job (its newest gpujobd job) or a gpujobd job id."""
    if isinstance(item, GpujobdJob):
        return item.gpujobd_id
    if isinstance(item, core.Job):
        raise ValueError(f"{item!r} is not a gpujobd job: gpujobd can wait only for its own jobs")
    return int(item)


def _as_list(value: Any) -> Sequence[Any]:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
