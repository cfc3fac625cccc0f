"""What protects the daemon itself at submit: a cap on each user's active jobs and a disk reserve.

Distinct from scheduling (which makes jobs wait): these refuse a submit outright, with an error that
names the limit and its config key. Pure functions of what the manager read; no side effects.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol

from gpujobd.shared.config import LimitsConfig
from gpujobd.shared.errors import Refused

MIB = 1 << 20


def check_active_jobs(user: str, active: int, limits: LimitsConfig) -> None:
    """Refused when the user already has the most active jobs allowed."""
    cap = limits.max_active_jobs_per_user
    if cap and active >= cap:
        raise Refused(f"{user} has {active} jobs queued or running, this server's cap "
                      f"(limits.max_active_jobs_per_user = {cap}); wait for some to end or stop some "
                      "(gpujobctl list --user " + user + "), then submit again")


def check_free_space(free: Mapping[str, int], limits: LimitsConfig) -> None:
    """Refused while the log or state filesystem has less free space than the reserve."""
    problem = low_space(free, limits)
    if problem is not None:
        raise Refused(f"{problem}: new jobs are refused until an administrator frees space "
                      "(running jobs go on and their ends are recorded)")


RESERVE_RELEASE_BELOW = 1 * MIB  # free bytes on the state filesystem under which the reserve goes


class Reserve(Protocol):
    def keep_reserve(self, size: int) -> bool: ...

    def release_reserve(self) -> bool: ...


def guard_reserve(state_free: int, reserve: Reserve, limits: LimitsConfig) -> Optional[str]:
    """Give the reserve up when the state filesystem is (nearly) full, so that supervisors can write
    their exit records and the daemon its rows; take it again once there is room. What was done."""
    if state_free < RESERVE_RELEASE_BELOW:
        return "released" if reserve.release_reserve() else None
    if state_free >= limits.min_free_mib * MIB + (limits.db_reserve_mib * MIB):
        reserve.keep_reserve(limits.db_reserve_mib * MIB)
    return None


def low_space(free: Mapping[str, int], limits: LimitsConfig) -> Optional[str]:
    reserve = limits.min_free_mib * MIB
    low = {path: size for path, size in free.items() if size < reserve}
    if not low:
        return None
    shown = ", ".join(f"{path} has {size // MIB} MiB free" for path, size in sorted(low.items()))
    return f"{shown}, below this server's reserve of {limits.min_free_mib} MiB (limits.min_free_mib)"
