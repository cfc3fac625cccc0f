"""Job lifecycle against the real service: submit, run as the user, log, stop, end, survive a crash."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Deque, Dict, Iterator, List

import pytest

from tests.integration.conftest import (
    daemon_pid,
    processes_matching,
    scope_pids,
    sh,
    wait_for,
)
from tests.integration.test_gpu import CONFIG, restart_daemon

ESCAPES = (
    "setsid sleep 4101 & "  # a new session
    "(sleep 4102 &) ; "  # a double fork: reparented away from the shell
    "nohup sleep 4103 >/dev/null 2>&1 & "  # SIGHUP-immune
    "sh -c 'trap \"\" TERM; while :; do sleep 0.2; done; : 4104' & "  # ignores SIGTERM
    "echo started; wait"
)


def test_runs_as_the_submitting_user_with_a_clean_environment(ctl):
    job_id = ctl.submit("alice", "sh", "-c",
                        "id -u; id -G; pwd; echo HOME=$HOME; echo NOTIFY=${NOTIFY_SOCKET:-none}; "
                        "echo X=$X; grep CapEff /proc/self/status; ls /proc/self/fd | wc -l; exit 3",
                        opts=["--env", "X=1 2"])
    job = ctl.wait_state("alice", job_id, "failed")
    out = ctl("alice", "logs", str(job_id), check=True).stdout.splitlines()
    uid = sh("id", "-u", "alice").stdout.strip()
    assert out[0] == uid
    assert out[1].split() == sh("id", "-G", "alice").stdout.split()
    assert out[2] == "/home/alice" and out[3] == "HOME=/home/alice"
    assert out[4] == "NOTIFY=none"  # nothing of the daemon's environment
    assert out[5] == "X=1 2"
    assert out[6].split()[1] == "0000000000000000"  # no capabilities
    assert out[7].strip() == "4"  # 0, 1, 2 and the fd `ls` opened for /proc/self/fd
    assert (job["exit_code"], job["signal"], job["reason"]) == (3, None, "exit-code")
    assert job["user"] == "alice" and job["unit"] == f"gpujob-{job_id}.scope"
    assert job["started_at"] and job["ended_at"] and job["elapsed_s"] is not None


def test_exit_137_is_not_sigkill(ctl):
    exited = ctl.submit("alice", "sh", "-c", "exit 137")
    killed = ctl.submit("alice", "sh", "-c", "kill -KILL $$")
    exited_job = ctl.wait_state("alice", exited, "failed")
    killed_job = ctl.wait_state("alice", killed, "failed")
    assert (exited_job["exit_code"], exited_job["signal"], exited_job["reason"]) == (137, None, "exit-code")
    assert (killed_job["exit_code"], killed_job["signal"], killed_job["reason"]) == (None, 9, "signal")


def test_stop_leaves_zero_processes_whatever_they_tried(ctl):
    job_id = ctl.submit("alice", "sh", "-c", ESCAPES)
    unit = f"gpujob-{job_id}.scope"
    wait_for(lambda: len(scope_pids(unit)) >= 6, "the escape attempts to be running")
    assert processes_matching("sleep 4101") and processes_matching("sleep 4102")
    done = ctl("alice", "stop", str(job_id), check=True)
    assert "stopping" in done.stdout
    job = ctl.wait_state("alice", job_id, "stopped")
    assert job["reason"] == "stopped" and job["stopped_by"] == "alice"
    for marker in ("sleep 4101", "sleep 4102", "sleep 4103", "4104"):
        assert processes_matching(marker) == [], marker
    assert scope_pids(unit) == []
    again = ctl("alice", "stop", str(job_id))
    assert again.returncode == 0 and "already ended" in again.stdout


def test_leftovers_of_a_finished_command_are_killed_and_counted(ctl):
    job_id = ctl.submit("alice", "sh", "-c", "setsid sleep 4201 & (sleep 4202 &); sleep 0.3; exit 0")
    job = ctl.wait_state("alice", job_id, "succeeded", "failed")
    assert job["state"] == "succeeded" and job["leftover_processes"] == 2
    assert processes_matching("sleep 4201") == [] and processes_matching("sleep 4202") == []


def test_a_command_that_left_nothing_ends_with_its_supervisor_and_no_stop(ctl):
    """The supervisor counted no leftover: the scope ends as the supervisor exits, and the daemon
    asks systemd for no stop job (systemd's JobNew names every job it queues for the unit)."""
    from jeepney import DBusAddress, MatchRule, new_method_call
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    rule = MatchRule(type="signal", interface="org.freedesktop.systemd1.Manager", member="JobNew")
    signals: Deque = collections.deque()
    with open_dbus_connection(bus="SYSTEM") as con, con.filter(rule, queue=signals):
        con.send_and_get_reply(message_bus.AddMatch(rule), timeout=10)
        job_id = ctl.submit("alice", "sh", "-c", "echo done")
        job = ctl.wait_state("alice", job_id, "succeeded", "failed")
        # systemd's reply comes after every signal it sent before it: all of the job's are in.
        systemd = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                              interface="org.freedesktop.DBus.Peer")
        con.send_and_get_reply(new_method_call(systemd, "Ping"), timeout=10)
    assert job["state"] == "succeeded" and job["leftover_processes"] == 0
    jobs_of_unit = [message.body for message in signals if message.body[2] == job["unit"]]
    assert len(jobs_of_unit) == 1, f"systemd queued {jobs_of_unit} for {job['unit']}: its start only"


def test_other_users_are_refused_and_admins_are_not(ctl):
    job_id = ctl.submit("alice", "sleep", "4301")
    ctl.wait_state("alice", job_id, "running")
    for verb in (["stop", str(job_id)], ["logs", str(job_id)]):
        refused = ctl("bob", *verb)
        assert refused.returncode == 4  # permission denied
        assert "belongs to alice" in refused.stderr, refused.stderr
    assert ctl.job("bob", job_id)["state"] == "running"  # metadata is visible, like squeue
    assert "env" not in ctl.job("bob", job_id) or ctl.job("bob", job_id)["env"] in (None, {})
    ctl("carol", "logs", str(job_id), check=True)
    ctl("carol", "stop", str(job_id), check=True)
    assert ctl.wait_state("alice", job_id, "stopped")["stopped_by"] == "carol"


def test_logs_of_two_noisy_jobs_never_mix(ctl):
    script = "i=0; while [ $i -lt 3000 ]; do echo {tag}-$i; i=$((i+1)); done"
    first = ctl.submit("alice", "sh", "-c", script.format(tag="AAA"))
    second = ctl.submit("bob", "sh", "-c", script.format(tag="BBB"))
    ctl.wait_state("alice", first, "succeeded")
    ctl.wait_state("bob", second, "succeeded")
    a_lines = ctl("alice", "logs", str(first), check=True).stdout.splitlines()
    b_lines = ctl("bob", "logs", str(second), check=True).stdout.splitlines()
    assert a_lines == [f"AAA-{i}" for i in range(3000)]
    assert b_lines == [f"BBB-{i}" for i in range(3000)]


def test_logs_follow_reads_to_the_end(ctl):
    job_id = ctl.submit("alice", "sh", "-c", "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done")
    followed = ctl("alice", "logs", "-f", str(job_id), check=True, timeout=30)
    assert followed.stdout.split() == [f"line{i}" for i in range(1, 6)]


def test_submit_wait_exits_with_the_jobs_code(ctl):
    done = ctl("alice", "submit", "--wait", "--", "sh", "-c", "echo out; exit 5")
    assert done.returncode == 5
    assert "out" in done.stdout
    ok = ctl("alice", "submit", "--wait", "--json", "--", "true")
    assert ok.returncode == 0 and json.loads(ok.stdout)["state"] == "succeeded"


def test_wait_for_several_jobs(ctl):
    quick = ctl.submit("alice", "true")
    failing = ctl.submit("alice", "sh", "-c", "sleep 0.3; exit 4")
    done = ctl("alice", "wait", str(quick), str(failing), timeout=30)
    assert done.returncode == 4


def test_bad_input_gets_clear_errors_and_loses_nothing(ctl):
    before = len(json.loads(ctl("alice", "list", "--all", "--json", check=True).stdout))
    empty = ctl("alice", "submit", "--")
    assert empty.returncode == 2 and "command" in empty.stderr
    prop = ctl("alice", "submit", "--property", "Nice=5", "--", "true")
    assert prop.returncode == 2 and "Nice" in prop.stderr and "allowed" in prop.stderr
    bad_value = ctl("alice", "submit", "--property", "MemoryMax=lots", "--", "true")
    assert bad_value.returncode == 2 and "MemoryMax" in bad_value.stderr
    unknown = ctl("alice", "status", "999999")
    assert unknown.returncode == 3 and "no job 999999" in unknown.stderr  # no such job
    assert "Traceback" not in empty.stderr + prop.stderr + unknown.stderr
    after = len(json.loads(ctl("alice", "list", "--all", "--json", check=True).stdout))
    assert after == before  # nothing was half-created


def test_a_command_that_cannot_run_fails_with_its_reason(ctl):
    missing = ctl.submit("alice", "no-such-command-xyz")
    job = ctl.wait_state("alice", missing, "failed")
    assert job["reason"] == "exec-failed" and "no-such-command-xyz" in job["detail"]
    sh("install", "-d", "-m", "0700", "/root/private-dir")
    locked = ctl.submit("alice", "true", opts=["--cwd", "/root/private-dir"])
    job = ctl.wait_state("alice", locked, "failed")
    assert job["reason"] == "chdir-failed"


def test_malformed_dbus_calls_are_refused_by_name(gpujobd_service):
    call = ["busctl", "--system", "call", "org.gpujobd1", "/org/gpujobd1", "org.gpujobd1.Manager"]
    unknown_field = sh(*call, "--", "Submit", "a{sv}", "2", "argv", "as", "1", "true", "bogus", "s", "x",
                       check=False)
    assert unknown_field.returncode != 0 and "bogus" in unknown_field.stderr
    wrong_type = sh(*call, "--", "Submit", "a{sv}", "2", "argv", "s", "true", "cwd", "s", "/", check=False)
    assert wrong_type.returncode != 0 and "argv" in wrong_type.stderr
    no_such = sh(*call, "Get", "t", "123456789", check=False)
    assert no_such.returncode != 0 and "no job" in no_such.stderr
    oversized = sh(*call, "--", "Submit", "a{sv}", "2", "argv", "as", "5000", *(["x"] * 5000),
                   "cwd", "s", "/", check=False)
    assert oversized.returncode != 0 and "at most 4096" in oversized.stderr
    as_alice = ["runuser", "-u", "alice", "--", "busctl", "--system", "call", "org.gpujobd1",
                "/org/gpujobd1", "org.freedesktop.DBus.Properties", "Set", "ssv", "org.gpujobd1.Manager",
                "Version", "s", "9"]
    undeclared = sh(*as_alice, check=False)
    assert undeclared.returncode != 0 and "denied" in undeclared.stderr.lower()
    assert sh("systemctl", "is-active", "gpujobd").stdout.strip() == "active"


def test_the_api_is_introspectable_with_busctl(gpujobd_service):
    out = sh("busctl", "--system", "introspect", "org.gpujobd1", "/org/gpujobd1",
             "org.gpujobd1.Manager").stdout
    for member in (".Submit", ".Stop", ".Get", ".List", ".ReadLog", ".JobChanged", ".Version"):
        assert member in out


def test_resource_properties_reach_the_scope(ctl):
    job_id = ctl.submit("alice", "sleep", "4801", opts=["--property", "MemoryMax=1G",
                                                       "--property", "CPUQuota=50%"])
    ctl.wait_state("alice", job_id, "running")
    shown = sh("systemctl", "show", f"gpujob-{job_id}.scope", "-p", "MemoryMax",
               "-p", "CPUQuotaPerSecUSec").stdout
    assert "MemoryMax=1073741824" in shown and "CPUQuotaPerSecUSec=500ms" in shown
    ctl("alice", "stop", str(job_id), check=True)


def test_job_scopes_live_outside_the_service_and_are_not_bound_to_it(ctl):
    job_id = ctl.submit("alice", "sleep", "4401")
    ctl.wait_state("alice", job_id, "running")
    unit = f"gpujob-{job_id}.scope"
    procs = Path("/sys/fs/cgroup/system.slice/gpujobd.service/cgroup.procs")
    # The daemon and its supervisor zygote, nothing of the job: a supervisor is started straight
    # into the job's scope's PIDs, and never lingers in the service.
    def two() -> List[str]:
        pids = procs.read_text().split()
        return pids if len(pids) == 2 else []

    service_procs = wait_for(two, "the daemon and the zygote in the service's cgroup")
    others = [pid for pid in service_procs if pid != str(daemon_pid())]
    assert len(service_procs) == 2 and len(others) == 1
    assert b"--zygote" in Path(f"/proc/{others[0]}/cmdline").read_bytes()
    assert Path(f"/proc/{others[0]}/stat").read_text().rpartition(")")[2].split()[1] == str(daemon_pid())
    in_scope = scope_pids(unit)
    assert in_scope and not {int(pid) for pid in others} & set(in_scope)
    props = sh("systemctl", "show", unit, "-p", "PartOf", "-p", "BindsTo", "-p", "Slice").stdout
    assert "gpujobd.service" not in props and "Slice=gpujob.slice" in props
    ctl("alice", "stop", str(job_id), check=True)
    ctl.wait_state("alice", job_id, "stopped")


def test_timeout_kills_the_whole_job(ctl):
    job_id = ctl.submit("alice", "sh", "-c", "trap '' TERM; setsid sleep 4501 & sleep 4502",
                        opts=["--timeout", "1"])
    job = ctl.wait_state("alice", job_id, "timed-out", timeout=30)
    assert job["reason"] == "timeout"
    assert processes_matching("sleep 4501") == [] and processes_matching("sleep 4502") == []


def test_daemon_reload_and_service_restart_never_touch_a_job(ctl):
    job_id = ctl.submit("alice", "sleep", "4651")
    ctl.wait_state("alice", job_id, "running")
    sh("systemctl", "daemon-reload")  # systemd re-announces every unit: UnitRemoved, then loaded again
    time.sleep(0.5)
    assert ctl.job("alice", job_id)["state"] == "running"
    sh("systemctl", "restart", "gpujobd")
    assert ctl.job("alice", job_id)["state"] == "running"
    assert processes_matching("sleep 4651")
    ctl("alice", "stop", str(job_id), check=True)
    assert ctl.wait_state("alice", job_id, "stopped")["reason"] == "stopped"


def test_daemon_killed_mid_job_loses_nothing(ctl):
    gate = Path(tempfile.mkdtemp(prefix="gpujobd-gate-", dir="/tmp"))  # the sandbox's own /tmp
    gate.chmod(0o755)  # alice's job looks in it
    release = gate / "release"
    try:
        running = ctl.submit("alice", "sleep", "4601")
        ends_while_down = ctl.submit("alice", "sh", "-c",
                                     f"until [ -e {release} ]; do sleep 0.05; done; exit 7")
        ctl.wait_state("alice", running, "running")
        ctl.wait_state("alice", ends_while_down, "running")
        os.kill(daemon_pid(), signal.SIGKILL)
        sh("systemctl", "stop", "gpujobd")  # hold it down (no automatic restart) until started below
        assert not _daemon_active()
        assert processes_matching("sleep 4601"), "a job died with the daemon"
        assert processes_matching(str(release)), "the gated job died with the daemon"
        release.touch()  # the job ends now, while no daemon runs
        wait_for(lambda: not scope_pids(f"gpujob-{ends_while_down}.scope"), "the released job to end")
        assert not _daemon_active(), "the daemon came back before the job ended"
        sh("systemctl", "start", "gpujobd")
    finally:
        shutil.rmtree(gate, ignore_errors=True)
        sh("systemctl", "start", "gpujobd")  # already up unless an assertion above failed
    ended = ctl.wait_state("alice", ends_while_down, "failed")
    assert (ended["exit_code"], ended["reason"]) == (7, "exit-code")
    assert ctl.job("alice", running)["state"] == "running"
    ctl("alice", "stop", str(running), check=True)
    assert ctl.wait_state("alice", running, "stopped")["reason"] == "stopped"
    assert processes_matching("sleep 4601") == []
    newer = ctl.submit("alice", "true")
    assert newer > ends_while_down  # ids are never reused


def _daemon_active() -> bool:
    return sh("systemctl", "is-active", "gpujobd", check=False).stdout.strip() == "active"



def wait_all_ended(ctl, tasks: List[int], timeout: float) -> Dict[int, Dict]:
    """alice's jobs `tasks`, once every one of them is in a final state."""
    def ended() -> object:
        jobs = json.loads(ctl("alice", "list", "--all", "--json", check=True).stdout)
        mine = {job["id"]: job for job in jobs if job["id"] in tasks}
        done = all(job["state"] in ("succeeded", "failed", "stopped", "timed-out", "lost")
                   for job in mine.values())
        return mine if len(mine) == len(tasks) and done else None

    return wait_for(ended, f"the {len(tasks)} tasks to end", timeout=timeout)


BUS_LIMITS = Path("/etc/dbus-1/system.d/zz-gpujobd-test-pending-replies.conf")
PENDING_REPLIES_MAX = 16  # dbus-daemon's max_replies_per_connection in this test (default: 128)
CALLS_IN_FLIGHT_MAX = 8  # gpujobd's daemon.systemd_calls_in_flight_max in this test


@pytest.fixture
def few_pending_replies(ctl) -> Iterator[None]:
    """A bus that lets each connection have only 16 unanswered calls (the default 128 is reached
    only while systemd falls behind, as in a 1,000-job burst on a busy machine), and gpujobd set to
    keep 8 in flight."""
    original = CONFIG.read_text()
    assert "[daemon]" not in original
    BUS_LIMITS.write_text('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" '
                          '"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n<busconfig>'
                          f'<limit name="max_replies_per_connection">{PENDING_REPLIES_MAX}</limit>'
                          '</busconfig>\n')
    try:
        reload_bus_config()
        restart_daemon(f"{original}\n[daemon]\nsystemd_calls_in_flight_max = {CALLS_IN_FLIGHT_MAX}\n")
        yield
    finally:
        BUS_LIMITS.unlink()
        reload_bus_config()
        restart_daemon(original)


def reload_bus_config() -> None:
    sh("busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
       "ReloadConfig")


def test_three_hundred_scopes_asked_for_at_once_all_start(ctl, few_pending_replies):
    """An array of 300 is 300 StartTransientUnit calls in one turn of the daemon's loop, far more than
    the bus lets one connection have unanswered (then LimitsExceeded, and the job would end
    start-failed): the daemon paces its calls to systemd (daemon.systemd_calls_in_flight_max)."""
    submitted = ctl("alice", "submit", "--array", "0-299", "--", "true", check=True)
    tasks = [int(line) for line in submitted.stdout.split()]
    assert len(tasks) == 300

    jobs = wait_all_ended(ctl, tasks, timeout=120)
    bad = [(job["id"], job["state"], job.get("detail")) for job in jobs.values()
           if job["state"] != "succeeded"]
    assert not bad, f"{len(bad)} tasks did not succeed, e.g. {bad[:3]}"


@pytest.fixture
def few_unit_rules(ctl) -> Iterator[None]:
    """gpujobd allowed only 4 match rules of its own: past them it falls back to one rule for all units."""
    original = CONFIG.read_text()
    assert "[daemon]" not in original
    try:
        restart_daemon(f"{original}\n[daemon]\nunit_match_rules_max = 4\n")
        yield
    finally:
        restart_daemon(original)


def test_jobs_end_recorded_while_the_daemon_switches_to_the_broad_rule_and_back(ctl, few_unit_rules):
    """60 tasks at once, 4 own rules: the broad PropertiesChanged subscription comes and goes many
    times while scopes start and end, and no job's end may be lost in a switch."""
    since = sh("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    submitted = ctl("alice", "submit", "--array", "0-59", "--", "sh", "-c",
                    "sleep 0.$((GPUJOB_ARRAY_INDEX % 5))", check=True)
    tasks = [int(line) for line in submitted.stdout.split()]
    assert len(tasks) == 60

    jobs = wait_all_ended(ctl, tasks, timeout=60)
    journal = sh("journalctl", "-u", "gpujobd", "--since", since, "--no-pager").stdout
    assert "systemd.unit_rules_full" in journal  # the fallback did engage
    assert [job["id"] for job in jobs.values() if job["state"] != "succeeded"] == []
