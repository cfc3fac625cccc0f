"""The supervisor zygote, end to end as real processes (needs root): what it forks is an ordinary gated
supervisor, and its death costs the jobs it already forked nothing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, List

import pytest

from gpujobd import supervisor
from gpujobd.daemon.spawner import Gate, Zygote
from tests.unit.test_supervisor import needs_root, spec_fields

pytestmark = needs_root


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: List[int] = []
        self.zygote = Zygote(5.0, on_started=self.started.append)

    def spawn(self, job_id: int, argv: List[str]) -> Gate:
        state = self.tmp_path / f"state{job_id}"
        state.mkdir()
        fields = spec_fields(state, job_id=job_id, argv=argv, exit_record=str(state / "exit.json"),
                             runs_file=str(state / "runs"))
        log_fd = os.open(self.tmp_path / f"{job_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            return self.zygote.spawn(fields, log_fd)
        finally:
            os.close(log_fd)

    def record(self, job_id: int, timeout_s: float = 20) -> dict:
        path = self.tmp_path / f"state{job_id}" / "exit.json"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no exit record for job {job_id}; log: {self.log(job_id)!r}")
            time.sleep(0.01)
        return json.loads(path.read_text())

    def log(self, job_id: int) -> str:
        return (self.tmp_path / f"{job_id}.log").read_text()

    def close(self) -> None:
        self.zygote.close()
        for pid in self.started:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


@pytest.fixture
def rig(tmp_path: Path):
    os.chmod(tmp_path, 0o755)
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.005)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def test_forked_supervisor_runs_the_job_only_after_release(rig: Rig) -> None:
    gate = rig.spawn(1, ["sh", "-c", "id -u; echo ran"])
    assert rig.started and gate.pid != rig.started[0]
    assert _parent(gate.pid) == rig.started[0]  # forked by the zygote, not started by us
    # The zygote answers as soon as it has forked; the child then sets itself up behind its gate.
    _wait_until(lambda: os.getsid(gate.pid) == gate.pid)  # its own session, as a spawned supervisor
    _wait_until(lambda: sorted(int(fd) for fd in os.listdir(f"/proc/{gate.pid}/fd")) == [0, 1, 2])
    time.sleep(0.2)
    assert "ran" not in rig.log(1)  # gated: nothing of the job before release
    gate.release()
    record = rig.record(1)
    assert record["reason"] == "exit-code" and record["exit_code"] == 0
    assert rig.log(1).split() == [str(spec_fields(rig.tmp_path)["uid"]), "ran"]


def test_an_aborted_gate_runs_nothing(rig: Rig) -> None:
    gate = rig.spawn(2, ["sh", "-c", "echo ran"])
    gate.abort()
    record = rig.record(2)
    assert record["reason"] == "start-failed" and "ran" not in rig.log(2)


def test_a_killed_zygote_is_replaced_and_its_jobs_live_on(rig: Rig) -> None:
    before = rig.spawn(3, ["sh", "-c", "echo first"])
    first_zygote = rig.started[0]
    os.kill(first_zygote, signal.SIGKILL)
    os.waitpid(first_zygote, 0)
    after = rig.spawn(4, ["sh", "-c", "echo second"])
    assert len(rig.started) == 2 and rig.started[1] != first_zygote
    before.release()
    after.release()
    assert rig.record(3)["exit_code"] == 0 and rig.record(4)["exit_code"] == 0
    assert rig.log(3).strip() == "first" and rig.log(4).strip() == "second"


def test_the_zygote_exits_when_the_daemon_closes_its_end(rig: Rig) -> None:
    rig.spawn(5, ["true"]).abort()
    zygote_pid = rig.started[0]
    rig.zygote.close()
    _, status = os.waitpid(zygote_pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == supervisor.EXIT_RECORDED


def test_the_zygote_reaps_what_it_forks(rig: Rig) -> None:
    gate = rig.spawn(6, ["true"])
    gate.release()
    rig.record(6)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{gate.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not Path(f"/proc/{gate.pid}").exists()  # no zombie left behind by the zygote
