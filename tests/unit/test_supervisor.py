"""Tests for gpujobd.supervisor: its pure functions, and end to end as a real subprocess (needs root)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from gpujobd import supervisor
from gpujobd.shared import states
from gpujobd.supervisor import SpecError

REPO_ROOT = Path(supervisor.__file__).resolve().parents[1]
PATH = "/usr/local/bin:/usr/bin:/bin"
# The command runs as nobody, who may not reach this checkout's .venv (a clone under root's 0700 home):
# a command that needs a Python interpreter gets the system's, which every user can execute.
USER_PYTHON = "/usr/bin/python3"


def spec_fields(state_dir: Path, **overrides: object) -> dict:
    nobody = pwd.getpwnam("nobody")
    fields = {
        "job_id": 7,
        "argv": ["true"],
        "cwd": "/",  # nobody cannot enter tmp_path, which sits under a root-only directory
        "env": {"PATH": PATH},
        "uid": nobody.pw_uid,
        "gid": nobody.pw_gid,
        "user": "nobody",
        "umask": 0o022,
        "exit_record": str(state_dir / "7.json"),
        "runs_file": str(state_dir / "7.runs"),
        "max_runs": 1,
        "restart_delay_s": 0.0,
        "stop_on_failure": False,
        "log_max_bytes": 0,
        "log_drain_s": 1.0,
    }
    fields.update(overrides)
    return fields


# ---------------------------------------------------------------------------------------------------
# Pure functions.


def test_reasons_mirror_the_model() -> None:
    for name in ("EXIT_CODE", "SIGNAL", "EXEC_FAILED", "CHDIR_FAILED", "SETUP_FAILED", "START_FAILED",
                 "LOST"):
        assert getattr(supervisor, f"REASON_{name}") == getattr(states.EndReason, name).value


def test_supervisor_imports_only_the_standard_library() -> None:
    code = ("import sys; before = set(sys.modules); import gpujobd.supervisor; "
            "print(sorted(m for m in set(sys.modules) - before if m.startswith('gpujobd')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['gpujobd', 'gpujobd.supervisor']"


def test_encode_spec_is_one_compact_line_that_parses_back(tmp_path: Path) -> None:
    fields = spec_fields(tmp_path, argv=["echo", "a\nb", "é"], env={"PATH": PATH, "X": "1\n2"})
    line = supervisor.encode_spec(fields)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b": " not in line and b", " not in line
    spec = supervisor.parse_spec(line)
    assert {key: getattr(spec, key) for key in supervisor.SPEC_KEYS} == fields


@pytest.mark.parametrize("change", [
    {"uid": 0},
    {"uid": True},
    {"job_id": -1},
    {"gid": "1"},
    {"umask": 0o1000},
    {"max_runs": 0},
    {"argv": []},
    {"argv": [""]},
    {"argv": ["echo", 3]},
    {"argv": ["echo", "a\0b"]},
    {"argv": "true"},
    {"cwd": "relative"},
    {"exit_record": "7.json"},
    {"runs_file": ""},
    {"user": ""},
    {"env": {"A=B": "1"}},
    {"env": {"A": 1}},
    {"env": ["PATH"]},
    {"restart_delay_s": -1},
    {"restart_delay_s": float("inf")},
    {"restart_delay_s": "1"},
    {"stop_on_failure": 1},
    {"log_drain_s": -0.5},
    {"log_drain_s": 3601},
    {"log_drain_s": True},
    {"surprise": 1},
])
def test_bad_specs_are_refused(tmp_path: Path, change: dict) -> None:
    with pytest.raises(SpecError):
        supervisor.encode_spec(spec_fields(tmp_path, **change))


def test_a_spec_missing_a_key_is_refused(tmp_path: Path) -> None:
    fields = spec_fields(tmp_path)
    del fields["runs_file"]
    with pytest.raises(SpecError, match="runs_file"):
        supervisor.spec_from_dict(fields)


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b"\xff\n"])
def test_parse_spec_refuses_what_is_not_a_json_object(line: bytes) -> None:
    with pytest.raises(SpecError):
        supervisor.parse_spec(line)


# ---------------------------------------------------------------------------------------------------
# End to end: the supervisor as the daemon runs it, with the gate pipe on its stdin.

# The compiled program is built by `make native` (make unit does it, and sets GPUJOBD_REQUIRE_PROGRAM
# so that its absence fails below); a package build's own test run skips what needs it.
HAVE_PROGRAM = os.access(supervisor.PROGRAM, os.X_OK)
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not HAVE_PROGRAM,
                                reason="needs root (to drop privileges) and the program (make native)")


def test_the_program_is_there_when_the_tests_require_it() -> None:
    if os.environ.get("GPUJOBD_REQUIRE_PROGRAM") != "1":
        pytest.skip("GPUJOBD_REQUIRE_PROGRAM is not set (a package build's test run)")
    assert HAVE_PROGRAM, f"no {supervisor.PROGRAM}: run `make native`"


@dataclass
class Finished:
    returncode: int
    record: Optional[dict]
    runs: List[dict]
    log: str
    state_dir: Path


class Job:
    """One supervisor process; its state (record, runs file) goes to tmp_path/state."""

    def __init__(self, tmp_path: Path, cgroup_root: Optional[Path] = None, pass_fds: tuple = (),
                 env_of_program: Optional[dict] = None, **overrides: object) -> None:
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.fields = spec_fields(self.state_dir, **overrides)
        self.log_path = tmp_path / "job.log"
        assert os.access(supervisor.PROGRAM, os.X_OK), f"no {supervisor.PROGRAM}: run `make native`"
        argv = [supervisor.PROGRAM, "--cgroup-root", str(cgroup_root or tmp_path / "no-cgroup")]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                            cwd=REPO_ROOT, pass_fds=pass_fds, env=env_of_program)

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send_spec(self) -> None:
        self.send(supervisor.encode_spec(self.fields))

    def close_gate(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def log(self) -> str:
        return self.log_path.read_text()

    def runs(self) -> List[dict]:
        path = Path(self.fields["runs_file"])
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def finish(self, timeout: float = 30) -> Finished:
        self.close_gate()
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        record_path = Path(self.fields["exit_record"])
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        return Finished(returncode, record, self.runs(), self.log(), self.state_dir)


def run_job(tmp_path: Path, **overrides: object) -> Finished:
    job = Job(tmp_path, **overrides)
    job.send_spec()
    job.send(supervisor.RELEASE_LINE)
    return job.finish()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def sh(script: str) -> list:
    return ["sh", "-c", script]


@needs_root
def test_an_exit_code_is_recorded_without_a_signal(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("exit 3"))
    assert done.returncode == 0
    assert done.record is not None
    assert (done.record["reason"], done.record["exit_code"], done.record["signal"]) == ("exit-code", 3, None)
    assert (done.record["runs"], done.record["max_runs"], done.record["job_id"]) == (1, 1, 7)
    assert done.record["terminated_by_signal"] is None
    assert done.record["started_at"] <= done.record["ended_at"]
    assert [(r["run"], r["exit_code"]) for r in done.runs] == [(1, 3)]
    assert tuple(done.record) == supervisor.RECORD_KEYS + supervisor.LOG_RECORD_KEYS
    assert tuple(done.runs[0]) == supervisor.RUN_KEYS
    assert done.runs[0]["detail"] == "exited with code 3"


@needs_root
def test_a_signal_death_is_recorded_without_an_exit_code(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("kill -KILL $$"))
    assert done.record is not None
    assert (done.record["reason"], done.record["exit_code"], done.record["signal"]) == ("signal", None, 9)
    assert done.runs[0]["detail"] == "killed by SIGKILL"


@needs_root
def test_exit_137_is_not_sigkill(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("exit 137"))
    assert done.record is not None
    assert (done.record["reason"], done.record["exit_code"], done.record["signal"]) == (
        "exit-code", 137, None)


@needs_root
def test_a_missing_command_is_exec_failed_and_not_run_again(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=["gpujob-test-no-such-command", "x"], max_runs=3)
    assert done.record is not None
    assert done.record["reason"] == "exec-failed"
    assert done.record["detail"].startswith("gpujob-test-no-such-command: No such file or directory")
    assert (done.record["exit_code"], done.record["signal"], done.record["runs"]) == (None, None, 1)
    assert "gpujob: exec failed: gpujob-test-no-such-command: No such file or directory" in done.log


@needs_root
def test_a_missing_cwd_is_chdir_failed(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("echo COMMAND-RAN"), cwd="/nonexistent-gpujob-test/dir")
    assert done.record is not None
    assert done.record["reason"] == "chdir-failed"
    assert "No such file or directory" in done.record["detail"]
    assert "COMMAND-RAN" not in done.log


@needs_root
def test_a_cwd_the_user_cannot_enter_is_chdir_failed(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    done = run_job(tmp_path, argv=sh("echo COMMAND-RAN"), cwd=str(private))
    assert done.record is not None
    assert done.record["reason"] == "chdir-failed"
    assert done.record["detail"].startswith(f"{private}: Permission denied")
    assert "COMMAND-RAN" not in done.log


@needs_root
def test_the_command_runs_as_the_user_with_only_the_users_groups(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    done = run_job(tmp_path, argv=sh("echo uid=$(id -u) euid=$(id -u) gid=$(id -g); echo groups=$(id -G)"))
    assert f"uid={nobody.pw_uid} euid={nobody.pw_uid} gid={nobody.pw_gid}" in done.log
    groups = {int(g) for g in done.log.split("groups=")[1].split()}
    assert groups == set(os.getgrouplist("nobody", nobody.pw_gid))
    assert 0 not in groups




@needs_root
def test_the_command_gets_exactly_the_given_environment_umask_and_default_signals(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("env; umask; grep -E '^Sig(Blk|Ign)' /proc/self/status"),
                   env={"PATH": PATH, "FOO": "bar baz"}, umask=0o027)
    lines = done.log.splitlines()
    assert sorted(line for line in lines if "=" in line) == [
        "FOO=bar baz", "GPUJOB_RUN=1", f"PATH={PATH}", "PWD=/"]  # sh adds PWD
    assert "0027" in lines
    masks = {line.split(":")[0]: int(line.split()[1], 16) for line in lines if line.startswith("Sig")}
    # Signals 32 and 33 belong to glibc (no program can set them through sigaction's wrapper); an
    # ignored one inherited from whoever started the test is out of the supervisor's reach.
    glibc_internal = (1 << 31) | (1 << 32)
    assert masks == {"SigBlk": masks["SigBlk"] & glibc_internal, "SigIgn": masks["SigIgn"] & glibc_internal}
    assert masks["SigBlk"] == 0


@needs_root
@pytest.mark.skipif(not os.path.exists(USER_PYTHON), reason=f"needs {USER_PYTHON}")
def test_only_fds_0_to_2_are_open_in_the_command(tmp_path: Path) -> None:
    leaked = os.open(tmp_path / "leaked", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        script = ("import os\nfds = []\nfor fd in range(4096):\n    try:\n        os.fstat(fd)\n"
                  "    except OSError:\n        continue\n    fds.append(fd)\nprint('FDS', fds)\n")
        done = run_job(tmp_path, argv=[USER_PYTHON, "-I", "-S", "-c", script], pass_fds=(leaked,))
    finally:
        os.close(leaked)
    assert "FDS [0, 1, 2]" in done.log, done.log


@needs_root
def test_runs_are_repeated_with_their_number_in_the_environment(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("echo run=$GPUJOB_RUN"), max_runs=5, restart_delay_s=0.01)
    assert [line for line in done.log.splitlines() if line.startswith("run=")] == [
        f"run={n}" for n in range(1, 6)]
    assert [(r["run"], r["exit_code"], r["reason"]) for r in done.runs] == [
        (n, 0, "exit-code") for n in range(1, 6)]
    assert all(a["ended_at"] <= b["started_at"] for a, b in zip(done.runs, done.runs[1:]))
    assert done.record is not None
    assert (done.record["runs"], done.record["max_runs"]) == (5, 5)
    assert done.record["started_at"] == done.runs[0]["started_at"]


@needs_root
def test_stop_on_failure_stops_at_the_first_failing_run(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("echo run=$GPUJOB_RUN; [ $GPUJOB_RUN -lt 2 ]"), max_runs=5,
                   stop_on_failure=True)
    assert [(r["run"], r["exit_code"]) for r in done.runs] == [(1, 0), (2, 1)]
    assert done.record is not None
    assert (done.record["runs"], done.record["exit_code"]) == (2, 1)


@needs_root
def test_sigterm_is_forwarded_to_the_command_and_ends_the_job(tmp_path: Path) -> None:
    job = Job(tmp_path, argv=sh("echo started; exec sleep 30"), max_runs=3)
    job.send_spec()
    job.send(supervisor.RELEASE_LINE)
    wait_until(lambda: "started" in job.log(), "the command to start")
    job.process.send_signal(signal.SIGTERM)
    done = job.finish(timeout=10)
    assert done.record is not None
    assert (done.record["reason"], done.record["signal"], done.record["exit_code"]) == ("signal", 15, None)
    assert (done.record["runs"], done.record["terminated_by_signal"]) == (1, 15)
    assert done.record["stop_signal_phase"] == "run"
    assert len(done.runs) == 1


@needs_root
def test_sigterm_during_the_restart_delay_ends_the_job(tmp_path: Path) -> None:
    before = time.monotonic()
    job = Job(tmp_path, argv=["true"], max_runs=3, restart_delay_s=60.0)
    spawned = time.monotonic()
    job.send_spec()
    job.send(supervisor.RELEASE_LINE)
    wait_until(lambda: len(job.runs()) == 1, "the first run to end")
    started = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    done = job.finish(timeout=10)
    assert time.monotonic() - started < 5
    assert done.record is not None
    assert (done.record["reason"], done.record["exit_code"], done.record["runs"]) == ("exit-code", 0, 1)
    assert done.record["terminated_by_signal"] == 15
    assert done.record["stop_signal_phase"] == "between-runs"
    # Its age when the signal came: at least since it was spawned, at most until it ended (+1 tick).
    assert started - spawned <= done.record["stop_signal_after_s"] <= time.monotonic() - before + 0.01


@needs_root
def test_sigterm_after_the_last_run_is_recorded_as_such_and_ends_nothing(tmp_path: Path) -> None:
    """The last run has ended by itself; a leftover holding the log pipe keeps the supervisor in its
    log drain, where the signal comes: the job's own end stands, the signal's phase says when."""
    job = Job(tmp_path, argv=sh("sleep 60 & echo leftover=$!"), log_drain_s=3.0)
    job.send_spec()
    job.send(supervisor.RELEASE_LINE)
    leftover = 0
    try:
        wait_until(lambda: len(job.runs()) == 1 and "leftover=" in job.log(), "the only run to end")
        leftover = int(job.log().split("leftover=")[1].split()[0])
        job.process.send_signal(signal.SIGTERM)
        done = job.finish(timeout=20)
    finally:
        if leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
    assert done.record is not None
    assert (done.record["reason"], done.record["exit_code"], done.record["signal"]) == ("exit-code", 0, None)
    assert (done.record["terminated_by_signal"], done.record["stop_signal_phase"]) == (15, "after-last-run")
    assert done.record["runs"] == 1 and [r["exit_code"] for r in done.runs] == [0]


GROUPLIST_FAILS = """
#include <errno.h>
#include <grp.h>
int getgrouplist(const char *user, gid_t group, gid_t *groups, int *ngroups) {
    (void)user; (void)group; (void)groups;
    *ngroups = 0;
    errno = EIO;
    return -1;
}
"""


@needs_root
def test_a_group_lookup_that_fails_is_setup_failed_and_runs_nothing(tmp_path: Path) -> None:
    """getgrouplist failing for good (a broken NSS source), simulated with a preloaded stand-in: the
    command must not run with the wrong groups, and the record says why."""
    source = tmp_path / "grouplist_fails.c"
    source.write_text(GROUPLIST_FAILS)
    shim = tmp_path / "grouplist_fails.so"
    built = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(source)], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr  # cc is among the packages make deps installs
    preload = dict(os.environ, LD_PRELOAD=str(shim))
    job = Job(tmp_path, argv=sh("echo COMMAND-RAN"), env_of_program=preload)
    job.send_spec()
    job.send(supervisor.RELEASE_LINE)
    done = job.finish()
    assert done.record is not None
    assert (done.record["reason"], done.record["exit_code"]) == ("setup-failed", None)
    assert done.record["detail"].startswith("getgrouplist: Input/output error")
    assert "COMMAND-RAN" not in done.log


@needs_root
def test_eof_before_release_runs_nothing(tmp_path: Path) -> None:
    job = Job(tmp_path, argv=sh("echo COMMAND-RAN"))
    job.send_spec()
    done = job.finish()
    assert done.returncode == 0
    assert done.record is not None
    assert done.record["reason"] == "start-failed"
    assert "gate closed before release" in done.record["detail"]
    assert (done.record["runs"], done.record["started_at"], done.record["exit_code"]) == (0, None, None)
    assert tuple(done.record) == supervisor.RECORD_KEYS and done.record["leftovers_counted"] is False
    assert "COMMAND-RAN" not in done.log
    assert "gpujob: the gate closed before release; nothing was run" in done.log  # the pump was drained
    assert done.runs == []


@needs_root
def test_eof_before_the_spec_exits_3_without_a_record(tmp_path: Path) -> None:
    job = Job(tmp_path)
    done = job.finish()
    assert done.returncode == supervisor.EXIT_NO_SPEC
    assert done.record is None
    assert "gpujob: the gate closed before the job spec arrived" in done.log


@needs_root
def test_an_invalid_spec_exits_3_without_running_anything(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.send(b'{"job_id": 7}\n' + supervisor.RELEASE_LINE)
    done = job.finish()
    assert done.returncode == supervisor.EXIT_NO_SPEC
    assert done.record is None
    assert "gpujob: job spec: missing keys" in done.log


@needs_root
def test_a_line_other_than_release_runs_nothing(tmp_path: Path) -> None:
    job = Job(tmp_path, argv=sh("echo COMMAND-RAN"))
    job.send_spec()
    job.send(b"go\n")
    done = job.finish()
    assert done.record is not None
    assert done.record["reason"] == "start-failed"
    assert "COMMAND-RAN" not in done.log


def _waiting_for_release(job: Job) -> bool:
    """True once the supervisor has read the whole spec and sleeps (in the read for the release line)."""
    assert job.process.stdin is not None
    unread = fcntl.ioctl(job.process.stdin.fileno(), termios.FIONREAD, b"\0\0\0\0")
    status = Path(f"/proc/{job.process.pid}/status").read_text()
    sig_caught = int(status.split("SigCgt:")[1].split()[0], 16)
    state = Path(f"/proc/{job.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return unread == b"\0\0\0\0" and bool(sig_caught & (1 << (signal.SIGTERM - 1))) and state == "S"


@needs_root
def test_sigterm_before_release_runs_nothing(tmp_path: Path) -> None:
    job = Job(tmp_path, argv=sh("echo COMMAND-RAN"))
    job.send_spec()
    wait_until(lambda: _waiting_for_release(job), "the supervisor to wait for release")
    # The log pump (a thread) is set up behind the gate, not after the release.
    assert len(os.listdir(f"/proc/{job.process.pid}/task")) == 2
    job.process.send_signal(signal.SIGTERM)
    done = job.finish()
    assert done.record is not None
    assert (done.record["reason"], done.record["terminated_by_signal"]) == ("start-failed", 15)
    assert "before release" in done.record["detail"]
    assert "COMMAND-RAN" not in done.log
    assert "gpujob: received SIGTERM before release; nothing was run" in done.log


@needs_root
def test_the_exit_record_is_written_atomically(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=["true"])
    assert sorted(os.listdir(done.state_dir)) == ["7.json", "7.runs"]
    assert stat.S_IMODE((done.state_dir / "7.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((done.state_dir / "7.runs").stat().st_mode) == 0o600
    assert (done.state_dir / "7.json").read_bytes().count(b"\n") == 1


@needs_root
def test_leftovers_are_counted_in_the_supervisors_own_cgroup(tmp_path: Path) -> None:
    own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
               if line.startswith("0::"))  # the supervisor is started in ours
    cgroup_dir = tmp_path / "cgroup" / own.lstrip("/")
    cgroup_dir.mkdir(parents=True, exist_ok=True)
    (cgroup_dir / "cgroup.procs").write_text("5000001\n5000002\n")  # above the largest pid_max
    done = run_job(tmp_path, argv=["true"], cgroup_root=tmp_path / "cgroup")
    assert done.record is not None
    assert done.record["leftover_processes"] == 2 and done.record["leftovers_counted"] is True
    assert done.record["detail"] == "exited with code 0"


@needs_root
def test_leftovers_that_cannot_be_counted_are_said_so(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=["true"])
    assert done.record is not None
    assert done.record["leftover_processes"] == 0 and done.record["leftovers_counted"] is False
    assert done.record["detail"].endswith("leftover count unavailable")


@needs_root
def test_a_leftover_holding_the_log_pipe_delays_the_record_only_log_drain_s(tmp_path: Path) -> None:
    """A process the job left behind keeps the pump's pipe open; the supervisor copies what comes
    for jobs.log_drain_s, then writes the record without waiting for the pipe to close."""
    job = Job(tmp_path, argv=sh("sleep 30 & echo leftover=$!"), log_drain_s=0.3)
    job.send_spec()
    job.send(supervisor.RELEASE_LINE)
    leftover = None
    try:
        wait_until(lambda: "leftover=" in job.log(), "the job's output")
        leftover = int(job.log().split("leftover=")[1].split()[0])
        done = job.finish(timeout=15)  # with no drain limit it would wait for the sleep: 30 s
        assert done.record is not None and done.record["exit_code"] == 0
        assert Path(f"/proc/{leftover}").exists(), "the record came while the leftover held the pipe"
    finally:
        if leftover is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)


# --- the log cap (issue 15): the job runs on, the log says so, the record too ---------------------------


@needs_root
def test_a_log_past_its_cap_is_truncated_and_the_job_runs_on(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("head -c 100000 /dev/zero | tr '\\0' x; echo; echo after >&2; exit 4"),
                   log_max_bytes=5000)
    assert done.record is not None
    assert done.record["exit_code"] == 4, "the job was not stopped by its log's cap"
    assert done.record["log_truncated"] is True and done.record["log_bytes"] == 5000
    assert done.log.startswith("x" * 5000)
    assert "log truncated at 5000 bytes (jobs.log_max_bytes)" in done.log.splitlines()[-1]
    assert "after" not in done.log


@needs_root
def test_a_log_under_its_cap_is_whole_and_says_nothing(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("echo out; echo err >&2"), log_max_bytes=5000)
    assert done.record is not None
    assert done.log == "out\nerr\n"
    fate = (done.record["log_truncated"], done.record["log_error"], done.record["log_bytes"])
    assert fate == (False, None, 8)


@needs_root
def test_a_failed_run_is_run_again_unless_stop_on_failure(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=sh("exit 1"), max_runs=3)
    assert [(r["run"], r["exit_code"]) for r in done.runs] == [(1, 1), (2, 1), (3, 1)]
    assert done.record is not None and (done.record["runs"], done.record["exit_code"]) == (3, 1)


@needs_root
def test_a_chdir_failure_is_not_run_again(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=["true"], max_runs=3, cwd="/nonexistent-gpujob-test")
    assert done.record is not None and (done.record["reason"], done.record["runs"]) == ("chdir-failed", 1)


@needs_root
def test_exec_failed_names_the_path_searched_and_suggests_python3(tmp_path: Path) -> None:
    searched = "/nonexistent-gpujob-test/bin"
    done = run_job(tmp_path, argv=["python", "-V"], env={"PATH": searched})
    assert done.record is not None and done.record["reason"] == "exec-failed"
    assert f"searched PATH={searched}" in done.record["detail"] and "python3" in done.record["detail"]
    (tmp_path / "other").mkdir()
    other = run_job(tmp_path / "other", argv=["pyhton"], env={"PATH": searched})
    assert other.record is not None
    assert "searched PATH=" in other.record["detail"] and "python3" not in other.record["detail"]


@needs_root
def test_exec_failed_of_a_path_names_no_search(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=["./gpujob-test-run.sh"])
    assert done.record is not None
    assert done.runs[0]["detail"] == "./gpujob-test-run.sh: No such file or directory"


@needs_root
def test_chdir_failed_with_a_tilde_says_the_shell_did_not_expand_it(tmp_path: Path) -> None:
    done = run_job(tmp_path, argv=["true"], cwd="/nonexistent-gpujob-test/~/proj")
    assert done.record is not None
    assert done.record["detail"].startswith("/nonexistent-gpujob-test/~/proj: No such file or directory")
    assert "expands ~" in done.record["detail"]


@needs_root
def test_a_runs_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere"
    (state / "7.runs").symlink_to(elsewhere)
    done = run_job(tmp_path, argv=["true"])
    assert not elsewhere.exists()
    assert "gpujob: cannot append to" in done.log
    assert done.record is not None and done.record["exit_code"] == 0  # the record is written still


@needs_root
def test_an_exit_record_that_cannot_be_written_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "7.json").mkdir()  # a rename onto a directory fails
    done = run_job(tmp_path, argv=["true"])
    assert done.returncode == supervisor.EXIT_RECORD_FAILED
    assert "gpujob: cannot write the exit record" in done.log
    assert sorted(os.listdir(state)) == ["7.json", "7.runs"]


@needs_root
def test_the_program_refuses_unknown_arguments(tmp_path: Path) -> None:
    done = subprocess.run([supervisor.PROGRAM, "--bogus"], capture_output=True, stdin=subprocess.DEVNULL)
    assert done.returncode == supervisor.EXIT_USAGE and b"usage: gpujob-supervisor" in done.stderr
    assert supervisor.main(["--bogus"]) == supervisor.EXIT_USAGE  # the zygote's own entry point too
