"""Retention: ended jobs older than `retention.keep_days` lose their record, runs and log.

The daemon prunes at start and every `retention.interval_s` when retention.keep_days is set; an admin
prunes now with `gpujobctl prune` (the Prune method). A job that is not final is never pruned: the
store deletes only final rows, and a log is removed only after its row went.
"""

from __future__ import annotations

from typing import Callable, List, Protocol, Sequence

from gpujobd.daemon.ports import SchedulerPort
from gpujobd.shared.config import Config
from gpujobd.shared.log import get_logger

log = get_logger()
DAY_S = 86400.0
PRUNE_BATCH = 500  # rows per transaction: the main loop is never held long


class RetentionStore(Protocol):
    def prunable_job_ids(self, ended_before: float, limit: int) -> List[int]: ...

    def delete_jobs(self, job_ids: Sequence[int]) -> int: ...


class RetentionFiles(Protocol):
    def remove_log(self, job_id: int) -> bool: ...

    def discard_records(self, job_id: int) -> None: ...


def prune(store: RetentionStore, files: RetentionFiles, ended_before: float) -> int:
    """Delete every final job that ended before `ended_before`, and its files; how many."""
    total = 0
    while True:
        ids = store.prunable_job_ids(ended_before, PRUNE_BATCH)
        if not ids:
            break
        store.delete_jobs(ids)
        for job_id in ids:
            files.remove_log(job_id)
            files.discard_records(job_id)
        total += len(ids)
        if len(ids) < PRUNE_BATCH:
            break
    return total


def schedule(config: Config, store: RetentionStore, files: RetentionFiles, scheduler: SchedulerPort,
             clock: Callable[[], float]) -> None:
    """Prune now and every retention.interval_s, when retention.keep_days is set."""
    days = config.retention.keep_days
    if not days:
        return

    def tick() -> None:
        pruned = prune(store, files, clock() - days * DAY_S)
        if pruned:
            log.info("retention.pruned", jobs=pruned, older_than_days=days)
        scheduler.call_later(config.retention.interval_s, tick)
    tick()
