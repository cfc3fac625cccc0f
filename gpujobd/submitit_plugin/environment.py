"""The job side: runs inside the gpujobd job, in `python -m submitit.core._submit FOLDER`.

- The checkpoint signal. On Slurm, submitit's executor asks for SIGUSR2 `signal_delay_s` before the
  time limit (sbatch --signal); submitit's handler then checkpoints a Checkpointable and requeues it.
  gpujobd's timeout is a hard stop (SIGTERM to the whole scope, SIGKILL after jobs.stop_timeout_s),
  with no earlier warning, so the job arms its own: a timer that sends submitit's signal (USR2, or
  $SUBMITIT_PREEMPT_SIGNAL) to this process `signal_delay_s` before the job's timeout (at 80% of it
  when the timeout is not longer than the delay), counted from this process's start.
- SIGTERM (job.cancel(), gpujobctl stop, the timeout itself) ends the function at once with exit
  code 143 (submitit ignores SIGTERM on Slurm, where USR2 comes first; here SIGKILL follows anyway).
- The requeue: a new gpujobd job with this one's command, environment, timeout, GPUs and scope
  properties, started after this one ends (--after-any), continuing the same submitit job id.
"""

from __future__ import annotations

import os
import signal
import threading
import types
from typing import Any, Dict, Optional

from submitit.core import job_environment, logger, utils

from gpujobd.client import Client
from gpujobd.submitit_plugin import ids

SHORT_TIMEOUT_FRACTION = 0.8  # where the signal comes when signal_delay_s >= the timeout
_CARRIED = ("name", "cwd", "timeout_s", "properties", "priority")


class GpujobdJobEnvironment(job_environment.JobEnvironment):
    # One task on one node: the rank variables are never set, so they read as 0 of 1.
    _env = {
        "job_id": "GPUJOB_ID",
        "num_tasks": "SUBMITIT_GPUJOBD_NTASKS",
        "num_nodes": "SUBMITIT_GPUJOBD_NNODES",
        "node": "SUBMITIT_GPUJOBD_NODEID",
        "global_rank": "SUBMITIT_GPUJOBD_GLOBALID",
        "local_rank": "SUBMITIT_GPUJOBD_LOCALID",
    }

    @property
    def raw_job_id(self) -> str:
        """The submitit job id: the first gpujobd job's, kept by requeues."""
        return os.environ.get(ids.ENV_JOB_ID) or os.environ[self._env["job_id"]]

    def _handle_signals(self, paths: utils.JobPaths, submission: utils.DelayedSubmission) -> None:
        super()._handle_signals(paths, submission)
        signal.signal(signal.SIGTERM, _end_on_sigterm)
        at = signal_time_s(os.environ.get(ids.ENV_TIMEOUT_S, ""), os.environ.get(ids.ENV_SIGNAL_DELAY_S, ""))
        if at is not None:
            timer = threading.Timer(at, os.kill, (os.getpid(), self._usr_sig()))
            timer.daemon = True
            timer.start()
            logger.get_logger().info(f"gpujobd: {signal.Signals(self._usr_sig()).name} in {at:.0f} s, "
                                     "before the job's timeout")

    def _requeue(self, countdown: int) -> None:
        current = int(os.environ[self._env["job_id"]])
        client = Client()
        record = client.get(current)
        new = client.submit(record["argv"], **requeue_options(record, self.raw_job_id))
        chain = ids.read_chain(self.paths.folder, self.raw_job_id)
        ids.write_chain(self.paths.folder, self.raw_job_id, [*chain, int(new["id"])])
        logger.get_logger().info(f"Requeued job {self.raw_job_id} as gpujobd job {new['id']}, after "
                                 f"job {current} ({countdown} remaining timeouts)")


def requeue_options(record: Dict[str, Any], job_id: str) -> Dict[str, Any]:
    """The submit keywords that run `record`'s job again, after it, as submitit job `job_id`."""
    options = {name: record[name] for name in _CARRIED if record.get(name) not in (None, "", {})}
    env = {k: v for k, v in (record.get("env") or {}).items() if not k.startswith("GPUJOB_")}
    options.update(env={**env, ids.ENV_JOB_ID: job_id}, env_clear=True, after_any=[int(record["id"])])
    if record.get("gpus_requested"):
        options["gpus"] = int(record["gpus_requested"])
    return options


def signal_time_s(timeout_s: str, delay_s: str) -> Optional[float]:
    """Seconds from now to the checkpoint signal; None without a timeout."""
    if not timeout_s:
        return None
    timeout, delay = float(timeout_s), float(delay_s or 0)
    return timeout - delay if delay < timeout else timeout * SHORT_TIMEOUT_FRACTION


def _end_on_sigterm(signum: int, frame: Optional[types.FrameType]) -> None:
    logger.get_logger().warning("gpujobd: SIGTERM (stopped, or timed out): ending the job")
    raise SystemExit(128 + signum)
