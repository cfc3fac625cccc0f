"""submitit (the real one, from PyPI: the test extra) on gpujobd, as a user's script uses it:
round trip, an array with %K, an exception, cancel, a Checkpointable requeued after its timeout,
and GPUs through the NVML double. The script (submitit_user.py) runs as alice with the checkout's
.venv python, which has submitit and gpujobd's plugin; the jobs run that same python.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

from tests.integration.conftest import CHECKOUT, scope_pids, sh
from tests.integration.test_scheduling import UUIDS, sched_daemon  # noqa: F401 (a fixture)

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
PYTHON = CHECKOUT / ".venv" / "bin" / "python"
SCRIPT = CHECKOUT / "tests" / "integration" / "submitit_user.py"
RUN_S = 240  # not a timing: a scenario still running after this is stuck


def as_alice(scenario: str) -> Dict[str, Any]:
    folder = f"/home/alice/submitit/{scenario}"
    sh(RUNUSER, "-u", "alice", "--", "mkdir", "-p", folder)
    done = subprocess.run(
        [RUNUSER, "-u", "alice", "--", str(PYTHON), str(SCRIPT), scenario, folder],
        capture_output=True, text=True, timeout=RUN_S, cwd="/home/alice",
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alice", "LANG": "C.UTF-8",
             "SUBMITIT_TEST_MARKER": f"marker-{scenario}"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def alice_job(ctl, job_id: Any) -> Dict[str, Any]:
    return ctl.job("alice", int(job_id))


def test_a_function_round_trips_in_the_users_python_and_environment(ctl) -> None:
    seen = as_alice("roundtrip")
    assert seen["cluster"] == "gpujobd"  # AutoExecutor chose it: gpujobd answers, no srun here
    result = seen["result"]
    assert result["sum"] == 5 and result["python"] == seen["executable"] == str(PYTHON)
    assert result["marker"] == "marker-roundtrip"  # the submitter's environment
    assert result["uid"] == int(sh("id", "-u", "alice").stdout)
    assert seen["state"] == "COMPLETED"
    assert "hello from the job" in seen["stdout"] and seen["stderr"] == seen["stdout"]
    job = alice_job(ctl, seen["job_id"])
    assert job["state"] == "succeeded" and job["name"] == "roundtrip" and job["timeout_s"] == 300


def test_map_array_is_one_gpujobd_array_with_parallelism_as_its_limit(ctl) -> None:
    seen = as_alice("array")
    results = seen["results"]
    assert [r["i"] for r in results] == list(range(12))
    jobs = [alice_job(ctl, job_id) for job_id in seen["job_ids"]]
    assert {job["array_id"] for job in jobs} == {jobs[0]["id"]} and jobs[0]["array"] == "0-11%3"
    assert [job["array_index"] for job in jobs] == list(range(12))
    assert {r["array_id"] for r in results} == {str(jobs[0]["id"])}
    assert seen["peak"] == 3, seen["peak"]  # measured from the tasks' own start and end times
    batched = [alice_job(ctl, job_id) for job_id in seen["batch_job_ids"]]
    assert len({job["array_id"] for job in batched}) == 1
    assert batched[0]["array"] == "0-2%3"  # the executor keeps its parameters
    assert [r["i"] for r in seen["batch_results"]] == [0, 1, 2]


def test_an_exception_in_the_function_is_the_jobs_exception(ctl) -> None:
    seen = as_alice("raises")
    assert seen["exception"] == "FailedJobError" and seen["raised"] == "FailedJobError"
    assert "ValueError: boom-42" in seen["text"]
    assert seen["state"] == "FAILED"


def test_graded_endings_reach_the_submitter(ctl) -> None:
    seen = as_alice("endings")
    killed = seen["killed"]
    assert alice_job(ctl, killed["gpujobd_id"])["reason"] == "signal"
    assert killed["exception"] == "JobKilled" and killed["state"] == "FAILED"
    assert "ended failed, reason signal" in killed["text"]
    timed = seen["timed"]  # as on Slurm: the signal before the timeout ends a function that cannot resume
    assert timed["exception"] == "FailedJobError" and "timed-out and not checkpointable" in timed["text"]


def test_cancel_leaves_no_process(ctl) -> None:
    seen = as_alice("cancel")
    job = alice_job(ctl, seen["gpujobd_id"])
    assert job["state"] == "stopped" and job["stopped_by"] == "alice"
    assert seen["state"] == "CANCELLED" and seen["exception"] == "JobCancelled"
    assert not Path(f"/proc/{seen['pid']}").exists()
    assert scope_pids(job["unit"]) == []


def test_a_checkpointable_interrupted_before_its_timeout_resumes_and_finishes(ctl) -> None:
    seen = as_alice("checkpoint")
    assert seen["result"] == {"done": 16, "starts": 2}, seen["log"][-3000:]
    first, second = (alice_job(ctl, job_id) for job_id in seen["gpujobd_ids"])
    assert first["state"] == "failed" and first["exit_code"] == 255  # submitit's exit after requeue
    assert second["state"] == "succeeded" and second["after_any"] == [first["id"]]
    assert second["timeout_s"] == first["timeout_s"] == 60
    assert seen["state"] == "COMPLETED"
    assert "Requeued job" in seen["log"]


def test_gpus_per_node_jobs_get_disjoint_gpus(sched_daemon, ctl) -> None:  # noqa: F811
    seen = as_alice("gpus")
    results = seen["results"]
    assert all(r["together"] for r in results), results  # all four held their GPU at once
    assert sorted(r["cvd"] for r in results) == sorted(UUIDS)
    jobs = [alice_job(ctl, job_id) for job_id in seen["job_ids"]]
    assert [job["gpus"] for job in jobs] == [[r["cvd"]] for r in results]
