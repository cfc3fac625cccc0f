"""The GPU watcher against the real pynvml, through the NVML double installed as the sandbox's
libnvidia-ml.so.1: strays and their details, attribution to jobs, the kill policy, NVML missing,
failing, losing a GPU and hanging, and the check before a job starts.

The processes are real (sleeps of the test users); the double's script names their PIDs as GPU
processes. A stray is made the way one is left on a real server: an orphan (its parent exited, so it
was reparented to PID 1) outside every unit, here in init.scope.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.integration.conftest import (
    NVML_LIBRARY,
    Ctl,
    NvmlScript,
    daemon_pid,
    install_nvml_library,
    processes_matching,
    remove_nvml_library,
    sh,
    wait_for,
)
from tests.nvml_double.script import Delay, Device, Error, Process

CONFIG = Path("/etc/gpujobd/gpujobd.toml")
UUID0, UUID1 = "GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000"
DEVICES = [Device(uuid=UUID0, memory_used=8 << 30), Device(uuid=UUID1, memory_used=2 << 30)]
GPU_SECTION = """
[daemon]
log_format = "json"

[gpu]
poll_interval_s = 0.2
retry_initial_s = 0.2
retry_max_s = 1.0
nvml_call_timeout_s = 1.0
"""
KILL_SECTION = """stray_policy = "kill"
stray_grace_s = 0.5
stray_kill_min_ticks = 2
stray_kill_users = ["bob"]
stray_kill_orphans_only = true
"""
INIT_SCOPE = Path("/sys/fs/cgroup/init.scope")


# ---------------------------------------------------------------------------------------------------
# Helpers.


def restart_daemon(config_text: str) -> None:
    CONFIG.write_text(config_text)
    old = daemon_pid()
    sh("systemctl", "reset-failed", "gpujobd", check=False)  # these restarts would hit the start limit
    sh("systemctl", "restart", "gpujobd")
    wait_for(lambda: daemon_pid() not in (0, old) and is_active(), "gpujobd to come back")


def is_active() -> bool:
    return sh("systemctl", "is-active", "gpujobd", check=False).stdout.strip() == "active"


@pytest.fixture(scope="module")
def base_config(nvml_double) -> Iterator[str]:
    original = CONFIG.read_text()
    yield original + GPU_SECTION
    restart_daemon(original)


@pytest.fixture
def gpu_daemon(base_config: str, nvml_script: NvmlScript) -> str:
    """gpujobd watching the GPUs every 0.2 s, policy report; the double's script healthy, idle."""
    nvml_script.write(devices=DEVICES)
    if CONFIG.read_text() != base_config:
        restart_daemon(base_config)
    wait_for(lambda: gpus()["available"], "the GPUs to be read")
    return base_config


def gpus(user: str = "alice") -> Dict:
    return json.loads(Ctl()(user, "gpus", "--json", check=True).stdout)


def gpus_until(predicate, what: str, timeout: float = 20.0) -> Dict:
    return wait_for(lambda: (lambda report: report if predicate(report) else None)(gpus()), what, timeout)


def processes(report: Dict) -> List[Dict]:
    return [dict(p, gpu=d["index"]) for d in report["devices"] for p in d["processes"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


class Strays:
    """Processes of the test users outside every unit, killed at the end of the test."""

    def __init__(self) -> None:
        self.pids: List[int] = []
        self.parents: List[subprocess.Popen] = []

    def orphan(self, user: str, marker: int) -> int:
        """A sleep of `user` whose parent has exited (so PID 1 reaped it), moved into init.scope."""
        done = sh("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "sh", "-c",
                  f"sleep {marker} </dev/null >/dev/null 2>&1 & echo $!", cwd="/")
        return self._outside(int(done.stdout.strip()))

    def with_parent(self, user: str, marker: int) -> int:
        """A sleep of `user` whose parent (a shell waiting for it) is alive, moved into init.scope."""
        parent = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "sh",
                                   "-c", f"sleep {marker} </dev/null >/dev/null 2>&1 & echo $!; wait"],
                                  stdout=subprocess.PIPE, text=True, cwd="/")
        self.parents.append(parent)
        return self._outside(int(parent.stdout.readline()))  # type: ignore[union-attr]

    def _outside(self, pid: int) -> int:
        (INIT_SCOPE / "cgroup.procs").write_text(str(pid))
        self.pids.append(pid)
        assert Path(f"/proc/{pid}/cgroup").read_text().splitlines()[-1] == "0::/init.scope"
        return pid

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for parent in self.parents:
            parent.wait(10)


@pytest.fixture
def strays() -> Iterator[Strays]:
    made = Strays()
    yield made
    made.cleanup()


def journal_since(since: float) -> List[Dict]:
    out = sh("journalctl", "-u", "gpujobd", "--no-pager", "-o", "cat", f"--since=@{since:.3f}").stdout
    events = []
    for line in out.splitlines():
        if line.startswith("{"):
            fields = json.loads(line)
            events.append({key: value if isinstance(value, str) else json.dumps(value)
                           for key, value in fields.items()})
    return events


def logged(since: float, event: str, timeout: float = 10.0, **match: object) -> Dict:
    def find() -> Optional[Dict]:
        for fields in journal_since(since):
            if fields["event"] == event and all(fields.get(k) == str(v) for k, v in match.items()):
                return fields
        return None

    return wait_for(find, f"{event} {match} in the journal", timeout)


def job_pid(marker: str) -> int:
    return wait_for(lambda: processes_matching(marker), f"the process `{marker}`")[0]


# ---------------------------------------------------------------------------------------------------
# Report: strays, jobs, clearing.


def test_a_process_outside_every_job_is_reported_stray_with_its_details(gpu_daemon, nvml_script, ctl,
                                                                          strays) -> None:
    since = time.time()
    monitor = subprocess.Popen(["dbus-monitor", "--system", "type='signal',interface='org.gpujobd1.Manager'"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)
        pid = strays.orphan("bob", 4801)
        nvml_script.write(devices=DEVICES, processes=[Process(1, pid, 3 << 30)])
        report = gpus_until(lambda r: r["strays"], "the stray to be reported")
        (stray,) = report["strays"]
        assert (stray["pid"], stray["ppid"], stray["user"]) == (pid, 1, "bob")
        assert stray["command"] == ["sleep", "4801"]
        assert (stray["cgroup"], stray["unit"]) == ("/init.scope", "init.scope")
        assert stray["gpus"] == {UUID1: 3 << 30} and stray["gpu_indexes"] == [1]
        assert stray["used_memory_bytes"] == 3 << 30 and 0 <= stray["age_s"] < 60
        assert stray["started_at"].endswith("Z") and stray["action"] == "report"
        (listed,) = processes(report)
        assert (listed["gpu"], listed["pid"], listed["owner"], listed["user"]) == (1, pid, "stray", "bob")
        text = ctl("alice", "gpus", check=True).stdout
        assert "STRAY" in text and "bob" in text and "sleep 4801" in text and UUID1 in text
        other = ctl.submit("alice", "true")
        status = ctl("alice", "status", str(other))
        assert status.returncode == 0 and f"PID {pid} of bob on GPU 1" in status.stderr
        logged(since, "gpu.stray_found", pid=pid, user="bob")
        # The process ends; NVML stops listing it: the stray clears.
        os.kill(pid, signal.SIGKILL)
        nvml_script.write(devices=DEVICES)
        gpus_until(lambda r: not r["strays"] and not processes(r), "the stray to clear")
        logged(since, "gpu.stray_cleared", pid=pid)
    finally:
        monitor.terminate()
        signals = monitor.communicate(timeout=10)[0]
    assert "member=StrayFound" in signals and "member=StrayCleared" in signals
    assert f"uint32 {pid}" in signals
    assert is_active()


def test_a_pid_nvml_lists_that_is_no_live_process_is_reported_and_never_stray(gpu_daemon, nvml_script,
                                                                              strays) -> None:
    gone = strays.orphan("bob", 4811)
    os.kill(gone, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{gone}").exists(), "the process to be reaped")
    nvml_script.write(devices=DEVICES, processes=[Process(0, gone, 1 << 30), Process(0, 0, 1 << 20),
                                                  Process(1, 4294967295, None)])
    report = gpus_until(lambda r: len(processes(r)) == 3, "three processes")
    assert {p["pid"]: p["owner"] for p in processes(report)} == {gone: "unknown", 0: "unknown",
                                                                4294967295: "unknown"}
    assert report["strays"] == []
    assert all(p["note"] for p in processes(report))


def test_the_same_command_in_a_job_is_the_jobs(gpu_daemon, nvml_script, ctl) -> None:
    job_id = ctl.submit("alice", "sleep", "4802")
    ctl.wait_state("alice", job_id, "running")
    pid = job_pid("sleep 4802")
    nvml_script.write(devices=DEVICES, processes=[Process(0, pid, 5 << 30),
                                                  Process(1, pid, 1 << 30, kind="graphics")])
    report = gpus_until(lambda r: len(processes(r)) == 2, "the job's processes")
    for listed in processes(report):
        assert (listed["owner"], listed["job_id"]) == ("job", job_id)
        assert listed["unit"] == f"gpujob-{job_id}.scope"
        assert listed["user"] == "alice" and listed["command"] == ["sleep", "4802"]
    assert report["strays"] == []
    job = ctl.job("alice", job_id)
    assert job["gpu_memory_bytes"] == {UUID0: 5 << 30, UUID1: 1 << 30}
    assert f"job {job_id}" in ctl("bob", "gpus", check=True).stdout
    ctl("alice", "stop", str(job_id), check=True)
    assert ctl.wait_state("alice", job_id, "stopped")["gpu_memory_bytes"] is None


# ---------------------------------------------------------------------------------------------------
# The kill policy.


def test_the_kill_policy_kills_exactly_what_its_rules_match(base_config, nvml_script, ctl, strays) -> None:
    restart_daemon(base_config + KILL_SECTION)
    since = time.time()
    victim = strays.orphan("bob", 4821)  # matches: bob's, an orphan, outside every unit
    other_user = strays.orphan("alice", 4822)  # alice is not in gpu.stray_kill_users
    has_parent = strays.with_parent("bob", 4823)  # its parent lives: not an orphan
    job_id = ctl.submit("bob", "sleep", "4824")
    ctl.wait_state("bob", job_id, "running")
    in_job = job_pid("sleep 4824")
    sh("systemd-run", "--unit=gpu-test-service", "--uid=bob", "sleep", "4825")
    in_service = job_pid("sleep 4825")
    everyone = [victim, other_user, has_parent, in_job, in_service]
    try:
        nvml_script.write(devices=DEVICES, processes=[Process(i % 2, pid, 1 << 30)
                                                      for i, pid in enumerate(everyone)])
        wait_for(lambda: not alive(victim), "the matching stray to be killed")
        killed = logged(since, "gpu.stray_killed", pid=victim)
        assert killed["method"] == "pidfd" and killed["signal"] == "SIGTERM" and killed["user"] == "bob"
        assert "gpu.stray_kill_users" in killed["rule"] and "parent" in killed["rule"]
        logged(since, "gpu.stray_spared", pid=other_user)
        logged(since, "gpu.stray_spared", pid=has_parent)
        time.sleep(2.0)  # ten more polls: nothing else goes
        for pid in (other_user, has_parent, in_job, in_service):
            assert alive(pid), pid
        killed_pids = [e["pid"] for e in journal_since(since) if e["event"] == "gpu.stray_killed"]
        assert killed_pids == [str(victim)]
        report = gpus()
        owners = {p["pid"]: p["owner"] for p in processes(report)}
        assert owners[in_job] == "job" and owners[in_service] == "unit"
        actions = {s["pid"]: s["action"] for s in report["strays"]}
        assert actions[other_user].startswith("spared: user alice is not in gpu.stray_kill_users")
        assert actions[has_parent].startswith("spared: gpu.stray_kill_orphans_only")
        assert ctl.job("bob", job_id)["state"] == "running"
    finally:
        sh("systemctl", "stop", "gpu-test-service", check=False)
        ctl("bob", "stop", str(job_id))
        nvml_script.write(devices=DEVICES)
        restart_daemon(base_config)


# ---------------------------------------------------------------------------------------------------
# NVML missing, failing, losing a GPU, hanging.


def test_no_driver_at_start_degrades_cleanly_and_recovers(base_config, nvml_script, ctl) -> None:
    nvml_script.remove()
    restart_daemon(base_config)
    report = gpus_until(lambda r: r["state"] == "unavailable", "NVML to be reported unavailable")
    assert report["available"] is False and "Driver Not Loaded" in report["reason"]
    assert report["devices"] == [] and report["retry_in_s"] <= 1.0
    assert "GPUs unavailable: Driver Not Loaded" in ctl("alice", "gpus", check=True).stdout
    assert is_active()
    job_id = ctl.submit("alice", "true")
    assert ctl.wait_state("alice", job_id, "succeeded")["state"] == "succeeded"
    nvml_script.write(devices=DEVICES)
    report = gpus_until(lambda r: r["available"], "NVML to recover")
    assert [d["uuid"] for d in report["devices"]] == [UUID0, UUID1]


def test_no_library_degrades_cleanly_and_recovers_without_a_restart(base_config, nvml_script,
                                                                    nvml_double) -> None:
    nvml_script.write(devices=DEVICES)
    remove_nvml_library()
    try:
        restart_daemon(base_config)
        report = gpus_until(lambda r: r["state"] == "unavailable", "NVML to be reported unavailable")
        assert "NVML Shared Library Not Found" in report["reason"]
        pid = daemon_pid()
    finally:
        install_nvml_library(nvml_double)
    gpus_until(lambda r: r["available"], "NVML to be found")
    assert daemon_pid() == pid and NVML_LIBRARY.exists()


def test_nvml_failing_mid_run_degrades_cleanly_and_recovers(gpu_daemon, nvml_script) -> None:
    since = time.time()
    nvml_script.write(devices=DEVICES, errors=[Error("*", "nvmlDeviceGetCount", "UNKNOWN")])
    report = gpus_until(lambda r: not r["available"], "NVML to fail")
    assert report["state"] == "unavailable" and "Unknown Error" in report["reason"]
    logged(since, "gpu.unavailable")
    assert is_active()
    nvml_script.write(devices=DEVICES)
    gpus_until(lambda r: r["available"] and len(r["devices"]) == 2, "NVML to recover")
    logged(since, "gpu.available")


def test_a_lost_gpu_is_reported_lost_and_the_other_is_fine(gpu_daemon, nvml_script, strays) -> None:
    pid = strays.orphan("bob", 4831)
    nvml_script.write(devices=DEVICES, processes=[Process(0, pid, 1 << 30)],
                      errors=[Error(1, "nvmlDeviceGetMemoryInfo", "GPU_IS_LOST"),
                              Error(0, "nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED")])
    report = gpus_until(lambda r: r["available"] and r["devices"][1]["state"] == "lost", "GPU 1 lost")
    gpu0, gpu1 = report["devices"]
    assert gpu0["state"] == "ok" and gpu0["utilization_gpu_percent"] is None and gpu0["errors"] == {}
    assert "GPU is lost" in gpu1["errors"]["device"]
    assert [s["pid"] for s in report["strays"]] == [pid]


def test_a_hung_nvml_call_is_reported_and_never_blocks_the_daemon(gpu_daemon, nvml_script, ctl) -> None:
    nvml_script.write(devices=DEVICES, delays=[Delay("*", "nvmlDeviceGetComputeRunningProcesses", 4000)])
    report = gpus_until(lambda r: r["state"] == "hung", "the hung call to be reported", timeout=10)
    assert report["reason"].startswith("nvml call hung: nvmlDeviceGetComputeRunningProcesses")
    started = time.monotonic()
    ctl("alice", "gpus", check=True)
    job_id = ctl.submit("alice", "true")
    ctl.wait_state("alice", job_id, "succeeded")
    assert time.monotonic() - started < 3.0, "the daemon answered while NVML hung"
    nvml_script.write(devices=DEVICES)
    gpus_until(lambda r: r["available"], "the watcher to recover after the call returned", timeout=20)


# ---------------------------------------------------------------------------------------------------
# The check before a job starts.


def test_refuse_and_wait_before_a_job_starts(gpu_daemon, nvml_script, ctl, strays) -> None:
    pid = strays.orphan("bob", 4841)
    nvml_script.write(devices=DEVICES, processes=[Process(0, pid, 3 << 30)])
    gpus_until(lambda r: r["strays"], "the stray")
    refused = ctl("alice", "submit", "--gpu-check", "refuse", "--env", "CUDA_VISIBLE_DEVICES=0", "--", "true")
    assert refused.returncode == 6  # refused by the server's policy
    for fragment in (f"PID {pid}", "bob", "`sleep 4841`", "GPU 0", "3.0 GiB"):
        assert fragment in refused.stderr, (fragment, refused.stderr)
    other_gpu = ctl.submit("alice", "true",
                           opts=["--gpu-check", "refuse", "--env", f"CUDA_VISIBLE_DEVICES={UUID1}"])
    assert ctl.wait_state("alice", other_gpu, "succeeded")["state"] == "succeeded"
    waiting = ctl.submit("alice", "sh", "-c", "echo ran", opts=["--gpu-check", "wait"])
    time.sleep(1.0)
    assert ctl.job("alice", waiting)["state"] == "queued"
    os.kill(pid, signal.SIGKILL)
    nvml_script.write(devices=DEVICES)
    assert ctl.wait_state("alice", waiting, "succeeded")["state"] == "succeeded"
    assert ctl("alice", "logs", str(waiting), check=True).stdout == "ran\n"
