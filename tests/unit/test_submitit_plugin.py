"""The submitit plugin without a daemon: discovery, parameter mapping, states, the job side's timing
and requeue options. The sandbox's tests/integration/test_submitit.py runs it for real."""

from __future__ import annotations

from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="the submitit extra is not installed (package builds)")
from submitit.core import plugins  # noqa: E402

from gpujobd.submitit_plugin import environment, ids, job  # noqa: E402
from gpujobd.submitit_plugin.executor import GpujobdExecutor, scope_properties  # noqa: E402


def test_submitit_finds_the_plugin_through_its_entry_points() -> None:
    assert plugins.get_executors()["gpujobd"] is GpujobdExecutor
    assert type(plugins.get_job_environments()["gpujobd"]) is environment.GpujobdJobEnvironment


def test_auto_executor_maps_generic_and_prefixed_parameters(tmp_path: Path) -> None:
    executor = submitit.AutoExecutor(tmp_path, cluster="gpujobd")
    executor.update_parameters(timeout_min=30, gpus_per_node=2, name="train", mem_gb=1.5, cpus_per_task=4,
                               gpujobd_array_parallelism=3, slurm_partition="dev", gpujobd_priority=-1)
    options = executor._executor.submit_options()  # type: ignore[attr-defined]
    assert options["timeout_s"] == 1800 and options["gpus"] == 2 and options["name"] == "train"
    assert options["properties"] == {"MemoryMax": "1536M", "CPUQuota": "400%"}
    assert options["priority"] == -1
    assert options["env"] == {"SUBMITIT_EXECUTOR": "gpujobd", ids.ENV_JOB_ID: "",
                              ids.ENV_TIMEOUT_S: "1800", ids.ENV_SIGNAL_DELAY_S: "90"}
    assert executor._executor.parameters["array_parallelism"] == 3  # type: ignore[attr-defined]


def test_no_timeout_sends_none_and_arms_no_signal(tmp_path: Path) -> None:
    options = GpujobdExecutor(tmp_path).submit_options()
    assert "timeout_s" not in options and options["env"][ids.ENV_TIMEOUT_S] == ""
    assert environment.signal_time_s("", "90") is None


@pytest.mark.parametrize("bad", [{"nodes": 2}, {"tasks_per_node": 4}, {"partition": "dev"}])
def test_parameters_gpujobd_cannot_honour_are_refused_by_name(tmp_path: Path, bad) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GpujobdExecutor(tmp_path).update_parameters(**bad)


def test_properties_keep_the_users_own_and_add_memory_and_cpus() -> None:
    assert scope_properties({"properties": {"CPUWeight": 50}, "mem_gb": 8}) == {"CPUWeight": "50",
                                                                                 "MemoryMax": "8192M"}


@pytest.mark.parametrize("record, state, error", [
    ({"state": "queued"}, "PENDING", None),
    ({"state": "running"}, "RUNNING", None),
    ({"state": "succeeded", "reason": "exit-code"}, "COMPLETED", job.JobEnded),
    ({"state": "failed", "reason": "exit-code"}, "FAILED", job.JobEnded),
    ({"state": "failed", "reason": "oom-kill"}, "OUT_OF_MEMORY", job.JobOutOfMemory),
    ({"state": "failed", "reason": "signal"}, "FAILED", job.JobKilled),
    ({"state": "failed", "reason": "dependency-failed"}, "CANCELLED", job.JobCancelled),
    ({"state": "stopped", "reason": "stopped"}, "CANCELLED", job.JobCancelled),
    ({"state": "timed-out", "reason": "timeout"}, "TIMEOUT", job.JobTimedOut),
    ({"state": "lost", "reason": "lost"}, "NODE_FAIL", job.JobEnded),
])
def test_states_read_as_slurms_and_endings_as_submitits_exceptions(record, state, error) -> None:
    assert job.slurm_state(record) == state
    if error is not None:
        cls = job._ended_class(record)
        assert cls is error and issubclass(cls, submitit.core.utils.UncompletedJobError)


def test_the_checkpoint_signal_comes_signal_delay_before_the_timeout() -> None:
    assert environment.signal_time_s("3600", "90") == 3510
    assert environment.signal_time_s("60", "90") == pytest.approx(48)  # delay >= timeout: at 80%


def test_a_requeue_runs_the_same_command_after_this_job_as_the_same_submitit_job() -> None:
    argv = ["/venv/bin/python", "-u", "-m", "submitit.core._submit", "/f"]
    record = {"id": 21, "name": "ckpt", "argv": argv,
              "cwd": "/home/alice", "timeout_s": 60, "properties": {}, "priority": 0, "gpus_requested": 1,
              "env": {"PATH": "/venv/bin", "GPUJOB_ID": "21", ids.ENV_JOB_ID: ""}}
    options = environment.requeue_options(record, "17")
    assert options == {"name": "ckpt", "cwd": "/home/alice", "timeout_s": 60, "env_clear": True,
                       "env": {"PATH": "/venv/bin", ids.ENV_JOB_ID: "17"}, "after_any": [21], "gpus": 1,
                       "priority": 0}


def test_the_id_chain_starts_at_the_job_id_and_is_replaced_whole(tmp_path: Path) -> None:
    assert ids.read_chain(tmp_path, "17") == [17]
    ids.write_chain(tmp_path, "17", [17, 21])
    assert ids.read_chain(tmp_path, "17") == [17, 21]
    assert [p.name for p in tmp_path.iterdir()] == ["17_gpujobd_ids.json"]


def test_outside_a_job_the_environment_is_not_activated(monkeypatch) -> None:
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not environment.GpujobdJobEnvironment().activated()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "gpujobd")
    monkeypatch.setenv("GPUJOB_ID", "21")
    monkeypatch.setenv(ids.ENV_JOB_ID, "17")
    env = environment.GpujobdJobEnvironment()
    assert env.activated() and env.job_id == "17" and env.global_rank == 0 and env.num_tasks == 1


def test_submitits_own_plugin_checks_pass_for_gpujobd() -> None:
    # submitit ships these in its wheel (submitit/core/test_plugins.py), parametrized over every
    # installed plugin; here they are called for gpujobd's parts alone.
    from submitit.core import test_plugins

    test_plugins.test_env(plugins.get_job_environments()["gpujobd"])
    test_plugins.test_executors(GpujobdExecutor)
