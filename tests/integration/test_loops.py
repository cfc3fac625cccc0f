"""Background loops, binding, timeouts, and the truth after the daemon is killed mid-run."""

from __future__ import annotations

import json
import os
import random
import signal
import time

from tests.integration.conftest import (
    daemon_pid,
    processes_matching,
    scope_pids,
    sh,
    wait_for,
)

BUSCTL = ["busctl", "--system", "-j", "call", "org.gpujobd1", "/org/gpujobd1", "org.gpujobd1.Manager"]


def runs_of(job_id: int) -> list:
    reply = json.loads(sh(*BUSCTL, "Runs", "tu", str(job_id), "0").stdout)
    return [{key: value["data"] for key, value in run.items()} for run in reply["data"][0]]


def test_a_loop_of_five_runs_stops_at_five_and_records_five_exits(ctl):
    job_id = ctl.submit("alice", "sh", "-c", 'echo "run $GPUJOB_RUN of job $GPUJOB_ID"; exit $GPUJOB_RUN',
                        opts=["--background", "--max-runs", "5", "--restart-delay", "0.1"])
    job = ctl.wait_state("alice", job_id, "failed", "succeeded", timeout=30)
    runs = runs_of(job_id)
    assert [run["run"] for run in runs] == [1, 2, 3, 4, 5]
    assert [run["exit_code"] for run in runs] == [1, 2, 3, 4, 5]
    assert all(run["ended_at"] >= run["started_at"] for run in runs)
    assert (job["runs"], job["max_runs"], job["exit_code"]) == (5, 5, 5)
    log = ctl("alice", "logs", str(job_id), check=True).stdout.splitlines()
    assert log == [f"run {n} of job {job_id}" for n in range(1, 6)]


def wire_of(job_id: int) -> dict:
    reply = json.loads(sh(*BUSCTL, "Get", "t", str(job_id)).stdout)
    return {key: value["data"] for key, value in reply["data"][0].items()}


def test_fields_at_their_default_stay_off_the_wire_and_come_back_in_the_json(ctl):
    plain = ctl.submit("alice", "true")
    loop = ctl.submit("alice", "true", opts=["--background", "--max-runs", "2", "--restart-delay", "0",
                                             "--priority", "-3"])
    for job_id in (plain, loop):
        ctl.wait_state("alice", job_id, "succeeded", timeout=30)
    plain_wire, loop_wire = wire_of(plain), wire_of(loop)
    assert plain_wire["id"] == plain and plain_wire["exit_code"] == 0  # a zero that is set is sent
    assert not {"background", "max_runs", "priority", "after"} & set(plain_wire)
    assert (loop_wire["background"], loop_wire["max_runs"], loop_wire["priority"]) == (True, 2, -3)
    shown = ctl.job("alice", plain)
    assert (shown["background"], shown["max_runs"], shown["priority"], shown["after"]) == (False, 1, 0, [])


def test_stop_on_failure_ends_the_loop_at_the_first_failing_run(ctl):
    job_id = ctl.submit("alice", "sh", "-c", '[ "$GPUJOB_RUN" -lt 3 ]',
                        opts=["--background", "--max-runs", "10", "--restart-delay", "0",
                              "--stop-on-failure"])
    job = ctl.wait_state("alice", job_id, "failed", timeout=30)
    assert [run["exit_code"] for run in runs_of(job_id)] == [0, 0, 1]
    assert job["runs"] == 3


def test_the_loop_cap_is_enforced(ctl):
    too_many = ctl("alice", "submit", "--background", "--max-runs", "1000000", "--", "true")
    assert too_many.returncode == 2 and "jobs.max_runs_limit" in too_many.stderr
    not_background = ctl("alice", "submit", "--max-runs", "3", "--", "true")
    assert not_background.returncode == 2 and "--background" in not_background.stderr


def test_a_bound_loop_stops_within_a_second_of_its_foreground_even_with_the_daemon_dead(ctl):
    foreground = ctl.submit("alice", "sleep", "2")
    background = ctl.submit("alice", "sh", "-c", "setsid sleep 4701 & sleep 4702",
                            opts=["--background", "--max-runs", "3", "--bind-to", str(foreground)])
    ctl.wait_state("alice", background, "running")
    wait_for(lambda: processes_matching("sleep 4701"), "the bound loop to run")
    os.kill(daemon_pid(), signal.SIGKILL)
    sh("systemctl", "stop", "gpujobd")  # keep it down: systemd alone must stop the loop
    fg_unit, bg_unit = f"gpujob-{foreground}.scope", f"gpujob-{background}.scope"
    wait_for(lambda: not scope_pids(fg_unit), "the foreground to end", timeout=10)
    foreground_gone = time.monotonic()
    wait_for(lambda: not scope_pids(bg_unit), "systemd to stop the bound loop", timeout=5)
    assert time.monotonic() - foreground_gone < 1.0
    assert processes_matching("sleep 4701") == [] and processes_matching("sleep 4702") == []
    sh("systemctl", "start", "gpujobd")
    assert ctl.wait_state("alice", foreground, "succeeded")["exit_code"] == 0
    bound = ctl.wait_state("alice", background, "stopped")
    assert bound["reason"] == "bound-job-ended"


def test_binding_needs_a_job_of_your_own_that_has_not_ended(ctl):
    ended = ctl.submit("alice", "true")
    ctl.wait_state("alice", ended, "succeeded")
    refused = ctl("alice", "submit", "--background", "--bind-to", str(ended), "--", "true")
    assert refused.returncode == 2 and "succeeded" in refused.stderr
    theirs = ctl.submit("bob", "sleep", "30")
    denied = ctl("alice", "submit", "--background", "--bind-to", str(theirs), "--", "true")
    assert denied.returncode == 4 and "belongs to bob" in denied.stderr  # permission denied
    ctl("bob", "stop", str(theirs), check=True)


def test_timeout_kills_a_sigterm_ignoring_writer_and_grades_it(ctl):
    noisy = "trap '' TERM; (trap '' TERM; while :; do echo child-{tag}; sleep 0.05; done) & " \
            "while :; do echo parent-{tag}; sleep 0.05; done"
    job_id = ctl.submit("alice", "sh", "-c", noisy.format(tag="T1"), opts=["--timeout", "2"])
    neighbour = ctl.submit("alice", "sh", "-c", "sleep 6; echo neighbour-done")
    job = ctl.wait_state("alice", job_id, "timed-out", timeout=30)
    assert job["reason"] == "timeout" and job["timeout_s"] == 2
    assert 0.95 <= job["timeout_fraction"] <= 1.0
    assert processes_matching("child-T1") == [] and not scope_pids(f"gpujob-{job_id}.scope")
    size = len(ctl("alice", "logs", str(job_id), check=True).stdout)
    time.sleep(0.5)
    assert len(ctl("alice", "logs", str(job_id), check=True).stdout) == size  # nothing writes any more
    ctl.wait_state("alice", neighbour, "succeeded", timeout=30)
    assert ctl("alice", "logs", str(neighbour), check=True).stdout == "neighbour-done\n"


def test_kill_9_during_runs_twenty_times_loses_no_exit_code(ctl):
    seed = int(os.environ.get("GPUJOBD_CRASH_SEED", time.time()))
    rng = random.Random(seed)
    for round_ in range(20):
        expected = {}
        for code in (0, 3, 7):
            job_id = ctl.submit("alice", "sh", "-c", f"sleep {rng.uniform(0.05, 0.8):.2f}; exit {code}")
            expected[job_id] = (code, 1)
        loop = ctl.submit("alice", "sh", "-c", "sleep 0.1; exit $GPUJOB_RUN",
                          opts=["--background", "--max-runs", "3", "--restart-delay", "0.1"])
        expected[loop] = (3, 3)
        time.sleep(rng.uniform(0.0, 0.9))
        # No start limit across 20 crashes: reset before the kill, not after it. After it, systemd may
        # still be stopping the rest of the service's cgroup (the supervisor zygote), and a
        # reset-failed then clears the failure result that makes Restart=on-failure restart it.
        sh("systemctl", "reset-failed", "gpujobd", check=False)
        old = daemon_pid()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda old=old: sh("systemctl", "is-active", "gpujobd", check=False).stdout.strip()
                 == "active" and daemon_pid() not in (0, old), "systemd to restart gpujobd")
        for job_id, (code, runs) in expected.items():
            job = ctl.wait_state("alice", job_id, "succeeded", "failed", "lost", "stopped", timeout=30)
            context = f"seed {seed} round {round_} job {job_id}: {job}"
            assert (job["state"], job["exit_code"], job["runs"]) == (
                "succeeded" if code == 0 else "failed", code, runs), context
        assert not any(scope_pids(f"gpujob-{job_id}.scope") for job_id in expected), seed
