"""submitit on gpujobd: `submitit.AutoExecutor(folder, cluster="gpujobd")` (docs/submitit.md).

Registered through the `submitit` entry-point group (pyproject.toml), so that submitit finds it once
`pip install 'gpujobd[submitit]'` has put both in the same environment. Four parts, as submitit's
docs/plugins.md asks:

- `executor.GpujobdExecutor`: maps submitit's parameters onto a gpujobd submit; `map_array` and
  `batch()` become one gpujobd array;
- `job.GpujobdJob` and `job.GpujobdInfoWatcher`: a job's state, result, exception and log from
  gpujobd's records;
- `environment.GpujobdJobEnvironment`: the job side (the checkpoint signal before the timeout, the
  requeue of a Checkpointable).

Only this package imports submitit; it talks to gpujobd through gpujobd.client, never the daemon.
"""

from __future__ import annotations

from gpujobd.submitit_plugin.environment import GpujobdJobEnvironment
from gpujobd.submitit_plugin.executor import GpujobdExecutor
from gpujobd.submitit_plugin.job import (
    GpujobdInfoWatcher,
    GpujobdJob,
    JobCancelled,
    JobEnded,
    JobKilled,
    JobOutOfMemory,
    JobTimedOut,
)

__all__ = [
    "GpujobdExecutor",
    "GpujobdInfoWatcher",
    "GpujobdJob",
    "GpujobdJobEnvironment",
    "JobCancelled",
    "JobEnded",
    "JobKilled",
    "JobOutOfMemory",
    "JobTimedOut",
]
