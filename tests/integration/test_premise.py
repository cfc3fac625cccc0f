"""The premise gpujobd stands on, shown with pystemd alone: a transient scope, created race-free,
owns every descendant of the process put into it, and stopping it leaves nothing behind."""

from __future__ import annotations

import os
import subprocess

from pystemd.systemd1 import Manager, Unit

from tests.integration.conftest import processes_matching, scope_pids, wait_for

UNIT = "premise-test.scope"
CHILD = (
    "read go; "  # the gate: nothing runs until the scope is active
    "setsid sleep 4901 & "
    "(sleep 4902 &); "  # double fork
    "sh -c 'sleep 4903 & exec sleep 4904' & "
    "exec sleep 4905"
)


def _active_state(unit: Unit) -> bytes:
    unit.load(force=True)
    return unit.Unit.ActiveState


def test_scope_owns_setsid_and_double_forked_descendants(tmp_path):
    child = subprocess.Popen(["sh", "-c", CHILD], stdin=subprocess.PIPE)
    manager = Manager()
    manager.load()
    manager.Manager.StartTransientUnit(
        UNIT.encode(), b"fail",
        {b"Description": b"premise test", b"Slice": b"gpujob.slice",
         b"_custom": (b"PIDs", b"au", [child.pid])},
    )
    unit = Unit(UNIT.encode())
    wait_for(lambda: _active_state(unit) == b"active", "the scope to become active")
    child.stdin.write(b"go\n")  # released only now: every fork below happens inside the scope
    child.stdin.close()
    markers = ("sleep 4901", "sleep 4902", "sleep 4903", "sleep 4904", "sleep 4905")
    wait_for(lambda: all(_running_as(marker) for marker in markers), "every descendant to start")
    pids = scope_pids(UNIT)
    for marker in markers:
        found = processes_matching(marker)
        assert _running_as(marker), f"{marker} is not running: nothing to check"
        assert set(found) <= set(pids), f"{marker} escaped the scope"
    manager.Manager.StopUnit(UNIT.encode(), b"replace")
    child.wait(timeout=10)
    wait_for(lambda: scope_pids(UNIT) == [], "the scope to empty")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    for marker in markers:
        assert processes_matching(marker) == [], marker


def _running_as(command: str) -> list:
    """PIDs whose whole command line is `command` (not a shell that still holds it in its script)."""
    return [pid for pid in processes_matching(command) if _cmdline(pid) == command]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            return source.read().rstrip(b"\0").replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
