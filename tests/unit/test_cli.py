"""gpujobctl against a stateful fake client: no bus, no daemon.

The fake keeps jobs, their logs and runs; time passes for a job each time a reader finds nothing new in
its log (the next scripted chunk is appended, or the job ends once the script is used up). A job bound
to another (bind_to) is stopped when that one ends, as systemd's BindsTo= does. Its `logs` and
`submit_with_background` are the real `Client` methods, so following and the pair's failure path are
tested against the fake's `read_log`, `submit` and `stop`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from gpujobd.cli import common, status
from gpujobd.cli import main as cli
from gpujobd.cli import render as cli_format
from gpujobd.client import Client
from gpujobd.shared import api, errors, jobspec
from gpujobd.shared import text as text_values
from gpujobd.shared.config import Config
from gpujobd.shared.states import JobState

SUCCEEDED = {"state": "succeeded", "reason": "exit-code", "exit_code": 0}


class FakeClient:
    follow_poll_interval_s = 0.0

    def __init__(self) -> None:
        self.jobs: Dict[int, Dict[str, Any]] = {}
        self.log: Dict[int, bytearray] = {}
        self.scripts: Dict[int, List[bytes]] = {}
        self.endings: Dict[int, Dict[str, Any]] = {}
        self.reads: List[Tuple[int, int, int]] = []  # (job id, offset asked for, bytes returned)
        self.submitted: List[Dict[str, Any]] = []
        self.stop_calls: List[int] = []
        self.next_script: List[bytes] = []
        self.next_ending: Dict[str, Any] = dict(SUCCEEDED)
        self.list_calls: List[Dict[str, Any]] = []
        self.runs_of: Dict[int, List[Dict[str, Any]]] = {}
        self.runs_calls: List[Tuple[int, int]] = []
        self.submit_failures: Dict[int, Exception] = {}  # submission number (1-based) -> raised
        self.validated: List[Dict[str, Any]] = []
        self.validate_failures: Dict[int, Exception] = {}  # validation number (1-based) -> raised

    # -- test setup --

    def add_job(self, state: str = "running", log: bytes = b"", script: Optional[List[bytes]] = None,
                ending: Optional[Dict[str, Any]] = None, **fields: Any) -> int:
        job_id = fields.pop("id", max(self.jobs, default=0) + 1)
        now = time.time()
        job = {"id": job_id, "name": "", "user": "alice", "uid": 1000, "state": state,
               "unit": f"gpujob-{job_id}.scope", "argv": ["python", "train.py"], "cwd": "/home/alice",
               "env": {}, "properties": {}, "created_at": now - 60, "started_at": now - 60}
        if fields.get("background"):
            job.update(max_runs=10, restart_delay_s=2.0, runs=0, stop_on_failure=False)
        job.update(fields)
        if JobState(state).is_final:
            job.setdefault("ended_at", now)
        self.jobs[job_id] = job
        self.runs_of[job_id] = []
        self.log[job_id] = bytearray(log)
        self.scripts[job_id] = list(script or [])
        self.endings[job_id] = dict(ending or SUCCEEDED)
        return job_id

    def add_run(self, job_id: int, **run: Any) -> None:
        """A run of the job ended (times default to a 10 s run ending now)."""
        runs = self.runs_of[job_id]
        now = time.time()
        record = {"run": len(runs) + 1, "started_at": now - 10, "ended_at": now, "reason": "exit-code"}
        record.update(run)
        runs.append({key: value for key, value in record.items() if value is not None})
        self.jobs[job_id]["runs"] = len(runs)

    def end(self, job_id: int, **outcome: Any) -> None:
        job = self.jobs[job_id]
        job.update(outcome)
        job["ended_at"] = time.time()
        if job.get("started_at") is not None:
            job["elapsed_s"] = job["ended_at"] - job["started_at"]
        for other_id, other in self.jobs.items():  # systemd stops the jobs bound to this one
            if other.get("bind_to") == job_id and not JobState(other["state"]).is_final:
                self.end(other_id, state="stopped", reason="bound-job-ended", signal=15,
                         detail="the job it was bound to ended")

    def _advance(self, job_id: int) -> None:
        """Time passes for a job: its next log chunk appears, or it ends."""
        if JobState(self.jobs[job_id]["state"]).is_final:
            return
        if self.scripts[job_id]:
            self.log[job_id] += self.scripts[job_id].pop(0)
        else:
            self.end(job_id, **self.endings[job_id])

    def _job(self, job_id: int) -> Dict[str, Any]:
        if job_id not in self.jobs:
            raise errors.NotFound(f"no job {job_id}: see `gpujobctl list --all`")
        return self.jobs[job_id]

    @staticmethod
    def _out(job: Dict[str, Any], raw: bool) -> Dict[str, Any]:
        job = dict(job)
        if job.get("elapsed_s") is not None and job.get("timeout_s"):  # as gpujobd computes it
            job["timeout_fraction"] = job["elapsed_s"] / job["timeout_s"]
        return job if raw else api.job_to_json(job)

    # -- the client's interface --

    def submit(self, argv: List[str], *, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
               name: str = "", properties: Optional[Dict[str, str]] = None,
               timeout_s: Optional[float] = None, raw: bool = False, **loop: Any) -> Dict[str, Any]:
        """Records the call (the loop options only as given: background, max_runs, restart_delay_s,
        stop_on_failure, bind_to); checks what gpujobd would check of them."""
        loop = {key: value for key, value in loop.items()
                if value is not None and value is not False}  # only what the client sends
        sent = {"argv": list(argv), "cwd": cwd, "env": dict(env or {}), "name": name,
                "properties": dict(properties or {}), "timeout_s": timeout_s, **loop}
        self.submitted.append(sent)
        failure = self.submit_failures.get(len(self.submitted))
        if failure is not None:
            raise failure
        wire = {key: value for key, value in sent.items() if value is not None}
        problems = gpujobd_problems(dict(wire, cwd=cwd or "/home/alice"))
        if problems:
            raise errors.InvalidArgument("; ".join(problems))
        bound = loop.get("bind_to")
        if bound is not None and self._job(bound)["state"] not in ("starting", "running"):
            raise errors.InvalidArgument(f"--bind-to {bound}: that job is {self.jobs[bound]['state']}")
        fields = {key: value for key, value in sent.items() if value is not None and key != "gpu_check"}
        job_id = self.add_job(script=list(self.next_script), ending=self.next_ending, **fields)
        return self._out(self.jobs[job_id], raw)

    def validate(self, argv: List[str], **options: Any) -> None:
        """What the daemon's Validate does: submit's checks, nothing created, nothing recorded."""
        self.validated.append({"argv": list(argv), **options})
        failure = self.validate_failures.get(len(self.validated))
        if failure is not None:
            raise failure
        wire = {key: value for key, value in options.items() if value is not None and value is not False}
        problems = gpujobd_problems(dict(wire, argv=list(argv), cwd=options.get("cwd") or "/home/alice"))
        if problems:
            raise errors.InvalidArgument("; ".join(problems))

    submit_with_background = Client.submit_with_background
    _stop_after_failed_pair = Client._stop_after_failed_pair

    def stop(self, job_id: int) -> str:
        job = self._job(job_id)
        self.stop_calls.append(job_id)
        if JobState(job["state"]).is_final:
            return api.STOP_ALREADY_ENDED
        self.end(job_id, state="stopped", reason="stopped", signal=15, stopped_by="alice")
        return api.STOP_STOPPING

    def get(self, job_id: int, *, raw: bool = False) -> Dict[str, Any]:
        return self._out(self._job(job_id), raw)

    def tasks(self, job_id: int, *, raw: bool = False) -> List[Dict[str, Any]]:
        first = self._job(job_id)
        if first.get("array_id") != job_id:
            return [self._out(first, raw)]
        return [self._out(job, raw) for job in self.jobs.values() if job.get("array_id") == job_id]

    def list(self, *, all: bool = False, user: Optional[str] = None, state: Optional[str] = None,
             limit: Optional[int] = None, raw: bool = False) -> List[Dict[str, Any]]:
        self.list_calls.append({"all": all, "user": user, "state": state, "limit": limit})
        jobs = [job for job in self.jobs.values()
                if (user is None or job["user"] == user) and (state is None or job["state"] == state)]
        return [self._out(job, raw) for job in (jobs[-limit:] if limit else jobs)]  # the newest, oldest first

    page_size = 2  # small pages, so that paging is exercised

    def pages(self, *, all: bool = False, user: Optional[str] = None, state: Optional[str] = None,
              raw: bool = False):
        self.list_calls.append({"all": all, "user": user, "state": state, "limit": None})
        jobs = self.list(all=all, user=user, state=state, raw=raw)
        self.list_calls.pop()
        for start in range(0, len(jobs), self.page_size):
            yield jobs[start:start + self.page_size]

    def read_log(self, job_id: int, offset: int = 0, max_bytes: int = 1 << 20) -> Tuple[bytes, int, bool]:
        ended = JobState(self._job(job_id)["state"]).is_final  # looked at before the file, as gpujobd does
        data = bytes(self.log[job_id][offset:offset + max_bytes])
        self.reads.append((job_id, offset, len(data)))
        if not data:
            self._advance(job_id)
        return data, offset + len(data), ended

    def runs(self, job_id: int, limit: int = 0, *, raw: bool = False) -> List[Dict[str, Any]]:
        self._job(job_id)
        self.runs_calls.append((job_id, limit))
        runs = self.runs_of[job_id][-limit:] if limit else self.runs_of[job_id]
        return [dict(run) if raw else api.run_to_json(run) for run in runs]

    logs = Client.logs
    restart_grace_s = 0.0
    _riding_out_restarts = Client._riding_out_restarts

    def wait(self, job_id: int, timeout_s: Optional[float] = None, *, raw: bool = False) -> Dict[str, Any]:
        while not JobState(self._job(job_id)["state"]).is_final:
            if timeout_s is not None:
                raise errors.GpujobdError(f"timed out after {timeout_s:g}s waiting for job {job_id}")
            self._advance(job_id)
        return self._out(self.jobs[job_id], raw)


def gpujobd_problems(wire: Dict[str, Any]) -> List[str]:
    """What gpujobd, with its default configuration, finds wrong with a spec: the real declaration's
    decoding, server defaults and rules (not the allowlist of properties)."""
    config = Config()
    return jobspec.problems(jobspec.with_server_defaults(jobspec.decode(wire), config), config.jobs)


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


def run(fake: Any, *argv: str) -> int:
    return cli.main(list(argv), client_factory=lambda: fake)


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gpujobctl: ")
    assert "Traceback" not in stderr
    return lines[0]


# --- parsing ----------------------------------------------------------------------------------------


def test_version_and_help_exit_0(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "gpujobctl 0.1.0"
    for verb in ("submit", "stop", "status", "list", "logs", "wait"):
        assert cli.main([verb, "-h"]) == 0
        assert "examples:" in capsys.readouterr().out


def test_submit_parses_options_and_command_after_double_dash(fake, capsys):
    code = run(fake, "submit", "--name", "n1", "--cwd", "/tmp", "--env", "A=1", "--env", "B=x=y",
               "--property", "CPUQuota=50%", "--timeout", "1h30m", "--", "python", "-c", "--name", "--")
    assert code == 0
    assert fake.submitted == [{"argv": ["python", "-c", "--name", "--"], "cwd": "/tmp",
                               "env": {"A": "1", "B": "x=y"}, "name": "n1",
                               "properties": {"CPUQuota": "50%"}, "timeout_s": 5400.0}]
    assert capsys.readouterr().err == ""


def test_submit_without_double_dash_takes_the_rest_as_command(fake):
    assert run(fake, "submit", "--name", "x", "sleep", "1", "--wait") == 0
    assert fake.submitted[0]["argv"] == ["sleep", "1", "--wait"]
    assert fake.submitted[0]["cwd"] is None  # the client fills in the current directory


@pytest.mark.parametrize("argv, needle", [
    (["submit", "--env", "FOO", "--", "true"], "argument --env: expected NAME=VALUE, got 'FOO'"),
    (["submit", "--env", "=1", "--", "true"], "expected NAME=VALUE"),
    (["submit", "--property", "CPUQuota", "--", "true"], "argument --property"),
    (["submit", "--timeout", "soon", "--", "true"], "argument --timeout"),
    (["submit", "--timeout", "0", "--", "true"], "argument --timeout"),
    (["submit", "--name", "x"], "no command given: put it after `--`"),
    (["submit", "--"], "no command given"),
    (["submit", "--background", "--max-runs", "0", "--", "true"],
     "argument --max-runs: expected a whole number > 0, not '0'"),
    (["submit", "--background", "--max-runs", "-1", "--", "true"], "argument --max-runs"),
    (["submit", "--background", "--max-runs", "2.5", "--", "true"], "argument --max-runs"),
    (["submit", "--background", "--restart-delay", "soon", "--", "true"], "argument --restart-delay"),
    (["submit", "--background", "--restart-delay", "-1", "--", "true"], "argument --restart-delay"),
    (["submit", "--bind-to", "x", "--", "true"], "argument --bind-to: a job id is a whole number"),
    (["submit", "--with-background", "", "--", "true"], "argument --with-background: the command is empty"),
    (["submit", "--with-background", "python 'eval.py", "--", "true"], "cannot split"),
    (["submit", "--with-background", "eval", "--background", "--", "true"],
     "--background cannot be combined with --with-background"),
    (["submit", "--with-background", "eval", "--bind-to", "3", "--", "true"],
     "--bind-to cannot be combined with --with-background"),
    (["submit", "--with-background", "eval"], "no command given"),
    (["stop"], "required: ID"),
    (["stop", "5", "x"], "a job id is a whole number, not 'x'"),
    (["status", "-1"], "status"),
    (["list", "--state", "sleeping"], "invalid choice"),
    (["list", "--limit", "0"], "expected a whole number > 0"),
    (["logs"], "required"),
    (["wait", "--timeout", "-3", "1"], "wait"),
    ([], "required: VERB"),
    (["frobnicate"], "unknown verb 'frobnicate' (verbs: submit, stop,"),
    (["sumbit"], "unknown verb 'sumbit': did you mean `submit`?"),
    (["log", "3"], "did you mean `logs`?"),
    (["cancel", "3"], "did you mean `stop`?"),
])
def test_usage_errors_exit_2_with_one_line(fake, capsys, argv, needle):
    assert run(fake, *argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert needle in line
    assert captured.out == ""
    assert fake.submitted == []


def test_usage_error_says_where_to_look(fake, capsys):
    run(fake, "submit", "--env", "FOO", "--", "true")
    assert "see `gpujobctl submit -h`" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("1.5", 1.5), ("30s", 30.0), ("10min", 600.0), ("10m", 600.0), ("2h", 7200.0),
    ("1h30m", 5400.0), ("1d", 86400.0), ("500ms", 0.5), ("1h 30min", 5400.0),
])
def test_duration(text, seconds):
    assert text_values.duration(text) == seconds


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("0s", 0.0), ("500ms", 0.5), ("1min", 60.0)])
def test_restart_delay_may_be_zero(text, seconds):
    assert text_values.delay(text) == seconds


def test_other_verbs_parse(fake):
    fake.add_job(id=5)
    parser = cli.build_parser()
    assert parser.parse_args(["stop", "5", "6"]).ids == [5, 6]
    assert parser.parse_args(["logs", "-f", "5"]).follow is True
    assert parser.parse_args(["logs", "--follow", "5"]).follow is True
    listed = parser.parse_args(["list", "--all", "--user", "bob", "--state", "running", "--json"])
    assert (listed.all, listed.user, listed.state, listed.json) == (True, "bob", "running", True)
    assert parser.parse_args(["wait", "--timeout", "2m", "1", "2"]).timeout == 120.0
    assert parser.parse_args(["status", "5", "--json"]).json is True


# --- submit -----------------------------------------------------------------------------------------


def test_submit_prints_just_the_id(fake, capsys):
    fake.add_job(id=41, state="succeeded", ended_at=1.0)
    assert run(fake, "submit", "--", "true") == 0
    assert capsys.readouterr().out == "42\n"


def test_submit_json_prints_the_job_object(fake, capsys):
    assert run(fake, "submit", "--json", "--name", "n", "--", "true") == 0
    job = json.loads(capsys.readouterr().out)
    assert list(job) == list(api.JSON_FIELDS)
    assert (job["id"], job["name"], job["argv"], job["state"]) == (1, "n", ["true"], "running")
    assert job["created_at"].endswith("Z")


@pytest.mark.parametrize("ending, code", [
    ({"state": "succeeded", "reason": "exit-code", "exit_code": 0}, 0),
    ({"state": "failed", "reason": "exit-code", "exit_code": 3}, 3),
    ({"state": "failed", "reason": "signal", "signal": 9}, 137),
    ({"state": "failed", "reason": "exec-failed", "detail": "No such file or directory"}, 1),
    ({"state": "failed", "reason": "start-failed"}, 1),
    ({"state": "lost", "reason": "lost", "detail": "daemon restarted"}, 1),
    ({"state": "stopped", "reason": "stopped", "stopped_by": "bob"}, 1),
    ({"state": "timed-out", "reason": "timeout"}, 1),
    ({"state": "stopped", "reason": "stopped", "exit_code": 0}, 1),
    ({"state": "timed-out", "reason": "timeout", "signal": 15}, 143),
])
def test_submit_wait_follows_the_log_and_exits_with_the_job_code(fake, capsysbinary, ending, code):
    fake.next_script = [b"epoch 1\n", b"epoch 2\n", b"done"]
    fake.next_ending = ending
    assert run(fake, "submit", "--wait", "--", "python", "train.py") == code
    captured = capsysbinary.readouterr()
    assert captured.out == b"epoch 1\nepoch 2\ndone"
    assert captured.err == b""


def test_submit_wait_json_prints_the_final_job_instead_of_the_log(fake, capsys):
    fake.next_script = [b"noise\n"]
    fake.next_ending = {"state": "failed", "reason": "exit-code", "exit_code": 3}
    assert run(fake, "submit", "--wait", "--json", "--", "false") == 3
    job = json.loads(capsys.readouterr().out)
    assert (job["state"], job["exit_code"], job["reason"]) == ("failed", 3, "exit-code")
    assert job["ended_at"].endswith("Z")


# --- submit: background loops -----------------------------------------------------------------------


def test_submit_background_sends_the_loop_options(fake, capsys):
    assert run(fake, "submit", "--background", "--max-runs", "5", "--restart-delay", "30s",
               "--stop-on-failure", "--", "python", "eval.py") == 0
    assert capsys.readouterr().out == "1\n"
    assert fake.submitted == [{"argv": ["python", "eval.py"], "cwd": None, "env": {}, "name": "",
                               "properties": {}, "timeout_s": None, "background": True, "max_runs": 5,
                               "restart_delay_s": 30.0, "stop_on_failure": True}]


def test_submit_sends_only_the_loop_options_given(fake):
    assert run(fake, "submit", "--background", "--", "./loop.sh") == 0
    assert run(fake, "submit", "--background", "--restart-delay", "0", "--", "./loop.sh") == 0
    assert run(fake, "submit", "--", "./once.sh") == 0
    loop_keys = [{key for key in spec if key in api.SPEC_FIELDS and key not in
                  ("argv", "cwd", "env", "name", "properties", "timeout_s")} for spec in fake.submitted]
    assert loop_keys == [{"background"}, {"background", "restart_delay_s"}, set()]
    assert fake.submitted[1]["restart_delay_s"] == 0.0


def test_submit_bind_to_is_sent_without_background(fake, capsys):
    fake.add_job(id=4)
    assert run(fake, "submit", "--bind-to", "4", "--", "./watch.sh") == 0
    assert capsys.readouterr().out == "5\n"
    assert fake.submitted[0]["bind_to"] == 4 and "background" not in fake.submitted[0]


def test_submit_bind_to_an_ended_job_is_refused_by_the_daemon(fake, capsys):
    fake.add_job(id=4, state="succeeded", exit_code=0)
    assert run(fake, "submit", "--bind-to", "4", "--", "./watch.sh") == 2
    assert "--bind-to 4: that job is succeeded" in one_error_line(capsys.readouterr().err)


def test_submit_background_json_shows_the_loop_fields(fake, capsys):
    assert run(fake, "submit", "--json", "--background", "--max-runs", "3", "--", "./loop.sh") == 0
    job = json.loads(capsys.readouterr().out)
    assert list(job) == list(api.JSON_FIELDS)
    assert (job["background"], job["max_runs"], job["runs"]) == (True, 3, 0)


def test_with_background_prints_both_ids_and_binds_the_loop(fake, capsys):
    assert run(fake, "submit", "--name", "exp1", "--timeout", "1h", "--env", "A=1", "--max-runs", "7",
               "--restart-delay", "1min", "--stop-on-failure",
               "--with-background", "python eval.py --tag 'last run'", "--", "python", "train.py") == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("1 2\n", "")
    foreground, background = fake.submitted
    assert foreground == {"argv": ["python", "train.py"], "cwd": None, "env": {"A": "1"}, "name": "exp1",
                          "properties": {}, "timeout_s": 3600.0}
    assert background == {"argv": ["python", "eval.py", "--tag", "last run"], "cwd": None,
                          "env": {"A": "1"}, "name": "exp1-bg", "properties": {}, "timeout_s": None,
                          "background": True, "max_runs": 7, "restart_delay_s": 60.0,
                          "stop_on_failure": True, "bind_to": 1}
    assert fake.jobs[2]["bind_to"] == 1


def test_with_background_without_a_name_leaves_the_loop_unnamed(fake):
    assert run(fake, "submit", "--with-background", "./eval.sh", "--", "./train.sh") == 0
    assert [spec["name"] for spec in fake.submitted] == ["", ""]
    assert "max_runs" not in fake.submitted[1]  # the server's default


def test_with_background_sends_gpu_check_to_both_jobs_and_the_timeout_to_the_foreground(fake):
    assert run(fake, "submit", "--gpu-check", "wait", "--timeout", "1h", "--with-background", "./eval.sh",
               "--", "./train.sh") == 0
    assert [(sent.get("gpu_check"), sent["timeout_s"]) for sent in fake.submitted] == \
        [("wait", 3600.0), ("wait", None)]


@pytest.mark.parametrize("argv, named", [
    (["--max-runs", "3"], "max_runs (--max-runs) only applies to background loops"),
    (["--restart-delay", "5", "--stop-on-failure"],
     "restart_delay_s (--restart-delay), stop_on_failure (--stop-on-failure) only apply to background loops"),
])
def test_loop_options_without_background_are_refused_by_the_daemon_as_usage_errors(fake, capsys, argv, named):
    assert run(fake, "submit", *argv, "--", "true") == 2
    line = one_error_line(capsys.readouterr().err)
    assert named in line and line.endswith("set background (--background) too")
    assert len(fake.submitted) == 1 and fake.jobs == {}  # sent once, refused, nothing created


def test_with_background_json_prints_both_jobs(fake, capsys):
    assert run(fake, "submit", "--json", "--with-background", "./eval.sh", "--", "./train.sh") == 0
    pair = json.loads(capsys.readouterr().out)
    assert list(pair) == ["foreground", "background"]
    assert all(list(job) == list(api.JSON_FIELDS) for job in pair.values())
    assert (pair["foreground"]["id"], pair["background"]["id"]) == (1, 2)
    assert (pair["background"]["bind_to"], pair["background"]["background"]) == (1, True)


@pytest.mark.parametrize("failure, code", [
    (errors.PermissionDenied("--bind-to 1: that job belongs to bob"), 4),
    (errors.InvalidArgument("--max-runs 5000: must be from 1 to this server's limit of 1000"), 2),
    (errors.Unavailable("gpujobd did not answer Submit within 30s"), 5),
])
def test_with_background_stops_the_foreground_when_the_loop_cannot_be_submitted(fake, capsys, failure,
                                                                                   code):
    fake.submit_failures[2] = failure
    assert run(fake, "submit", "--with-background", "./eval.sh", "--", "./train.sh") == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_error_line(captured.err) == f"gpujobctl: {failure}"
    assert fake.stop_calls == [1]
    assert fake.jobs[1]["state"] == "stopped" and list(fake.jobs) == [1]


def test_with_background_says_so_when_the_foreground_cannot_be_stopped_either(fake, capsys):
    fake.submit_failures[2] = errors.InvalidArgument("--max-runs 5000: above the limit")

    def stop_fails(job_id: int) -> str:
        raise errors.Unavailable("gpujobd is not running")

    fake.stop = stop_fails
    assert run(fake, "submit", "--with-background", "./eval.sh", "--", "./train.sh") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--max-runs 5000: above the limit" in line
    assert "stopping the foreground job 1 failed too (gpujobd is not running)" in line
    assert "gpujobctl stop 1" in line


def test_with_background_failing_foreground_submits_no_loop(fake, capsys):
    fake.submit_failures[1] = errors.InvalidArgument("the cwd /x does not exist")
    assert run(fake, "submit", "--with-background", "./eval.sh", "--", "./train.sh") == 2
    assert len(fake.submitted) == 1 and fake.stop_calls == [] and fake.jobs == {}


def test_with_background_wait_follows_the_foreground_and_exits_with_its_code(fake, capsysbinary):
    fake.next_script = [b"epoch 1\n", b"epoch 2\n"]
    fake.next_ending = {"state": "failed", "reason": "exit-code", "exit_code": 3}
    assert run(fake, "submit", "--wait", "--with-background", "./eval.sh", "--", "./train.sh") == 3
    captured = capsysbinary.readouterr()
    assert (captured.out, captured.err) == (b"epoch 1\nepoch 2\n", b"")
    assert fake.jobs[1]["state"] == "failed"
    assert (fake.jobs[2]["state"], fake.jobs[2]["reason"]) == ("stopped", "bound-job-ended")


def test_with_background_wait_json_prints_both_ended_jobs(fake, capsys):
    assert run(fake, "submit", "--wait", "--json", "--with-background", "./eval.sh", "--", "./train.sh") == 0
    pair = json.loads(capsys.readouterr().out)
    assert pair["foreground"]["state"] == "succeeded"
    assert (pair["background"]["state"], pair["background"]["reason"]) == ("stopped", "bound-job-ended")


def test_interrupted_with_background_wait_names_both_jobs(fake, capsys, monkeypatch):
    def interrupted(chunks):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "write_chunks", interrupted)
    assert run(fake, "submit", "--wait", "--with-background", "./eval.sh", "--", "./train.sh") == 130
    line = one_error_line(capsys.readouterr().err)
    assert "jobs 1 and 2 keep running" in line and "`gpujobctl stop 1` stops both" in line
    assert fake.stop_calls == []


@pytest.mark.parametrize("job, code", [
    ({"state": "succeeded", "exit_code": 0}, 0),
    ({"state": "failed", "exit_code": 3}, 3),
    ({"state": "failed", "signal": 9}, 137),
    ({"state": "failed", "exit_code": 137}, 137),
    ({"state": "failed", "reason": "exec-failed"}, 1),
    ({"state": "stopped"}, 1),
    ({"state": "failed", "exit_code": 0}, 1),  # not succeeded is never 0
])
def test_exit_code_for(job, code):
    assert common.exit_code_for(job) == code


def test_describe_end():
    assert cli_format.describe_end({"state": "succeeded", "exit_code": 0}) == "succeeded"
    assert cli_format.describe_end({"state": "failed", "exit_code": 3, "reason": "exit-code"}) == \
        "failed (exit code 3)"
    assert cli_format.describe_end({"state": "failed", "signal": 9, "reason": "signal"}) == \
        "failed (signal 9 (SIGKILL))"
    assert cli_format.describe_end({"state": "failed", "reason": "exec-failed", "detail": "not found"}) == \
        "failed (exec-failed: not found)"
    assert cli_format.describe_end({"state": "stopped", "reason": "stopped", "signal": 15,
                             "stopped_by": "bob"}) == "stopped (signal 15 (SIGTERM), stopped by bob)"
    assert cli_format.describe_end({"state": "stopped", "reason": "stopped", "detail": "stopped by bob",
                             "stopped_by": "bob"}) == "stopped (stopped by bob)"
    assert cli_format.describe_end({"state": "running"}) == "running"
    assert cli_format.describe_end({"state": "stopped", "reason": "bound-job-ended", "signal": 15,
                                    "detail": "the job it was bound to ended"}) == \
        "stopped (signal 15 (SIGTERM), bound-job-ended: the job it was bound to ended)"


def test_describe_end_says_stopped_by_once():
    job = {"state": "stopped", "reason": "stopped", "signal": 15, "stopped_by": "alice",
           "detail": "stopped by alice"}
    assert cli_format.describe_end(job) == "stopped (signal 15 (SIGTERM), stopped by alice)"
    longer = dict(job, detail="Stopped by alice; leftover processes could not be counted")
    assert cli_format.describe_end(longer) == \
        "stopped (signal 15 (SIGTERM), Stopped by alice; leftover processes could not be counted)"


def test_without_repeats_keeps_facts_that_only_look_alike():
    assert cli_format.without_repeats(["exit code 1", "exit code 13"]) == ["exit code 1", "exit code 13"]
    assert cli_format.without_repeats(["a b", "x a b y", "a b"]) == ["x a b y"]


# --- stop -------------------------------------------------------------------------------------------


def test_stop_tries_every_id_and_fails_if_any_failed(fake, capsys):
    fake.add_job(id=5)
    fake.add_job(id=6, state="succeeded", ended_at=1.0, exit_code=0)
    fake.add_job(id=8)
    assert run(fake, "stop", "5", "7", "6", "8") == 3  # no such job 7
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["job 5: stopping", "job 6: already ended (succeeded)",
                                         "job 8: stopping"]
    assert one_error_line(captured.err) == "gpujobctl: no job 7: see `gpujobctl list --all`"  # the id once
    assert fake.jobs[5]["state"] == fake.jobs[8]["state"] == "stopped"


def test_stop_all_known_exits_0(fake, capsys):
    fake.add_job(id=5)
    assert run(fake, "stop", "5") == 0
    assert capsys.readouterr().out == "job 5: stopping\n"


def test_stop_gives_up_when_the_daemon_is_unavailable(fake, capsys):
    def unavailable(job_id: int) -> str:
        raise errors.Unavailable("gpujobd is not running or the system bus is unreachable (x): check "
                                 "`systemctl status gpujobd`")

    fake.stop = unavailable
    assert run(fake, "stop", "1", "2", "3") == 5
    assert "systemctl status gpujobd" in one_error_line(capsys.readouterr().err)


# --- list -------------------------------------------------------------------------------------------


def _list_fixture(fake: FakeClient) -> None:
    now = time.time()
    fake.add_job(id=3, name="train", argv=["python", "train.py", "--lr", "0.1"], started_at=now - 125)
    fake.add_job(id=4, state="failed", user="bob", argv=["./run.sh", "a b"], started_at=now - 10,
                 ended_at=now - 5, elapsed_s=5.0, exit_code=3, reason="exit-code")
    fake.add_job(id=12, state="failed", argv=["sleep", "1"], signal=9, reason="signal",
                 elapsed_s=42.0)
    fake.add_job(id=13, state="queued", started_at=None, argv=["x"], name="evil\x1b[2Jname")


def test_list_table(fake, capsys):
    _list_fixture(fake)
    assert run(fake, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "USER", "STATE", "EXIT", "SUBMIT", "START", "ELAPSED", "GPUS", "NAME",
                                "COMMAND"]
    first, second = lines[1].split(), lines[2].split()  # SUBMIT and START: 5 characters each
    assert first[:4] + first[6:] == ["3", "alice", "running", "-", "2min", "5s", "-", "train", "python",
                                     "train.py", "--lr", "0.1"]
    assert second[:4] + second[6:] == ["4", "bob", "failed", "3", "5.0s", "-", "-", "./run.sh", "'a", "b'"]
    assert lines[3].split()[:5] == ["12", "alice", "failed", "sig", "9"] and "  42s  " in lines[3]
    assert "\x1b" not in lines[4] and "evil\\x1b[2Jname" in lines[4]
    assert lines[0].index("STATE") == lines[1].index("running") == lines[2].index("failed")
    assert fake.list_calls == [{"all": False, "user": None, "state": None, "limit": None}]


def test_list_passes_filters(fake, capsys):
    _list_fixture(fake)
    assert run(fake, "list", "--all", "--user", "bob", "--state", "failed", "--limit", "5") == 0
    assert fake.list_calls == [{"all": True, "user": "bob", "state": "failed", "limit": 5}]
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_list_json(fake, capsys):
    _list_fixture(fake)
    assert run(fake, "list", "--json") == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [job["id"] for job in jobs] == [3, 4, 12, 13]
    assert all(list(job) == list(api.JSON_FIELDS) for job in jobs)
    assert jobs[1]["exit_code"] == 3 and jobs[2]["signal"] == 9 and jobs[0]["ended_at"] is None


def test_list_empty_says_so_on_stderr(fake, capsys):
    assert run(fake, "list") == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--all" in captured.err


def test_list_shows_a_loops_runs_in_the_state_column(fake, capsys):
    fake.add_job(id=3, background=True, max_runs=5, runs=3, name="exp1-bg", argv=["python", "eval.py"])
    fake.add_job(id=4, state="failed", background=True, max_runs=5, runs=2, exit_code=1,
                 reason="exit-code", elapsed_s=30.0)
    fake.add_job(id=10, argv=["python", "train.py"])
    assert run(fake, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("STATE")
    assert [line[column:].split("  ")[0] for line in lines[1:]] == ["running 3/5", "failed 2/5", "running"]
    assert lines[0].index("EXIT") == lines[1].index("-") and lines[0].index("EXIT") == lines[2].index("1  ")


def test_list_with_loops_fits_100_columns():
    now = time.time()
    jobs = [{"id": 1234, "user": "alice", "state": "timed-out", "background": True, "max_runs": 100,
             "runs": 99, "signal": 15, "started_at": now - 90000, "name": "sweep-12-bg",
             "argv": ["python", "-m", "experiments.eval", "--checkpoint", "/data/run-42/latest.pt"]}]
    lines = cli_format.format_table(jobs, now, width=100)
    assert all(len(line) <= 100 for line in lines)
    assert "timed-out 99/100" in lines[1]
    assert lines[1].endswith(("python -m experim…", "python -m experim~"))


def test_list_shows_submit_and_start_times_gpus_and_colours_the_state_only_when_asked():
    now = time.mktime((2026, 12, 6, 15, 0, 0, 0, 0, -1))
    job = {"id": 7, "user": "alice", "state": "running", "created_at": now - 3600 * 30,
           "started_at": now - 60, "gpus": ["GPU-a", "GPU-c"], "argv": ["python3", "train.py"]}
    header, row = cli_format.format_table([job], now)
    assert [row[header.index(column):].split()[0] for column in ("SUBMIT", "START", "GPUS")] == \
        ["12-05", "14:59", "2"]  # how many it holds (status names them)
    assert "\033[" not in row
    coloured = cli_format.format_table([job], now, colour=True)[1]
    assert "\033[32mrunning" in coloured and coloured.replace("\033[32m", "").replace("\033[0m", "") == row


def test_table_cuts_the_command_to_the_width():
    job = {"id": 1, "user": "alice", "state": "running", "argv": ["python"] + ["x" * 10] * 20,
           "started_at": time.time()}
    lines = cli_format.format_table([job], time.time(), width=80)
    assert all(len(line) <= 80 for line in lines)
    assert lines[1].endswith(("…", "~"))
    assert len(cli_format.format_table([job], time.time(), width=None)[1]) > 200
    narrow = cli_format.format_table([dict(job, argv=["x"])], time.time(), width=20)
    assert narrow[0].endswith("COMMAND") and narrow[1].endswith("  x")


# --- logs -------------------------------------------------------------------------------------------


def test_logs_prints_what_is_there(fake, capsysbinary):
    fake.add_job(id=5, log=b"one\ntwo\n", script=[b"later\n"])
    assert run(fake, "logs", "5") == 0
    assert capsysbinary.readouterr().out == b"one\ntwo\n"
    assert fake.jobs[5]["state"] == "running"


def test_logs_follow_reads_each_byte_once_from_increasing_offsets(fake, capsysbinary):
    script = [b"a" * 10, b"", b"b\n" * 5, b"c", b"", b"", b"tail\n"]
    fake.add_job(id=5, log=b"start\n", script=script)
    assert run(fake, "logs", "-f", "5") == 0
    expected = b"start\n" + b"".join(script)
    assert capsysbinary.readouterr().out == expected
    offsets = [offset for _job, offset, _n in fake.reads]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for (_, offset, count), (_, next_offset, _) in zip(fake.reads, fake.reads[1:]):
        assert next_offset == offset + count  # each read starts where the last one stopped
    assert sum(count for _job, _offset, count in fake.reads) == len(expected)
    assert fake.jobs[5]["state"] == "succeeded"


def test_logs_follow_of_an_ended_job_reads_to_the_end_and_stops(fake, capsysbinary):
    fake.add_job(id=5, state="failed", log=b"x" * 3000, exit_code=1)
    assert run(fake, "logs", "-f", "5") == 0
    assert capsysbinary.readouterr().out == b"x" * 3000


def test_logs_broken_pipe_is_quiet(fake, capsys, monkeypatch):
    fake.add_job(id=5, log=b"data\n")

    def broken(chunks):
        raise BrokenPipeError

    monkeypatch.setattr(common, "write_chunks", broken)
    assert run(fake, "logs", "5") == errors.EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


# --- status -----------------------------------------------------------------------------------------


def _status_job(fake: FakeClient, tmp_path, log: bytes) -> int:
    now = time.time()
    return fake.add_job(
        id=5, name="train", state="failed", argv=["python", "train.py", "--out", "a b"], cwd="/srv/x",
        env={"A": "1"}, properties={"CPUQuota": "50%"}, started_at=now - 3725, ended_at=now - 5,
        elapsed_s=3720.0, timeout_s=7200.0, exit_code=3, reason="exit-code", leftover_processes=2,
        log=log, log_path=str(tmp_path / "missing.log"),
    )


def test_status_shows_the_fields_and_the_last_10_log_lines(fake, capsys, tmp_path):
    log = b"".join(b"line %d\n" % n for n in range(1, 16))
    _status_job(fake, tmp_path, log)
    assert run(fake, "status", "5") == 0
    out = capsys.readouterr().out
    head, _, tail = out.partition("\n\n")
    lines = head.splitlines()
    assert lines[0] in ("● job 5 (train) - failed (exit code 3)", "* job 5 (train) - failed (exit code 3)")
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines[1:]}
    assert fields["Unit"] == "gpujob-5.scope"
    assert fields["User"] == "alice (uid 1000)"
    assert fields["Command"] == "python train.py --out 'a b'"
    assert fields["Cwd"] == "/srv/x"
    assert fields["Environment"] == "A=1"
    assert fields["Started"].endswith("1h 2min ago")
    assert fields["Ended"].endswith("5.0s ago")
    assert fields["Runtime"] == "1h 2min"
    assert fields["Timeout"] == "2h 0min (reached 51%)"  # 3720 of 7200 s
    assert fields["Exit"] == "3"
    assert fields["Reason"] == "exit-code"
    assert fields["Leftover processes"] == "2"
    assert "Processes" not in fields  # no cgroup here: skipped silently
    assert tail.splitlines() == [f"line {n}" for n in range(6, 16)]


def test_status_lists_the_cgroup_processes(fake, capsys, tmp_path, monkeypatch):
    fake.add_job(id=5)
    scope = tmp_path / "cg" / "gpujob-5.scope"
    (scope / "sub").mkdir(parents=True)
    (scope / "cgroup.procs").write_text("100\n101\n")
    (scope / "sub" / "cgroup.procs").write_text("102\n")
    proc = tmp_path / "proc"
    for pid, cmdline in ((100, b"python\0train.py\0"), (101, b""), (102, b"sh\0-c\0a b\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(cmdline)
    (proc / "101" / "comm").write_bytes(b"kworker\n")
    monkeypatch.setattr(status, "CGROUP_SLICE_DIR", str(tmp_path / "cg"))
    monkeypatch.setattr(status, "PROC_DIR", str(proc))
    assert run(fake, "status", "5") == 0
    out = capsys.readouterr().out
    assert "Processes: 100 python train.py\n" in out
    assert "\n           101 [kworker]\n" in out
    assert "102 sh -c 'a b'" in out


def test_status_finds_the_cgroup_of_a_job_in_another_slice_from_its_supervisor(
        fake, capsys, tmp_path, monkeypatch):
    fake.add_job(id=5, pid=100)
    scope = tmp_path / "cg" / "gpu.slice" / "gpu-a.slice" / "gpujob-5.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("100\n")
    (tmp_path / "proc" / "100").mkdir(parents=True)
    (tmp_path / "proc" / "100" / "cmdline").write_bytes(b"supervisor\0")
    (tmp_path / "proc" / "100" / "cgroup").write_text("0::/gpu.slice/gpu-a.slice/gpujob-5.scope\n")
    monkeypatch.setattr(status, "CGROUP_ROOT", str(tmp_path / "cg"))
    monkeypatch.setattr(status, "CGROUP_SLICE_DIR", str(tmp_path / "cg" / "gpujob.slice"))
    monkeypatch.setattr(status, "PROC_DIR", str(tmp_path / "proc"))
    assert run(fake, "status", "5") == 0
    assert "Processes: 100 supervisor\n" in capsys.readouterr().out


def test_status_reads_only_the_end_of_a_log_it_can_stat(fake, capsys, tmp_path, monkeypatch):
    log = b"".join(b"line %d\n" % n for n in range(1, 1001))
    job_id = _status_job(fake, tmp_path, log)
    (tmp_path / "job.log").write_bytes(log)
    fake.jobs[job_id]["log_path"] = str(tmp_path / "job.log")
    monkeypatch.setattr(cli_format, "TAIL_WINDOW_BYTES", 100)
    assert run(fake, "status", "5") == 0
    tail = capsys.readouterr().out.partition("\n\n")[2]
    assert tail.splitlines() == [f"line {n}" for n in range(991, 1001)]
    assert fake.reads[0][1] == len(log) - 101
    assert sum(count for _job, _offset, count in fake.reads) == 101


def test_status_of_a_log_with_long_lines_shows_no_partial_line(fake, capsys, tmp_path, monkeypatch):
    log = b"x" * 500 + b"\nlast\n"
    job_id = _status_job(fake, tmp_path, log)
    (tmp_path / "job.log").write_bytes(log)
    fake.jobs[job_id]["log_path"] = str(tmp_path / "job.log")
    monkeypatch.setattr(cli_format, "TAIL_WINDOW_BYTES", 100)
    run(fake, "status", "5")
    assert capsys.readouterr().out.partition("\n\n")[2] == "last\n"


def test_status_log_lines_are_made_safe_to_show(fake, capsys, tmp_path):
    _status_job(fake, tmp_path, b"\x1b[32mgreen\x1b[0m\n 10%\r 50%\r100%\nbad \xff byte\n")
    run(fake, "status", "5")
    assert capsys.readouterr().out.partition("\n\n")[2].splitlines() == ["green", "100%", "bad \ufffd byte"]


def test_status_json(fake, capsys, tmp_path):
    _status_job(fake, tmp_path, b"")
    assert run(fake, "status", "5", "--json") == 0
    job = json.loads(capsys.readouterr().out)
    assert list(job) == list(api.JSON_FIELDS)
    assert (job["id"], job["exit_code"], job["timeout_s"]) == (5, 3, 7200.0)


def _loop_job(fake: FakeClient, runs: int, **fields: Any) -> int:
    job_id = fake.add_job(id=7, name="exp1-bg", background=True, max_runs=10, bind_to=4,
                          argv=["python", "eval.py"], **fields)
    now = time.time()
    for number in range(1, runs + 1):
        fake.add_run(job_id, started_at=now - 100 + 10 * number, ended_at=now - 100 + 10 * number + 2.5,
                     exit_code=0 if number % 2 else 1)
    return job_id


def test_status_of_a_loop_shows_its_runs_and_the_last_5(fake, capsys):
    _loop_job(fake, runs=7)
    assert run(fake, "status", "7") == 0
    out = capsys.readouterr().out
    assert fake.runs_calls == [(7, 5)]
    lines = out.splitlines()
    assert any(line.strip() == "Runs: 7 of 10" for line in lines)
    assert any(line.strip() == "Restart delay: 2.0s" for line in lines)
    assert any(line.strip() == "Bound to: job 4" for line in lines)
    start = next(index for index, line in enumerate(lines) if line.strip().startswith("Last runs:"))
    shown = [line.split(":", 1)[1].strip() if index == 0 else line.strip()
             for index, line in enumerate(lines[start:start + 5])]
    assert shown == ["run 3  2.5s  exit code 0", "run 4  2.5s  exit code 1", "run 5  2.5s  exit code 0",
                     "run 6  2.5s  exit code 1", "run 7  2.5s  exit code 0"]
    assert lines[start].index("run 3") == lines[start + 4].index("run 7")  # one aligned column
    assert "Stop on failure" not in out


def test_status_of_a_loop_shows_how_each_run_ended(fake, capsys):
    job_id = fake.add_job(id=7, background=True, max_runs=5, stop_on_failure=True, restart_delay_s=0.0)
    now = time.time()
    fake.add_run(job_id, started_at=now - 100, ended_at=now - 88, exit_code=0)
    fake.add_run(job_id, started_at=now - 80, ended_at=now - 77, signal=9, reason="signal")
    fake.add_run(job_id, started_at=now - 70, ended_at=now - 70, reason="exec-failed",
                 detail="No such file or directory")
    fake.add_run(job_id, started_at=None, ended_at=None, reason="lost", detail="daemon restarted")
    assert run(fake, "status", "7") == 0
    out = capsys.readouterr().out
    assert "Runs: 4 of 5\n" in out and "Stop on failure: yes\n" in out and "Restart delay: 0.0s" in out
    assert "Last runs: run 1   12s  exit code 0\n" in out
    assert "run 2  3.0s  signal 9 (SIGKILL)\n" in out
    assert "run 3  0.0s  exec-failed: No such file or directory\n" in out
    assert "run 4     -  daemon restarted\n" in out
    assert "Bound to" not in out


def test_status_of_a_loop_without_ended_runs(fake, capsys):
    fake.add_job(id=7, background=True, max_runs=5)
    assert run(fake, "status", "7") == 0
    out = capsys.readouterr().out
    assert "Runs: 0 of 5\n" in out and "Last runs" not in out


def test_status_of_a_job_without_a_loop_asks_for_no_runs(fake, capsys):
    fake.add_job(id=7)
    assert run(fake, "status", "7") == 0
    out = capsys.readouterr().out
    assert fake.runs_calls == []
    assert "Runs" not in out and "Timeout" not in out and "Bound to" not in out


def test_status_of_a_bound_job(fake, capsys):
    fake.add_job(id=4)
    fake.add_job(id=5, bind_to=4)
    fake.stop(4)
    assert run(fake, "status", "5") == 0
    out = capsys.readouterr().out
    assert "Bound to: job 4\n" in out
    assert "stopped (signal 15 (SIGTERM), bound-job-ended: the job it was bound to ended)" in out


def test_status_timeout_of_a_running_job_says_how_much_was_used(fake, capsys, monkeypatch):
    now = time.time()
    monkeypatch.setattr("gpujobd.cli.status.time.time", lambda: now)  # however slow the machine
    fake.add_job(id=7, timeout_s=60.0, started_at=now - 58.3)
    assert run(fake, "status", "7") == 0
    assert "Timeout: 1min 0s (reached 97%)\n" in capsys.readouterr().out


@pytest.mark.parametrize("fields, shown", [
    ({"state": "timed-out", "reason": "timeout", "signal": 15, "elapsed_s": 60.0}, "1min 0s (reached 100%)"),
    ({"state": "failed", "reason": "exit-code", "exit_code": 1, "elapsed_s": 59.99}, "1min 0s (reached 99%)"),
    ({"state": "failed", "reason": "oom-kill", "timeout_fraction": 0.25, "elapsed_s": 15.0},
     "1min 0s (reached 25%)"),
    ({"state": "queued", "started_at": None}, "1min 0s"),
])
def test_status_timeout_uses_the_daemons_timeout_fraction(fake, capsys, fields, shown):
    fake.add_job(id=7, timeout_s=60.0, **fields)
    assert run(fake, "status", "7") == 0
    assert f"Timeout: {shown}\n" in capsys.readouterr().out


def test_status_of_a_stopped_job_says_who_stopped_it_once(fake, capsys):
    fake.add_job(id=5)
    fake.stop(5)
    fake.jobs[5]["detail"] = "stopped by alice"  # what gpujobd records
    assert run(fake, "status", "5") == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.endswith("job 5 - stopped (signal 15 (SIGTERM), stopped by alice)")
    assert out.count("stopped by alice") == 1
    assert "Stopped by: alice\n" in out and "Detail:" not in out


def test_status_json_of_a_loop_adds_its_last_runs(fake, capsys):
    _loop_job(fake, runs=7)
    assert run(fake, "status", "7", "--json") == 0
    job = json.loads(capsys.readouterr().out)
    assert list(job) == [*api.JSON_FIELDS, "last_runs"]
    assert (job["background"], job["runs"], job["max_runs"], job["bind_to"]) == (True, 7, 10, 4)
    assert [run_["run"] for run_ in job["last_runs"]] == [3, 4, 5, 6, 7]
    assert list(job["last_runs"][0]) == list(api.RUN_FIELDS)
    assert job["last_runs"][0]["started_at"].endswith("Z")
    assert job["last_runs"][1]["exit_code"] == 1


def test_status_json_of_a_plain_job_is_exactly_the_job(fake, capsys):
    fake.add_job(id=7, timeout_s=100.0, state="failed", elapsed_s=50.0, exit_code=2, reason="exit-code")
    assert run(fake, "status", "7", "--json") == 0
    job = json.loads(capsys.readouterr().out)
    assert list(job) == list(api.JSON_FIELDS)
    assert job["timeout_fraction"] == 0.5
    assert fake.runs_calls == []


def test_last_lines():
    assert cli_format.last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert cli_format.last_lines(b"a\nb\nc", 2) == b"b\nc"
    assert cli_format.last_lines(b"a\nb\n", 5) == b"a\nb\n"
    assert cli_format.last_lines(b"", 3) == b""


# --- wait -------------------------------------------------------------------------------------------


def test_wait_exits_with_the_code_of_the_first_failed_job_in_argument_order(fake, capsys):
    fake.add_job(id=1, ending={"state": "succeeded", "reason": "exit-code", "exit_code": 0})
    fake.add_job(id=2, ending={"state": "failed", "reason": "signal", "signal": 9})
    fake.add_job(id=3, ending={"state": "failed", "reason": "exit-code", "exit_code": 4})
    assert run(fake, "wait", "1", "3", "2") == 4
    assert capsys.readouterr().out.splitlines() == [
        "job 1: succeeded", "job 3: failed (exit code 4)", "job 2: failed (signal 9 (SIGKILL))"]
    assert all(JobState(job["state"]).is_final for job in fake.jobs.values())


def test_wait_all_succeeded_exits_0(fake):
    fake.add_job(id=1)
    fake.add_job(id=2)
    assert run(fake, "wait", "1", "2") == 0


def test_wait_unknown_id_counts_as_a_failure_but_the_rest_are_waited_for(fake, capsys):
    fake.add_job(id=1, ending={"state": "failed", "reason": "exit-code", "exit_code": 5})
    assert run(fake, "wait", "9", "1") == 3  # no such job 9, the first failure
    captured = capsys.readouterr()
    assert one_error_line(captured.err).startswith("gpujobctl: no job 9: ")  # the id once
    assert fake.jobs[1]["state"] == "failed"


def test_wait_json(fake, capsys):
    fake.add_job(id=1)
    assert run(fake, "wait", "--json", "1") == 0
    assert [job["state"] for job in json.loads(capsys.readouterr().out)] == ["succeeded"]


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("error, code", [
    (errors.NotFound("no job 7: see `gpujobctl list --all`"), 3),
    (errors.PermissionDenied("job 7 belongs to bob: only bob or root may stop it"), 4),
    (errors.InvalidArgument("the cwd /x does not exist: give an existing directory"), 2),
    (errors.Unavailable("gpujobd is not running (x): check `systemctl status gpujobd`"), 5),
    (errors.ConfigError("bad config: fix /etc/gpujobd/gpujobd.toml"), 2),
    (errors.Internal("database is locked\nsecond line"), 1),
])
def test_errors_are_one_line_and_map_to_exit_codes(fake, capsys, error, code):
    def failing(job_id: int, **_: Any) -> Dict[str, Any]:
        raise error

    fake.get = failing
    assert run(fake, "status", "7") == code
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == "gpujobctl: " + str(error).replace("\n", " ")
    assert captured.out == ""


def test_unexpected_exception_is_one_line_calling_itself_a_bug(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def broken_factory() -> Any:
        raise KeyError("oops")

    assert cli.main(["list"], client_factory=broken_factory) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "KeyError" in line and "this is a bug: please report it" in line


def test_client_side_invalid_argument_is_a_usage_error(fake, capsys):
    def invalid(*_: Any, **__: Any) -> Dict[str, Any]:
        raise errors.InvalidArgument("environment variable name 'A B' is invalid")

    fake.submit = invalid
    assert run(fake, "submit", "--", "true") == 2
    one_error_line(capsys.readouterr().err)


def test_keyboard_interrupt_during_submit_wait_leaves_the_job_running(fake, capsys, monkeypatch):
    def interrupted(chunks):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "write_chunks", interrupted)
    assert run(fake, "submit", "--wait", "--", "sleep", "100") == 130
    line = one_error_line(capsys.readouterr().err)
    assert "job 1 keeps running" in line and "gpujobctl stop 1" in line


def test_default_factory_builds_a_real_client_without_connecting():
    client = cli.default_client_factory()
    assert isinstance(client, Client)
    assert client.call_timeout_s > 0 and client.follow_poll_interval_s > 0


def test_list_limit_prints_the_newest_first(fake, capsys):
    _list_fixture(fake)
    assert run(fake, "list", "--limit", "3") == 0
    ids = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert ids == ["13", "12", "4"]


def test_list_me_asks_for_the_callers_own_jobs(fake, capsys):
    import os
    import pwd

    _list_fixture(fake)
    assert run(fake, "list", "--me") == 0
    assert fake.list_calls[-1]["user"] == pwd.getpwuid(os.getuid()).pw_name


def test_list_colours_only_a_terminal_without_no_color(monkeypatch):
    from gpujobd.cli import listing

    monkeypatch.setattr(listing.sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert listing.use_colour()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not listing.use_colour()
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr(listing.sys.stdout, "isatty", lambda: False)
    assert not listing.use_colour()


def test_logs_n_prints_the_last_lines_and_follows_from_there(fake, capsys):
    fake.add_job(id=3, state="succeeded", log=b"one\ntwo\nthree\nfour\n")
    assert run(fake, "logs", "-n", "2", "3") == 0
    assert capsys.readouterr().out == "three\nfour\n"
    assert run(fake, "logs", "-n", "0", "3") == 0
    assert capsys.readouterr().out == ""
    fake.add_job(id=4, log=b"a\nb\nc\n", script=[b"d\n"])
    assert run(fake, "logs", "-f", "-n", "1", "4") == 0
    assert capsys.readouterr().out == "c\nd\n"  # the last line, then what came after it, once


@pytest.mark.parametrize("text, seconds", [("1:00:00", 3600.0), ("2-00:00:00", 172800.0), ("1-12", 129600.0),
                                           ("05:30", 330.0), ("1-00:30", 88200.0), ("90", 90.0)])
def test_slurm_durations_are_accepted(text, seconds):
    from gpujobd.shared import text as parse

    assert parse.duration(text) == seconds


@pytest.mark.parametrize("bad", ["1:2:3:4", "a:b", "0:00:00", "-1:00"])
def test_bad_slurm_durations_say_what_is_expected(bad):
    from gpujobd.shared import text as parse

    with pytest.raises(ValueError, match="expected"):
        parse.duration(bad)
