"""The supervisor zygote, end to end as real processes (needs root): what it forks is an ordinary gated
supervisor, and its death costs the jobs it already forked nothing."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from gpujobd import supervisor
from gpujobd.daemon.spawner import Gate
from gpujobd.daemon.zygote import Zygote
from tests.unit.test_supervisor import needs_root, spec_fields

pytestmark = needs_root


class Loop:
    """The main loop's part, by hand: fd watches and timers, run by `run_until`."""

    def __init__(self) -> None:
        self.watches: List[List[Any]] = []  # [fd, callback, live]: a new watch may reuse a closed fd
        self.timers: List[List[Any]] = []  # [deadline, callback, live]

    def watch_readable(self, fd: int, callback: Callable[[], bool]) -> Callable[[], None]:
        watch = [fd, callback, True]
        self.watches.append(watch)
        return lambda: watch.__setitem__(2, False)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]:
        timer = [time.monotonic() + seconds, callback, True]
        self.timers.append(timer)
        return lambda: timer.__setitem__(2, False)

    def run_until(self, condition: Callable[[], bool], timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("the condition never held")
            self.watches = [watch for watch in self.watches if watch[2]]
            readable, _, _ = select.select([watch[0] for watch in self.watches], [], [], 0.01)
            for watch in [w for w in self.watches if w[0] in readable]:
                if watch[2] and not watch[1]():
                    watch[2] = False
            for timer in [t for t in self.timers if t[2] and t[0] <= time.monotonic()]:
                timer[2] = False
                timer[1]()


class Rig:
    def __init__(self, tmp_path: Path, timeout_s: float = 5.0) -> None:
        self.tmp_path = tmp_path
        self.started: List[int] = []
        self.loop = Loop()
        self.zygote = Zygote(timeout_s, on_started=self.started.append,
                             watch_readable=self.loop.watch_readable, call_later=self.loop.call_later)
        self.gates: Dict[int, Gate] = {}
        self.errors: Dict[int, str] = {}

    def ask(self, job_id: int, argv: List[str]) -> None:
        """Ask for job_id's supervisor; its gate (or error) arrives while the loop runs."""
        state = self.tmp_path / f"state{job_id}"
        state.mkdir()
        fields = spec_fields(state, job_id=job_id, argv=argv, exit_record=str(state / "exit.json"),
                             runs_file=str(state / "runs"))
        log_fd = os.open(self.tmp_path / f"{job_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.zygote.spawn(fields, log_fd, lambda gate: self.gates.__setitem__(job_id, gate),
                              lambda error: self.errors.__setitem__(job_id, error))
        finally:
            os.close(log_fd)

    def spawn(self, job_id: int, argv: List[str]) -> Gate:
        self.ask(job_id, argv)
        self.loop.run_until(lambda: job_id in self.gates or job_id in self.errors)
        assert job_id not in self.errors, self.errors[job_id]
        return self.gates[job_id]

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


def _only_its_own_fds(pid: int, log: Path) -> bool:
    """A gated supervisor holds the gate (fd 0), its log pump's pipe (fds 1 and 2 its write end, and
    its read end) and the log itself: nothing of the zygote's (its sockets, the fds it received)."""
    if len(os.listdir(f"/proc/{pid}/task")) != 2:
        return False  # the log pump's thread is not up yet: the supervisor is still setting up
    targets = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    pump = targets[1]
    rest = sorted(target for fd, target in targets.items() if fd > 2)
    return (targets[0].startswith("pipe:") and pump.startswith("pipe:") and targets[2] == pump
            and targets[0] != pump and rest == sorted([pump, str(log)]))


def test_forked_supervisor_runs_the_job_only_after_release(rig: Rig) -> None:
    gate = rig.spawn(1, ["sh", "-c", "id -u; echo ran"])
    assert rig.started and gate.pid != rig.started[0]
    assert _parent(gate.pid) == rig.started[0]  # forked by the zygote, not started by us
    # The zygote answers as soon as it has forked; the child then sets itself up behind its gate.
    _wait_until(lambda: os.getsid(gate.pid) == gate.pid)  # its own session, as a spawned supervisor
    _wait_until(lambda: _only_its_own_fds(gate.pid, rig.tmp_path / "1.log"))
    time.sleep(0.2)
    assert "ran" not in rig.log(1)  # gated: nothing of the job before release
    gate.release()
    record = rig.record(1)
    assert record["reason"] == "exit-code" and record["exit_code"] == 0
    assert rig.log(1).split() == [str(spec_fields(rig.tmp_path)["uid"]), "ran"]


def _children(pid: int) -> List[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]




def _socket_fds(pid: int) -> List[int]:
    return [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")]








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






def test_requests_are_answered_in_order_and_nothing_waits_for_the_fork(rig: Rig) -> None:
    for job_id in range(10, 16):
        rig.ask(job_id, ["sh", "-c", f"echo {job_id}"])
    assert not rig.gates and not rig.errors  # asking returned without reading an answer
    rig.loop.run_until(lambda: len(rig.gates) == 6)
    assert not rig.errors
    for gate in rig.gates.values():
        assert _parent(gate.pid) == rig.started[0]
        gate.release()
    for job_id in range(10, 16):
        assert rig.record(job_id)["exit_code"] == 0 and rig.log(job_id).strip() == str(job_id)


def test_more_requests_than_the_socket_holds_wait_for_room_in_order(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's plan asks for hundreds of supervisors at once; the socket refuses what it cannot hold
    (EAGAIN), and those requests are sent as answers make room, never failed."""
    real_socketpair = socket.socketpair

    def small_buffers(*args: Any) -> Any:
        ours, theirs = real_socketpair(*args)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum: a few requests
        return ours, theirs

    monkeypatch.setattr(socket, "socketpair", small_buffers)
    rig.zygote.start()
    os.kill(rig.started[0], signal.SIGSTOP)  # nothing is answered until every request was asked
    try:
        for job_id in range(100, 140):
            rig.ask(job_id, ["true"])
        assert len(rig.zygote._unsent) > 0 and not rig.errors  # the socket was full: some wait
    finally:
        os.kill(rig.started[0], signal.SIGCONT)
    rig.loop.run_until(lambda: len(rig.gates) + len(rig.errors) == 40)
    assert not rig.errors and len(rig.started) == 1
    assert sorted(rig.gates) == list(range(100, 140))
    for gate in rig.gates.values():
        gate.abort()


def test_a_zygote_that_dies_with_requests_pending_is_replaced_and_they_are_asked_again(rig: Rig) -> None:
    rig.zygote.start()
    first = rig.started[0]
    os.kill(first, signal.SIGSTOP)  # it cannot answer; then it dies with the requests unanswered
    rig.ask(20, ["sh", "-c", "echo twenty"])
    rig.ask(21, ["sh", "-c", "echo twenty-one"])
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)
    rig.loop.run_until(lambda: len(rig.gates) + len(rig.errors) == 2)
    assert not rig.errors and len(rig.started) == 2
    for gate in rig.gates.values():
        assert _parent(gate.pid) == rig.started[1]
        gate.release()
    assert rig.record(20)["exit_code"] == 0 and rig.record(21)["exit_code"] == 0
    assert rig.log(20).strip() == "twenty" and rig.log(21).strip() == "twenty-one"


def test_a_zygote_that_never_answers_fails_the_request_after_two_tries(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    rig = Rig(tmp_path, timeout_s=0.3)
    try:
        stopped = []

        def stop_each_new_zygote() -> bool:
            for pid in rig.started:
                if pid not in stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            return 22 in rig.errors

        rig.zygote.start()
        stop_each_new_zygote()
        rig.ask(22, ["sh", "-c", "echo never"])
        rig.loop.run_until(stop_each_new_zygote, timeout_s=10)
        assert "did not answer within 0.3 s" in rig.errors[22] and len(rig.started) == 2
        assert 22 not in rig.gates and "never" not in rig.log(22)
    finally:
        for pid in rig.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        rig.close()
