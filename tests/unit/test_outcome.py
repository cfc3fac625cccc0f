"""decide_outcome, as a table: every way a job can end (docs/tuning.md, "How a job can end")."""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytest

from gpujobd import supervisor
from gpujobd.daemon.outcome import decide_outcome, ends_with_its_supervisor
from gpujobd.shared.model import Job, JobSpec, final_state_for, transition
from gpujobd.shared.states import EndReason, JobState

NOW = 1_750_000_000.0
TIMEOUT = 60.0


def record(reason: str = "exit-code", exit_code: Optional[int] = 0, signal: Optional[int] = None,
           detail: str = "", leftover_processes: Optional[int] = 0, runs: int = 1, max_runs: int = 1,
           terminated: Optional[int] = None, phase: Optional[str] = None, after: Optional[float] = 5.0,
           **extra: Any) -> Dict[str, Any]:
    """An exit record as the supervisor writes it; `terminated` is the stop signal it received."""
    fields = {"job_id": 1, "started_at": NOW, "ended_at": NOW + 1, "reason": reason,
              "exit_code": exit_code, "signal": signal, "detail": detail,
              "leftover_processes": leftover_processes, "runs": runs, "max_runs": max_runs,
              "terminated_by_signal": terminated, "stop_signal_phase": phase,
              "stop_signal_after_s": after if terminated is not None else None}
    fields.update(extra)
    return fields


def in_a_run(after: float = 5.0, exit_code: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    """A stop signal reached the supervisor while a run was in progress; it forwarded it."""
    signal = 15 if exit_code is None else None
    reason = "signal" if exit_code is None else "exit-code"
    return record(reason, exit_code=exit_code, signal=signal, terminated=15, phase="run", after=after,
                  **extra)


def between_runs(after: float = 5.0) -> Dict[str, Any]:
    """A loop's fourth run exited 0; the stop signal came during the restart delay."""
    return record(runs=4, max_runs=100, terminated=15, phase="between-runs", after=after)


STOPPED, BOUND, TIMED_OUT = EndReason.STOPPED, EndReason.BOUND_JOB_ENDED, EndReason.TIMEOUT
NO_RECORD = "no exit record"
OUTSIDE = "stopped outside gpujobd: the supervisor received SIGTERM"
BETWEEN = "between runs (after run 4; see its runs)"

# id, record, stopped_by, scope Result, bound job ending, --timeout
#   -> reason, exit code, signal, leftovers, detail fragment, state
OUTCOMES = [
    # The command ended by itself: its own end, whatever came after.
    ("exit-0", record(), None, "success", False, None,
     (EndReason.EXIT_CODE, 0, None, 0, "", JobState.SUCCEEDED)),
    ("exit-0-scope-unloaded", record(), None, None, False, None,
     (EndReason.EXIT_CODE, 0, None, 0, "", JobState.SUCCEEDED)),
    ("exit-3", record(exit_code=3), None, "success", False, None,
     (EndReason.EXIT_CODE, 3, None, 0, "", JobState.FAILED)),
    ("exit-137-is-not-sigkill", record(exit_code=137), None, "success", False, None,
     (EndReason.EXIT_CODE, 137, None, 0, "", JobState.FAILED)),
    ("killed-by-a-signal-nobody-here-sent", record("signal", exit_code=None, signal=9), None, "success",
     False, None, (EndReason.SIGNAL, None, 9, 0, "", JobState.FAILED)),
    ("a-loop-that-ran-to-its-cap", record(runs=5, max_runs=5), None, "success", False, None,
     (EndReason.EXIT_CODE, 0, None, 0, "", JobState.SUCCEEDED)),
    ("leftovers-counted", record(leftover_processes=3), None, "success", False, None,
     (EndReason.EXIT_CODE, 0, None, 3, "", JobState.SUCCEEDED)),
    ("leftovers-unknown", record(leftover_processes=None, detail="leftover count unavailable"), None,
     "success", False, None,
     (EndReason.EXIT_CODE, 0, None, 0, "leftover count unavailable", JobState.SUCCEEDED)),
    ("leftovers-outlived-the-stop-timeout", record(leftover_processes=1), None, "timeout", False, TIMEOUT,
     (EndReason.EXIT_CODE, 0, None, 1, "", JobState.SUCCEEDED)),
    ("exec-failed", record("exec-failed", exit_code=127, detail="pyhton: not found"), None, "success",
     False, None, (EndReason.EXEC_FAILED, 127, None, 0, "pyhton: not found", JobState.FAILED)),
    ("chdir-failed", record("chdir-failed", exit_code=None, detail="/root: Permission denied"), None,
     "success", False, None, (EndReason.CHDIR_FAILED, None, None, 0, "Permission denied", JobState.FAILED)),
    ("setup-failed", record("setup-failed", exit_code=None), None, "success", False, None,
     (EndReason.SETUP_FAILED, None, None, 0, "", JobState.FAILED)),
    ("start-failed-gate-closed", record("start-failed", exit_code=None, runs=0, detail="gate closed"),
     None, None, False, None, (EndReason.START_FAILED, None, None, 0, "gate closed", JobState.FAILED)),
    ("a-stop-after-the-command-ended", record(), "alice", "success", False, None,
     (EndReason.EXIT_CODE, 0, None, 0, "", JobState.SUCCEEDED)),
    ("a-stop-signal-after-the-last-run", record(exit_code=3, terminated=15, phase="after-last-run"),
     "alice", "success", False, None, (EndReason.EXIT_CODE, 3, None, 0, "", JobState.FAILED)),
    ("a-bound-loop-done-before-its-foreground", record(runs=5, max_runs=5), None, "success", True, None,
     (EndReason.EXIT_CODE, 0, None, 0, "", JobState.SUCCEEDED)),
    # gpujobctl stop.
    ("stopped-in-a-run", in_a_run(), "alice", "success", False, None,
     (STOPPED, None, 15, 0, "stopped by alice", JobState.STOPPED)),
    ("stopped-in-a-run-exit-code-kept", in_a_run(exit_code=143), "alice", "success", False, None,
     (STOPPED, 143, None, 0, "stopped by alice", JobState.STOPPED)),
    ("stopped-between-runs", between_runs(), "alice", "success", False, None,
     (STOPPED, None, None, 0, f"stopped by alice, {BETWEEN}", JobState.STOPPED)),
    ("stopped-without-record", None, "root", None, False, None,
     (STOPPED, None, None, 0, "stopped by root", JobState.STOPPED)),
    ("stopped-before-release", record("start-failed", exit_code=None, runs=0, terminated=15), "alice",
     None, False, None, (STOPPED, None, None, 0, "stopped by alice", JobState.STOPPED)),
    ("stopped-while-starting", record("start-failed", exit_code=None, runs=0), "alice", None, False, None,
     (STOPPED, None, None, 0, "stopped by alice", JobState.STOPPED)),
    ("stop-beats-timeout", in_a_run(after=TIMEOUT + 1), "alice", "timeout", False, TIMEOUT,
     (STOPPED, None, 15, 0, "stopped by alice", JobState.STOPPED)),
    ("stop-beats-oom", in_a_run(), "alice", "oom-kill", False, None,
     (STOPPED, None, 15, 0, "stopped by alice", JobState.STOPPED)),
    ("stop-beats-bound", between_runs(), "alice", "success", True, None,
     (STOPPED, None, None, 0, "stopped by alice", JobState.STOPPED)),
    # RuntimeMaxSec=: the supervisor's age at the signal says it, live or learnt after a restart.
    ("timeout-in-a-run", in_a_run(after=TIMEOUT + 0.02), None, "timeout", False, TIMEOUT,
     (TIMED_OUT, None, 15, 0, "--timeout", JobState.TIMED_OUT)),
    ("timeout-scope-unloaded", in_a_run(after=TIMEOUT), None, None, False, TIMEOUT,
     (TIMED_OUT, None, 15, 0, "--timeout", JobState.TIMED_OUT)),
    ("timeout-between-runs", between_runs(after=TIMEOUT + 0.5), None, None, False, TIMEOUT,
     (TIMED_OUT, None, None, 0, BETWEEN, JobState.TIMED_OUT)),
    ("timeout-of-a-bound-loop-before-its-foreground-ended", in_a_run(after=TIMEOUT + 1), None, None, True,
     TIMEOUT, (TIMED_OUT, None, 15, 0, "--timeout", JobState.TIMED_OUT)),
    ("timeout-without-record", None, None, "timeout", False, TIMEOUT,
     (TIMED_OUT, None, None, 0, "--timeout", JobState.TIMED_OUT)),
    ("timeout-record-without-age", in_a_run(after=None), None, "timeout", False, TIMEOUT,
     (TIMED_OUT, None, 15, 0, "--timeout", JobState.TIMED_OUT)),
    ("a-stop-before-the-timeout-that-outlasted-the-stop-timeout", in_a_run(after=TIMEOUT - 1), None,
     "timeout", False, TIMEOUT, (STOPPED, None, 15, 0, OUTSIDE, JobState.STOPPED)),
    ("scope-timeout-result-without-a-timeout", in_a_run(), None, "timeout", False, None,
     (STOPPED, None, 15, 0, OUTSIDE, JobState.STOPPED)),
    # BindsTo=: the job it is bound to ended, or is ending (After= stops this one first).
    ("bound-in-a-run", in_a_run(), None, "success", True, None,
     (BOUND, None, 15, 0, "the job it was bound to ended", JobState.STOPPED)),
    ("bound-between-runs", between_runs(), None, "success", True, None,
     (BOUND, None, None, 0, BETWEEN, JobState.STOPPED)),
    ("bound-scope-unloaded", between_runs(), None, None, True, TIMEOUT,
     (BOUND, None, None, 0, BETWEEN, JobState.STOPPED)),
    ("bound-without-record", None, None, None, True, None,
     (BOUND, None, None, 0, "the job it was bound to ended", JobState.STOPPED)),
    ("bound-before-release", record("start-failed", exit_code=None, runs=0, terminated=15), None, None,
     True, None, (BOUND, None, None, 0, "the job it was bound to ended", JobState.STOPPED)),
    # Someone else: systemctl stop, a kill of the supervisor, the system shutting down.
    ("stopped-outside-in-a-run", in_a_run(), None, "success", False, None,
     (STOPPED, None, 15, 0, OUTSIDE, JobState.STOPPED)),
    ("stopped-outside-between-runs", between_runs(), None, None, False, TIMEOUT,
     (STOPPED, None, None, 0, BETWEEN, JobState.STOPPED)),
    ("stopped-outside-by-sighup", record("signal", exit_code=None, signal=1, terminated=1, phase="run"),
     None, None, False, None, (STOPPED, None, 1, 0, "received SIGHUP", JobState.STOPPED)),
    # The OOM killer.
    ("oom-kill", record("signal", exit_code=None, signal=9), None, "oom-kill", False, None,
     (EndReason.OOM_KILL, None, 9, 0, "OOM killer", JobState.FAILED)),
    ("oom-kill-then-oom-policy-stop", in_a_run(), None, "oom-kill", False, None,
     (EndReason.OOM_KILL, None, 15, 0, "OOM killer", JobState.FAILED)),
    ("oom-kill-without-record", None, None, "oom-kill", False, None,
     (EndReason.OOM_KILL, None, None, 0, "OOM killer", JobState.FAILED)),
    # Nothing says how it ended.
    ("no-record", None, None, None, False, None,
     (EndReason.LOST, None, None, 0, NO_RECORD, JobState.LOST)),
    ("no-record-scope-success", None, None, "success", False, TIMEOUT,
     (EndReason.LOST, None, None, 0, NO_RECORD, JobState.LOST)),
    ("no-record-scope-resources", None, None, "resources", False, None,
     (EndReason.LOST, None, None, 0, NO_RECORD, JobState.LOST)),
    ("unknown-reason", record("from-the-future"), None, "success", False, None,
     (EndReason.LOST, 0, None, 0, "unreadable exit record: reason 'from-the-future'", JobState.LOST)),
    ("missing-reason", {"job_id": 1, "exit_code": 0}, None, "success", False, None,
     (EndReason.LOST, 0, None, 0, "unreadable exit record: reason None", JobState.LOST)),
    ("empty-record", {}, None, None, False, None,
     (EndReason.LOST, None, None, 0, "unreadable exit record", JobState.LOST)),
]


@pytest.mark.parametrize(("record_", "stopped_by", "scope_result", "bound", "timeout_s", "expected"),
                         [row[1:] for row in OUTCOMES], ids=[row[0] for row in OUTCOMES])
def test_decide_outcome(record_: Optional[Dict[str, Any]], stopped_by: Optional[str],
                        scope_result: Optional[str], bound: bool, timeout_s: Optional[float],
                        expected: tuple) -> None:
    reason, exit_code, signal, leftovers, detail, state = expected
    outcome = decide_outcome(record_, stopped_by, scope_result, bound, timeout_s)
    assert (outcome.reason, outcome.exit_code, outcome.signal, outcome.leftover_processes) == (
        reason, exit_code, signal, leftovers)
    assert detail in outcome.detail
    assert final_state_for(outcome) is state
    assert outcome.succeeded is (state is JobState.SUCCEEDED)
    # Whatever it decides, a running job can end with it.
    running = Job(id=1, user="u", uid=1, gid=1, spec=JobSpec(argv=("x",), cwd="/"), state=JobState.RUNNING,
                  created_at=NOW, unit="gpujob-1.scope", started_at=NOW)
    assert transition(running, state, outcome=outcome, ended_at=NOW + 1).state is state


LIVE_RESULTS = ("success", "timeout", "failed")


@pytest.mark.parametrize("record_", [in_a_run(), in_a_run(after=TIMEOUT + 1), between_runs(),
                                     between_runs(after=TIMEOUT + 1), record(), record(exit_code=2)],
                         ids=["in-a-run", "timeout-in-a-run", "between-runs", "timeout-between-runs",
                              "exit-0", "exit-2"])
@pytest.mark.parametrize("bound", [False, True])
def test_the_daemon_learning_it_on_restart_decides_as_it_would_have_live(
        record_: Dict[str, Any], bound: bool) -> None:
    """Live, systemd's Result of the scope is read; after a restart the scope is unloaded and its
    Result is gone. A record from a supervisor carries what decides, so the answers are the same
    (but for an OOM kill, which only systemd saw)."""
    after_restart = decide_outcome(record_, None, None, bound, TIMEOUT)
    for result in LIVE_RESULTS:
        assert decide_outcome(record_, None, result, bound, TIMEOUT) == after_restart, result


def test_the_record_phases_are_the_supervisors() -> None:
    assert (supervisor.PHASE_RUN, supervisor.PHASE_BETWEEN_RUNS, supervisor.PHASE_AFTER_LAST_RUN) == (
        "run", "between-runs", "after-last-run")


def _record(leftovers: int, counted: bool) -> Dict[str, Any]:
    """An exit record as the supervisor writes one (test_supervisor checks the program against it)."""
    return {"job_id": 7, "started_at": 10.0, "ended_at": 12.0, "exit_code": 0, "signal": None,
            "reason": "exit-code", "detail": "exited with code 0", "leftover_processes": leftovers,
            "leftovers_counted": counted, "runs": 1, "max_runs": 1, "terminated_by_signal": None,
            "stop_signal_phase": None, "stop_signal_after_s": None}


@pytest.mark.parametrize(("leftovers", "counted", "ends"),
                         [(0, True, True), (2, True, False), (0, False, False)])
def test_a_job_ends_with_its_supervisor_only_when_it_counted_no_leftover(
        leftovers: int, counted: bool, ends: bool) -> None:
    assert ends_with_its_supervisor(_record(leftovers, counted)) is ends


def test_no_record_or_one_without_the_count_does_not_end_with_its_supervisor() -> None:
    assert not ends_with_its_supervisor(None)
    assert not ends_with_its_supervisor({"job_id": 1, "leftover_processes": 0})  # an older supervisor's
