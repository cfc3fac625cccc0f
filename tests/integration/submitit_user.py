"""What a user's script does with submitit, run as alice by tests/integration/test_submitit.py:
`python submitit_user.py SCENARIO FOLDER` prints one JSON line of what it saw.

The functions are defined here, in __main__, so cloudpickle sends them by value: the job needs
nothing of this file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import submitit

BARRIER_S = 60.0  # not a timing: a barrier not met by then is reported, not waited for


def add(a, b):
    print("hello from the job", flush=True)
    return {"sum": a + b, "python": sys.executable, "marker": os.environ.get("SUBMITIT_TEST_MARKER"),
            "uid": os.getuid()}


def interval(i, seconds):
    start = time.time()
    time.sleep(seconds)
    return {"i": i, "start": start, "end": time.time(), "array_id": os.environ.get("GPUJOB_ARRAY_ID"),
            "array_index": os.environ.get("GPUJOB_ARRAY_INDEX")}


def boom(n):
    raise ValueError(f"boom-{n}")


def killed():
    os.kill(os.getpid(), 9)


def plain_sleep(seconds):
    time.sleep(seconds)


def sleeper(pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


class Counter(submitit.helpers.Checkpointable):
    """Counts to `steps`, half a second a step; a requeue resumes from the count it reached."""

    def __init__(self):
        self.done = 0
        self.starts = 0

    def __call__(self, steps):
        self.starts += 1
        while self.done < steps:
            time.sleep(0.5)
            self.done += 1
        return {"done": self.done, "starts": self.starts}


def gpu_holder(i, folder, count):
    seen = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    Path(folder, f"cvd-{i}").write_text(seen)
    deadline = time.monotonic() + BARRIER_S  # hold the GPU until all hold one: they run together
    while len(list(Path(folder).glob("cvd-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"i": i, "cvd": seen, "together": len(list(Path(folder).glob("cvd-*"))) == count}


def final_state(job):
    """The state once the job has ended: a result is written just before its process exits, and
    job.state, as on Slurm, may still say RUNNING a moment after result() returned."""
    deadline = time.monotonic() + BARRIER_S
    while job.get_info(mode="force").get("State") in ("PENDING", "RUNNING", "COMPLETING"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return job.state


def peak_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def roundtrip(folder):
    executor = submitit.AutoExecutor(folder)  # no cluster named: gpujobd runs here, Slurm does not
    executor.update_parameters(timeout_min=5, name="roundtrip")
    job = executor.submit(add, 2, 3)
    result = job.result()
    return {"cluster": executor.cluster, "job_id": job.job_id, "result": result, "state": final_state(job),
            "stdout": job.stdout(), "stderr": job.stderr(), "executable": sys.executable}


def array(folder):
    executor = submitit.AutoExecutor(folder, cluster="gpujobd")
    executor.update_parameters(timeout_min=5, name="arr", gpujobd_array_parallelism=3,
                               slurm_array_parallelism=3)
    jobs = executor.map_array(interval, range(12), [3.0] * 12)
    results = [job.result() for job in jobs]
    with executor.batch():
        batched = [executor.submit(interval, i, 0.0) for i in range(3)]
    batched_results = [job.result() for job in batched]
    return {"job_ids": [job.job_id for job in jobs], "results": results,
            "peak": peak_overlap([(r["start"], r["end"]) for r in results]),
            "batch_job_ids": [job.job_id for job in batched], "batch_results": batched_results}


def raises(folder):
    executor = submitit.AutoExecutor(folder, cluster="gpujobd")
    job = executor.submit(boom, 42)
    error = job.exception()
    try:
        job.result()
        raised = None
    except Exception as exc:
        raised = type(exc).__name__
    return {"exception": type(error).__name__, "text": str(error), "raised": raised,
            "state": final_state(job)}


def cancel(folder):
    executor = submitit.AutoExecutor(folder, cluster="gpujobd")
    pid_file = Path(folder) / "sleeper.pid"
    job = executor.submit(sleeper, str(pid_file))
    deadline = time.monotonic() + BARRIER_S
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    job.cancel()
    error = job.exception()
    return {"pid": pid, "gpujobd_id": job.gpujobd_id, "state": final_state(job),
            "exception": type(error).__name__}


def endings(folder):
    executor = submitit.AutoExecutor(folder, cluster="gpujobd")
    killed_job = executor.submit(killed)
    executor.update_parameters(timeout_min=1, gpujobd_signal_delay_s=55, name="no-ckpt")
    timed_job = executor.submit(plain_sleep, 30)  # not Checkpointable: the signal at 5 s ends it
    seen = {}
    for what, job in (("killed", killed_job), ("timed", timed_job)):
        error = job.exception()
        seen[what] = {"exception": type(error).__name__, "text": str(error), "state": final_state(job),
                      "gpujobd_id": job.gpujobd_id}
    return seen


def checkpoint(folder):
    executor = submitit.AutoExecutor(folder, cluster="gpujobd")
    # A 60 s timeout, the signal 55 s before it: at 5 s, while the count (8 s of work) is half done.
    executor.update_parameters(timeout_min=1, gpujobd_signal_delay_s=55, name="ckpt")
    job = executor.submit(Counter(), 16)
    result = job.result()
    return {"result": result, "gpujobd_ids": job.gpujobd_ids, "state": final_state(job), "log": job.stdout()}


def gpus(folder):
    executor = submitit.AutoExecutor(folder, cluster="gpujobd")
    executor.update_parameters(timeout_min=5, gpus_per_node=1, name="gpus")
    jobs = executor.map_array(gpu_holder, range(4), [folder] * 4, [4] * 4)
    return {"results": [job.result() for job in jobs], "job_ids": [job.job_id for job in jobs]}


if __name__ == "__main__":
    scenario, where = sys.argv[1], sys.argv[2]
    print(json.dumps(globals()[scenario](where)))
