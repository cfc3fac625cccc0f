"""The store's row codec: a Job as the values of its row, and a row back as a Job. Pure (no sqlite3:
a row is anything indexable by column name), so the store keeps only SQL and transactions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Tuple

from gpujobd.shared import errors
from gpujobd.shared.model import Job, JobSpec, Outcome
from gpujobd.shared.states import EndReason, JobState


class Row(Protocol):
    def __getitem__(self, column: str) -> Any: ...

    def keys(self) -> Any: ...


def decode_job(row: Row, path: Path) -> Job:
    """A jobs row as a Job; a row this code cannot read raises Internal naming it and the file."""
    job_id = row["id"]
    spec = JobSpec(
        argv=tuple(_json(row, "argv", list, path)),
        cwd=row["cwd"],
        env=_json(row, "env", dict, path),
        name=row["name"],
        properties=_json(row, "properties", dict, path),
        timeout_s=row["timeout_s"],
        background=bool(row["background"]),
        max_runs=row["max_runs"] if row["background"] else None,
        restart_delay_s=row["restart_delay_s"],
        stop_on_failure=bool(row["stop_on_failure"]),
        bind_to=row["bind_to"],
        gpus=row["gpus_requested"],
        priority=row["priority"],
        after=tuple(_json(row, "after_ok", list, path)),
        after_any=tuple(_json(row, "after_any", list, path)),
        array=row["array_spec"],
        stagger_s=row["stagger_s"],
        gpu_check=row["gpu_check"],
    )
    return Job(
        id=job_id, user=row["user"], uid=row["uid"], gid=row["gid"], spec=spec,
        state=_enum(JobState, row["state"], f"job {job_id}", "state", path),
        created_at=row["created_at"], unit=row["unit"], pid=row["pid"],
        started_at=row["started_at"], ended_at=row["ended_at"],
        outcome=_decode_outcome(row, path), stopped_by=row["stopped_by"],
        runs_done=row["runs_done"], gpus=tuple(_json(row, "gpus", list, path)),
        array_id=row["array_id"], array_index=row["array_index"], resubmit_of=row["resubmit_of"],
    )

def _decode_outcome(row: Row, path: Path) -> Optional[Outcome]:
    if row["reason"] is None:
        return None
    return Outcome(
        reason=_enum(EndReason, row["reason"], f"job {row['id']}", "end reason", path),
        exit_code=row["exit_code"],
        signal=row["signal"],
        detail=row["detail"] or "",
        leftover_processes=row["leftover_processes"] or 0,
    )

def decode_run(row: Row, path: Path) -> Dict[str, Any]:
    run = {key: row[key] for key in row.keys()}  # noqa: SIM118 (sqlite3.Row iterates values)
    if run["reason"] is not None:
        what = f"run {run['run']} of job {run['job_id']}"
        run["reason"] = _enum(EndReason, run["reason"], what, "end reason", path)
    return run

def _enum(enum_type: Any, value: Any, what: str, field: str, path: Path) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        raise errors.Internal(
            f"{what} in the job database {path} has an unknown {field} {value!r}: the file was"
            " written by a newer gpujobd or edited by hand; install the newer gpujobd or fix the row"
        ) from None

def _json(row: Row, column: str, expected: type, path: Path) -> Any:
    try:
        value = json.loads(row[column])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, expected):
        raise errors.Internal(
            f"job {row['id']} in the job database {path} has a malformed {column} column"
            f" ({row[column]!r}); fix or delete the row"
        )
    return value


def job_values(job: Job) -> Tuple[Any, ...]:
    """The store_sql.JOB_COLUMNS values of a job, in order."""
    outcome = job.outcome
    return (
        job.user, job.uid, job.gid, job.spec.name, _to_json(list(job.spec.argv)), job.spec.cwd,
        _to_json(dict(job.spec.env)), _to_json(dict(job.spec.properties)), job.spec.timeout_s,
        job.state.value, job.unit, job.pid, job.created_at, job.started_at, job.ended_at,
        outcome.reason.value if outcome else None,
        outcome.exit_code if outcome else None,
        outcome.signal if outcome else None,
        outcome.detail if outcome else None,
        outcome.leftover_processes if outcome else None,
        job.stopped_by, int(job.spec.background), job.spec.max_runs or 1, job.spec.restart_delay_s,
        int(job.spec.stop_on_failure), job.spec.bind_to, job.spec.gpus, job.spec.priority,
        _to_json(list(job.spec.after)), _to_json(list(job.spec.after_any)), job.spec.array,
        job.spec.stagger_s, job.array_id, job.array_index, _to_json(list(job.gpus)), job.resubmit_of,
        job.spec.gpu_check,
    )


def _to_json(value: Any) -> str:
    # ASCII escapes keep surrogate-escaped bytes (non-UTF-8 arguments) storable and lossless.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))
