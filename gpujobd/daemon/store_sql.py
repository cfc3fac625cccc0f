"""The job table's SQL, as text: its columns, the statements that read and write a job, and the
queries of `list`'s two views. No connection here: gpujobd.daemon.store runs them."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from gpujobd.shared.states import JobState

NON_FINAL_STATES: Tuple[JobState, ...] = tuple(state for state in JobState if not state.is_final)
NON_FINAL_VALUES: Tuple[str, ...] = tuple(state.value for state in NON_FINAL_STATES)
NON_FINAL_PLACEHOLDERS = ", ".join("?" * len(NON_FINAL_VALUES))

# Columns that mirror the model (everything but id).
JOB_COLUMNS: Tuple[str, ...] = (
    "user", "uid", "gid", "name", "argv", "cwd", "env", "properties", "timeout_s", "state", "unit",
    "pid", "created_at", "started_at", "ended_at", "reason", "exit_code", "signal", "detail",
    "leftover_processes", "stopped_by", "background", "max_runs", "restart_delay_s",
    "stop_on_failure", "bind_to", "gpus_requested", "priority", "after_ok", "after_any", "array_spec",
    "stagger_s", "array_id", "array_index", "gpus", "resubmit_of", "gpu_check",
)
# runs_done is counted, not stored: one primary-key range lookup in runs per job read.
SELECT_JOBS = (
    "SELECT id, " + ", ".join(JOB_COLUMNS)
    + ", (SELECT count(*) FROM runs WHERE runs.job_id = jobs.id) AS runs_done FROM jobs"
)
INSERT_JOB = (
    f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})"
)
UPDATE_JOB = "UPDATE jobs SET " + ", ".join(f"{column} = ?" for column in JOB_COLUMNS) + " WHERE id = ?"


def filters(user: Optional[str], state: Optional[JobState]) -> Tuple[List[str], List[Any]]:
    clauses: List[str] = []
    params: List[Any] = []
    if user is not None:
        clauses.append("user = ?")
        params.append(user)
    if state is not None:
        clauses.append("state = ?")
        params.append(JobState(state).value)
    return clauses, params


def _and(clauses: List[str]) -> str:
    return "".join(f" AND {clause}" for clause in clauses)


def all_view(filters: List[str], params: List[Any], after_id: Optional[int],
              limit: int) -> Tuple[str, List[Any]]:
    """Every job: the first `limit` after `after_id`, or without it the newest `limit`."""
    if after_id is not None:
        sql = f"{SELECT_JOBS} WHERE id > ?{_and(filters)} ORDER BY id LIMIT ?"
        return sql, [after_id, *params, limit]
    newest_first = f"{SELECT_JOBS} WHERE 1{_and(filters)} ORDER BY id DESC LIMIT ?"
    return f"SELECT * FROM ({newest_first}) ORDER BY id", [*params, limit]


def default_view(filters: List[str], params: List[Any], ended_since: Optional[float],
                  after_id: Optional[int], limit: int) -> Tuple[str, List[Any]]:
    """Active jobs + jobs ended since `ended_since`, found through the state and ended_at indexes.

    The candidate ids come from two index searches (never a scan of jobs); rows are then fetched by
    rowid and the remaining filters applied to those few rows only.
    """
    after = " AND id > ?" if after_id is not None else ""
    after_params: List[Any] = [after_id] if after_id is not None else []
    candidates = f"SELECT id FROM jobs WHERE state IN ({NON_FINAL_PLACEHOLDERS}){after}"
    candidate_params: List[Any] = [*NON_FINAL_VALUES, *after_params]
    if ended_since is not None:
        candidates += f" UNION ALL SELECT id FROM jobs WHERE ended_at >= ?{after}"
        candidate_params += [ended_since, *after_params]
    # Without after_id, the newest `limit` (newest first: list_jobs turns them around).
    order = "id" if after_id is not None else "id DESC"
    sql = f"{SELECT_JOBS} WHERE id IN ({candidates}){_and(filters)} ORDER BY {order} LIMIT ?"
    return sql, [*candidate_params, *params, limit]
