"""The chaos suite (issue 15): every attack that once broke gpujobd, as a case, in the sandbox.

`make chaos` (part of `make test`). A seed drives every random choice; it is printed at the start and
in the final line, and GPUJOBD_CHAOS_SEED=N replays a run. The final line gives the figures: cases
held / run, jobs submitted / recorded with the right end state, processes left, and whether the
daemon kept running through the cases that do not restart it on purpose.
"""
# ruff: noqa: F811  (the integration fixtures are imported, and their names used as parameters)

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures, re-exported)
    Ctl,
    _where,
    ctl,
    gpujobd_service,
    processes_matching,
    sh,
    wait_for,
)

SEED = int(os.environ.get("GPUJOBD_CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))
DROP_IN = Path("/etc/gpujobd/gpujobd.toml.d/50-chaos.toml")
# The limits the cases push against, set as an admin would: a drop-in over the shipped file.
CHAOS_CONFIG = """\
[jobs]
log_max_bytes = 1048576
max_properties = ["TasksMax=4096"]

[limits]
max_active_jobs_per_user = 20
min_free_mib = 8
db_reserve_mib = 4
disk_check_interval_s = 0.5
"""
UNIT_DROP_IN = Path("/run/systemd/system/gpujobd.service.d/50-chaos.conf")
MARKER = "chaos4242"  # in every chaos job's command line: what "processes left" counts


@dataclass
class Figures:
    cases_run: int = 0
    cases_held: int = 0
    jobs_submitted: int = 0
    jobs_right: int = 0
    wrong: List[str] = field(default_factory=list)
    steady_cases: int = 0  # cases that do not restart the daemon on purpose
    steady_kept_pid: int = 0
    kills: int = 0
    crash_loop: str = ""  # the crash loop at scale's own figures

    def job(self, right: bool, what: str) -> None:
        self.jobs_submitted += 1
        self.jobs_right += int(right)
        if not right:
            self.wrong.append(what)


FIGURES = Figures()


def pytest_collection_modifyitems(items):
    if _where() != "sandbox":
        skip = pytest.mark.skip(reason="the chaos suite runs in the sandbox: `make chaos`")
        for item in items:
            if "tests/chaos/" in str(item.fspath):
                item.add_marker(skip)


def pytest_report_header(config):
    return f"chaos seed: {SEED} (replay with GPUJOBD_CHAOS_SEED={SEED})"


def pytest_runtest_logreport(report):
    if "tests/chaos/" not in report.nodeid or report.when != "call":
        return
    FIGURES.cases_run += 1
    FIGURES.cases_held += int(report.passed)


def pytest_terminal_summary(terminalreporter):
    if FIGURES.cases_run == 0:
        return
    left = len(processes_matching(MARKER)) if _where() == "sandbox" else 0
    terminalreporter.write_line(
        f"chaos seed {SEED}: cases held {FIGURES.cases_held}/{FIGURES.cases_run}; jobs submitted "
        f"{FIGURES.jobs_submitted}, recorded with the right end state {FIGURES.jobs_right}; processes "
        f"left {left}; daemon kept its PID through {FIGURES.steady_kept_pid}/{FIGURES.steady_cases} "
        f"cases that do not restart it, and came back after all {FIGURES.kills} kills")
    if FIGURES.crash_loop:
        terminalreporter.write_line(FIGURES.crash_loop)
    for what in FIGURES.wrong[:20]:
        terminalreporter.write_line(f"  wrong: {what}")


@pytest.fixture(scope="session")
def chaos_service(gpujobd_service) -> Iterator[None]:
    """The service under the chaos limits (a config drop-in) and a short RestartSec (a unit drop-in),
    so that the crash loop at scale takes seconds, not minutes."""
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text(CHAOS_CONFIG)
    UNIT_DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    UNIT_DROP_IN.write_text("[Service]\nRestartSec=100ms\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "restart", "gpujobd")
    yield
    DROP_IN.unlink(missing_ok=True)
    UNIT_DROP_IN.unlink(missing_ok=True)
    sh("systemctl", "daemon-reload")


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(f"{SEED}:{request.node.name}")


def daemon_state() -> Dict[str, str]:
    out = sh("systemctl", "show", "gpujobd", "-p", "MainPID", "-p", "ActiveState", "-p", "NRestarts",
             "-p", "Restart", "-p", "StartLimitIntervalUSec", "-p", "RestartUSec").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def daemon_serving(ctl: Ctl) -> bool:
    state = daemon_state()
    return state["ActiveState"] == "active" and ctl("root", "list").returncode == 0


@pytest.fixture
def steady(chaos_service, ctl) -> Iterator[None]:
    """A case that must not take the daemon down: its PID is the same after it."""
    wait_for(lambda: daemon_serving(ctl), "gpujobd to serve")
    before = daemon_state()["MainPID"]
    yield
    FIGURES.steady_cases += 1
    FIGURES.steady_kept_pid += int(daemon_state()["MainPID"] == before)
    assert daemon_state()["MainPID"] == before, "the daemon restarted during a case that should not"


def restart_daemon(ctl: Ctl) -> None:
    sh("systemctl", "restart", "gpujobd")
    wait_for(lambda: daemon_serving(ctl), "gpujobd to serve again")


def gate_dir() -> Path:
    import tempfile

    gate = Path(tempfile.mkdtemp(prefix="chaos-gate-", dir="/tmp"))
    gate.chmod(0o755)
    return gate


def py_as(user: str, code: str, timeout: float = 120) -> str:
    """Run Python as `user` with the installed gpujobd client importable; its stdout."""
    prelude = ("import sys, json; sys.path.insert(0, '/usr/local/lib/gpujobd'); "
               "from gpujobd.client import Client; ")
    done = sh("runuser", "-u", user, "--", "/usr/bin/python3", "-c", prelude + code, check=False,
              timeout=timeout, cwd="/")
    return done.stdout + done.stderr


def wait_final(ctl: Ctl, user: str, job_id: int, timeout: float = 30) -> Dict:
    return ctl.wait_state(user, job_id, "succeeded", "failed", "stopped", "lost", timeout=timeout)


def now() -> float:
    return time.monotonic()
