"""How a job ended: one pure function over what the supervisor recorded and what systemd said.

`decide_outcome` is the only place that decides a job's end, live (the scope went while the daemon
watched) and after a restart (reconcile reads the same exit record and runs file), so both give the
same answer. The table "How a job can end" in docs/tuning.md lists every path and what it gives;
tests/unit/test_outcome.py checks each row here, tests/integration/test_endings.py against systemd.

The first question is whether the command ended by itself. The supervisor records the first stop
signal it got (`terminated_by_signal`), how old it was then (`stop_signal_after_s`) and what was
going on (`stop_signal_phase`): a run in progress, a pause between runs, or nothing (the last run had
already ended by itself, so the signal ended nothing of the command). If no signal ended it, its own
end stands whoever asked to stop it afterwards. Otherwise, whoever stopped the scope decides:
`gpujobctl stop` (the store's stopped_by), RuntimeMaxSec= (the supervisor's age at the signal reached
the job's timeout), BindsTo= (the job it is bound to had ended or was ending), or someone else
(`systemctl stop`, a shutdown). A loop stopped between runs has no command of its own end: its last
run's exit code stays in its runs and the loop's outcome carries none.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any, Dict, Mapping, Optional

from gpujobd.shared.model import Outcome
from gpujobd.shared.states import EndReason
from gpujobd.supervisor import PHASE_AFTER_LAST_RUN, PHASE_BETWEEN_RUNS

SCOPE_RESULT_TIMEOUT = "timeout"
SCOPE_RESULT_OOM_KILL = "oom-kill"


def record_float(record: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    if not record:
        return None
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


RECORD_REASONS = {reason.value: reason for reason in EndReason}


def decide_outcome(record: Optional[Mapping[str, Any]], stopped_by: Optional[str],
                   scope_result: Optional[str], bound_job_ending: bool = False,
                   timeout_s: Optional[float] = None) -> Outcome:
    """How a job ended, from its supervisor's exit record (None if it left none), who ran
    `gpujobctl stop` on it, systemd's Result of its scope (None or a default once the scope is
    unloaded), whether the job it is bound to had ended or was ending, and its --timeout. What
    became of its log (truncated at the cap, or not written) is added to the detail."""
    outcome = _decide(record, stopped_by, scope_result, bound_job_ending, timeout_s)
    note = log_note(record)
    if not note:
        return outcome
    return dataclasses.replace(outcome, detail=f"{outcome.detail}; {note}" if outcome.detail else note)


def log_note(record: Optional[Mapping[str, Any]]) -> str:
    """What the supervisor said of the job's log: '' when all of it was written."""
    if not record:
        return ""
    if record.get("log_error"):
        return (f"its log could not be written ({record['log_error']}) after {record.get('log_bytes')} "
                "bytes: output was lost")
    if record.get("log_truncated"):
        return f"its log was truncated at {record.get('log_bytes')} bytes (jobs.log_max_bytes)"
    return ""


def _decide(record: Optional[Mapping[str, Any]], stopped_by: Optional[str], scope_result: Optional[str],
            bound_job_ending: bool, timeout_s: Optional[float]) -> Outcome:
    if record is not None and ended_by_itself(record):
        return _own_end(record, scope_result)
    if stopped_by:
        return _stopped(record, EndReason.STOPPED, f"stopped by {stopped_by}")
    if timeout_s is not None and timed_out(record, scope_result, timeout_s):
        return _stopped(record, EndReason.TIMEOUT, "the job reached its --timeout (RuntimeMaxSec)")
    signalled = record is None or record.get("terminated_by_signal") is not None
    if bound_job_ending and signalled:
        return _stopped(record, EndReason.BOUND_JOB_ENDED, "the job it was bound to ended")
    if record is None or scope_result == SCOPE_RESULT_OOM_KILL:  # OOMPolicy=stop stops the scope too
        return _own_end(record, scope_result)
    if signalled:
        return _stopped(record, EndReason.STOPPED, f"stopped outside gpujobd: the supervisor received "
                        f"{_signal_name(record.get('terminated_by_signal'))} (`systemctl stop`, a kill, "
                        "or the system shutting down)")
    return _own_end(record, scope_result)  # nothing of it ran, and no stop signal said why


def ended_by_itself(record: Mapping[str, Any]) -> bool:
    """The command ran and ended with no stop signal (or the signal came after its last run)."""
    if record.get("reason") == EndReason.START_FAILED.value:
        return False
    return record.get("terminated_by_signal") is None \
        or record.get("stop_signal_phase") == PHASE_AFTER_LAST_RUN


def timed_out(record: Optional[Mapping[str, Any]], scope_result: Optional[str], timeout_s: float) -> bool:
    """RuntimeMaxSec= sent the stop signal. The supervisor starts before its scope is active, so its
    age at that signal is at least the timeout; a stop earlier than that was someone else's. Without
    that age (no record), systemd's Result says it, if the scope could still be read: it also says
    "timeout" when stopping outlasted the stop timeout, which is why the age is asked first."""
    age = record_float(record, "stop_signal_after_s")
    if age is not None:
        return age >= timeout_s
    return scope_result == SCOPE_RESULT_TIMEOUT


def ends_with_its_supervisor(record: Optional[Mapping[str, Any]]) -> bool:
    """The supervisor counted no process of the job left when it wrote `record`: the scope then
    empties, and ends, as the supervisor exits, and a stop would only add a systemd job. A record
    without the count (a supervisor from before it was written, or one that could not count) says
    nothing, and the scope is stopped."""
    return record is not None and record.get("leftovers_counted") is True \
        and record.get("leftover_processes") == 0


def _common(record: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if not record:
        return {"exit_code": None, "signal": None, "leftover_processes": 0}
    return {"exit_code": record.get("exit_code"), "signal": record.get("signal"),
            "leftover_processes": int(record.get("leftover_processes") or 0)}


def _stopped(record: Optional[Mapping[str, Any]], reason: EndReason, detail: str) -> Outcome:
    """A stop from outside. Stopped in a run, the run's end is the job's (killed by SIGTERM, or the
    code it exited with on that signal); stopped between runs, the job ended with no command running:
    the last run's outcome stays in the runs only."""
    common = _common(record)
    if record is not None and record.get("stop_signal_phase") == PHASE_BETWEEN_RUNS:
        detail = f"{detail}, between runs (after run {record.get('runs')}; see its runs)"
        common.update(exit_code=None, signal=None)
    return Outcome(reason, detail=detail, **common)


def _own_end(record: Optional[Mapping[str, Any]], scope_result: Optional[str]) -> Outcome:
    common = _common(record)
    if scope_result == SCOPE_RESULT_OOM_KILL:
        return Outcome(EndReason.OOM_KILL, detail="the kernel's OOM killer acted in the job", **common)
    if record is None:
        return Outcome(EndReason.LOST, detail="the job's scope ended and its supervisor left no exit "
                                              "record (it was killed, or its files were removed)")
    reason = RECORD_REASONS.get(str(record.get("reason")), EndReason.LOST)
    detail = str(record.get("detail") or "")
    if reason is EndReason.LOST:
        detail = f"unreadable exit record: reason {record.get('reason')!r}"
    return Outcome(reason, detail=detail, **common)


def _signal_name(signum: object) -> str:
    try:
        return signal.Signals(signum).name  # type: ignore[arg-type]
    except ValueError:
        return f"signal {signum!r}"
