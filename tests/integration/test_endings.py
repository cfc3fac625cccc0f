"""Every way a foreground job and the loop bound to it can end, and what each records.

One test per row of the table in docs/tuning.md ("How a job can end"): the foreground is stopped,
succeeds, fails or times out; its bound loop is in a run or between runs at that moment; and the
daemon is up, or held down (`systemctl stop gpujobd`) while it happens and started again afterwards,
so that it learns the end from the supervisors' exit records and runs files alone.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Tuple

import pytest

from tests.integration.conftest import processes_matching, scope_pids, sh, wait_for
from tests.integration.test_loops import runs_of

TIMEOUT_S = 4  # the foreground's --timeout in the timed-out rows: long enough to set the scene first
SIGTERM = 15
# What the foreground ends with: (state, reason, exit code) of its record.
FOREGROUND = {
    "stopped": ("stopped", "stopped", None),
    "succeeded": ("succeeded", "exit-code", 0),
    "failed": ("failed", "exit-code", 3),
    "timed-out": ("timed-out", "timeout", None),
}
_markers = itertools.count(5300)  # `sleep 53NN`: no other test sleeps so


@pytest.fixture
def daemon_held_down() -> Iterator[Callable[[], None]]:
    """Call it to stop gpujobd (a clean stop: no restart); it is started again however the test ends."""
    def hold() -> None:
        sh("systemctl", "stop", "gpujobd")
        assert sh("systemctl", "is-active", "gpujobd", check=False).stdout.strip() == "inactive"

    yield hold
    sh("systemctl", "start", "gpujobd")


def _foreground(ctl, ending: str, go_file: Path) -> int:
    """alice's foreground job: it runs until the test ends it the way `ending` names."""
    if ending in ("succeeded", "failed"):
        code = FOREGROUND[ending][2]
        return ctl.submit("alice", "sh", "-c", f"while [ ! -e {go_file} ]; do sleep 0.05; done; exit {code}")
    opts = ["--timeout", str(TIMEOUT_S)] if ending == "timed-out" else []
    return ctl.submit("alice", "sleep", "300", opts=opts)


def _bound_loop(ctl, foreground: int, phase: str, marker: int) -> int:
    """A loop bound to the foreground, left in a run (`mid-run`) or between two runs (`mid-delay`)."""
    bind = ["--background", "--max-runs", "5", "--bind-to", str(foreground)]
    if phase == "mid-run":
        loop = ctl.submit("alice", "sleep", str(marker), opts=[*bind, "--restart-delay", "0.2"])
        wait_for(lambda: processes_matching(f"sleep {marker}"), "the loop's first run to be running")
        return loop
    loop = ctl.submit("alice", "true", opts=[*bind, "--restart-delay", "300"])
    wait_for(lambda: ctl.job("alice", loop)["runs"] == 1, "the loop's first run to end")
    return loop


def _end_foreground(ctl, ending: str, foreground: int, go_file: Path, daemon_up: bool) -> None:
    if ending == "stopped" and daemon_up:
        ctl("alice", "stop", str(foreground), check=True)
    elif ending == "stopped":  # no daemon to ask: what an admin's systemctl or a shutdown does
        sh("systemctl", "stop", f"gpujob-{foreground}.scope")
    elif ending in ("succeeded", "failed"):
        go_file.touch()
    # timed-out: systemd's RuntimeMaxSec= ends it


def _scene(ctl, tmp_dir: Path, ending: str, phase: str) -> Tuple[int, int, Path]:
    go_file = tmp_dir / "go"
    foreground = _foreground(ctl, ending, go_file)
    ctl.wait_state("alice", foreground, "running")
    loop = _bound_loop(ctl, foreground, phase, next(_markers))
    return foreground, loop, go_file


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    path = Path(f"/tmp/gpujobd-endings-{os.getpid()}-{time.monotonic_ns()}")
    path.mkdir(mode=0o755)
    yield path
    sh("rm", "-rf", str(path))


def _check_loop(ctl, loop: int, phase: str) -> Dict:
    record = ctl.wait_state("alice", loop, "stopped", "succeeded", "failed", "lost", "timed-out")
    assert (record["state"], record["reason"]) == ("stopped", "bound-job-ended"), record
    runs = runs_of(loop)
    assert runs and record["runs"] == len(runs), (record, runs)
    if phase == "mid-run":  # the run in progress was ended by the stop: that is the loop's own end
        assert (runs[-1]["reason"], runs[-1]["signal"]) == ("signal", SIGTERM), runs
        assert record["signal"] == SIGTERM, record
    else:  # the last run ended by itself: it stays in the runs, not in the loop's end
        assert [(run["reason"], run["exit_code"]) for run in runs] == [("exit-code", 0)], runs
        assert (record["exit_code"], record["signal"]) == (None, None), record
        assert "between runs" in record["detail"], record
    return record


ROWS = list(itertools.product(FOREGROUND, ("mid-run", "mid-delay"), ("daemon-up", "daemon-down")))


@pytest.mark.parametrize(("ending", "phase", "daemon"), ROWS, ids=["-".join(row) for row in ROWS])
def test_every_ending_records_why(ctl, scratch_dir, daemon_held_down, ending, phase, daemon):
    foreground, loop, go_file = _scene(ctl, scratch_dir, ending, phase)
    daemon_up = daemon == "daemon-up"
    if not daemon_up:
        daemon_held_down()
        # The scene must still be set when the daemon is down, or this row would test the daemon-up path.
        assert scope_pids(f"gpujob-{foreground}.scope") and scope_pids(f"gpujob-{loop}.scope")
    _end_foreground(ctl, ending, foreground, go_file, daemon_up)
    if not daemon_up:
        wait_for(lambda: not scope_pids(f"gpujob-{foreground}.scope")
                 and not scope_pids(f"gpujob-{loop}.scope"), "both scopes to end with no daemon",
                 timeout=TIMEOUT_S + 10)
        sh("systemctl", "start", "gpujobd")
    state, reason, exit_code = FOREGROUND[ending]
    record = ctl.wait_state("alice", foreground, "stopped", "succeeded", "failed", "lost", "timed-out",
                            timeout=TIMEOUT_S + 20)
    assert (record["state"], record["reason"], record["exit_code"]) == (state, reason, exit_code), record
    _check_loop(ctl, loop, phase)


def test_the_loop_of_a_stopped_with_background_pair_is_recorded_bound_job_ended(ctl):
    """The report of issue 17, as a user typed it."""
    done = ctl("alice", "submit", "--max-runs", "100", "--restart-delay", "0.3",
               "--with-background", "sleep 0.5", "--", "sleep", "100", check=True)
    foreground, loop = (int(word) for word in done.stdout.split())
    wait_for(lambda: ctl.job("alice", loop)["runs"] >= 2, "the loop to have run twice")
    ctl("alice", "stop", str(foreground), check=True)
    assert ctl.wait_state("alice", foreground, "stopped", "succeeded", "failed")["reason"] == "stopped"
    record = ctl.wait_state("alice", loop, "stopped", "succeeded", "failed", "lost")
    assert (record["state"], record["reason"]) == ("stopped", "bound-job-ended"), record
    shown = ctl("alice", "status", str(loop), check=True).stdout
    assert "stopped" in shown and "bound-job-ended" in shown, shown


@pytest.mark.parametrize("phase", ["mid-run", "mid-delay"])
def test_a_loop_stopped_outside_gpujobd_while_its_foreground_runs_on_says_so(ctl, scratch_dir, phase):
    foreground, loop, _ = _scene(ctl, scratch_dir, "stopped", phase)
    sh("systemctl", "stop", f"gpujob-{loop}.scope")  # an admin, not BindsTo=: the foreground runs on
    record = ctl.wait_state("alice", loop, "stopped", "succeeded", "failed", "lost", "timed-out")
    assert (record["state"], record["reason"]) == ("stopped", "stopped"), record
    assert "outside gpujobd" in record["detail"], record
    assert ctl.job("alice", foreground)["state"] == "running"
    ctl("alice", "stop", str(foreground), check=True)
    assert ctl.wait_state("alice", foreground, "stopped", "succeeded", "failed")["reason"] == "stopped"
