"""What the submitting side and the job side agree on: environment variables and the requeue record.

A submitit job keeps one id (submitit's `job_id`, the first gpujobd job's id) across requeues; each
requeue is a new gpujobd job. The job side records the chain of gpujobd ids in a small JSON file
beside the job's pickles; the submitting side follows it to the newest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

EXECUTOR_NAME = "gpujobd"
# Set on a requeued job: the submitit job id it continues (its pickles are under that id).
ENV_JOB_ID = "SUBMITIT_GPUJOBD_JOB_ID"
# The job's timeout in seconds ("" for none), and how long before it the checkpoint signal comes.
ENV_TIMEOUT_S = "SUBMITIT_GPUJOBD_TIMEOUT_S"
ENV_SIGNAL_DELAY_S = "SUBMITIT_GPUJOBD_SIGNAL_DELAY_S"


def chain_path(job_folder: Path, job_id: str) -> Path:
    return job_folder / f"{job_id}_gpujobd_ids.json"


def read_chain(job_folder: Path, job_id: str) -> List[int]:
    """The gpujobd ids that ran this submitit job, oldest first ([job_id] before any requeue)."""
    try:
        ids = json.loads(chain_path(job_folder, job_id).read_text())
    except (FileNotFoundError, ValueError):
        return [int(job_id)]
    return [int(i) for i in ids] or [int(job_id)]


def write_chain(job_folder: Path, job_id: str, ids: List[int]) -> None:
    """Atomically: write a temporary file, then rename it over the record."""
    path = chain_path(job_folder, job_id)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(ids))
    os.replace(tmp, path)
