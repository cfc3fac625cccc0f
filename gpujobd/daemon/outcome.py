"""How a job ended: one pure function over what the supervisor recorded and what systemd said."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from gpujobd.shared.model import EndReason, Outcome


def record_float(record: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    if not record:
        return None
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


RECORD_REASONS = {reason.value: reason for reason in EndReason}



def decide_outcome(record: Optional[Mapping[str, Any]], stopped_by: Optional[str],
                   scope_result: Optional[str], bound_job_ended: bool = False,
                   had_timeout: bool = True) -> Outcome:
    """How a job ended, from its supervisor's record, who stopped it, systemd's scope result and
    whether the job it was bound to has ended."""
    exit_code = record.get("exit_code") if record else None
    signal = record.get("signal") if record else None
    leftovers = int(record.get("leftover_processes") or 0) if record else 0
    detail = str(record.get("detail") or "") if record else ""
    common: Dict[str, Any] = {"exit_code": exit_code, "signal": signal, "leftover_processes": leftovers}
    killed_from_outside = record is None or record.get("terminated_by_signal") is not None
    if stopped_by:
        return Outcome(EndReason.STOPPED, detail=f"stopped by {stopped_by}", **common)
    # systemd also says "timeout" when stopping took longer than the stop timeout (leftovers that
    # ignore SIGTERM after the command itself ended): that is not the job's --timeout.
    if scope_result == "timeout" and had_timeout and killed_from_outside:
        return Outcome(EndReason.TIMEOUT, detail="the job reached its --timeout (RuntimeMaxSec)",
                       **common)
    if bound_job_ended and killed_from_outside:
        return Outcome(EndReason.BOUND_JOB_ENDED, detail="the job it was bound to ended", **common)
    if scope_result == "oom-kill":
        return Outcome(EndReason.OOM_KILL, detail="the kernel's OOM killer acted in the job", **common)
    if record is None:
        return Outcome(EndReason.LOST, detail="the job's scope ended and its supervisor left no exit "
                                              "record (it was killed, or its files were removed)")
    reason = RECORD_REASONS.get(str(record.get("reason")), EndReason.LOST)
    if reason is EndReason.LOST:
        detail = f"unreadable exit record: reason {record.get('reason')!r}"
    return Outcome(reason, detail=detail, **common)
