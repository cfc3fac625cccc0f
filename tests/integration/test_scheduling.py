"""The queue against real systemd, through the NVML double with four GPUs: exclusive allocation,
CUDA_VISIBLE_DEVICES, the device cgroup (fake /dev/nvidiaN nodes in the sandbox's private /dev: an
allowed open fails ENXIO, a denied one EPERM), queue order, caps, dependencies, arrays, resubmit,
drain, and a randomized run with kill -9 of the daemon.
"""

from __future__ import annotations

import json
import os
import random
import stat
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.integration.conftest import Ctl, NvmlScript, daemon_pid, sh, wait_for
from tests.integration.test_gpu import CONFIG, restart_daemon
from tests.nvml_double.script import Device

UUIDS = [f"GPU-{n}{n}{n}{n}{n}{n}{n}{n}-0000-0000-0000-00000000000{n}" for n in range(4)]
# Minor numbers differ from indexes, as they may on a real server: the device cgroup must use minors.
MINORS = [3, 2, 1, 0]
DEVICES = [Device(uuid=uuid, minor=minor) for uuid, minor in zip(UUIDS, MINORS)]
FINAL = ("succeeded", "failed", "stopped", "timed-out", "lost")
HANG_S = 120.0  # not a timing: a run that has not ended by then is stuck
SCHED_SECTION = """
[daemon]
log_format = "json"

[gpu]
poll_interval_s = 1.0
retry_initial_s = 0.2
retry_max_s = 1.0
nvml_call_timeout_s = 1.0

[scheduler]
max_jobs_per_user = 0
"""
# A job that reports what it may open, then waits for a file to appear (so tests end it when they like).
PROBE = """
import errno, os, sys, time
print("CVD=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
print("ARRAY=" + os.environ.get("GPUJOB_ARRAY_INDEX", "-"))
for name in ["nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl"]:
    try:
        os.close(os.open("/dev/" + name, os.O_RDWR))
        print(name, "OPENED")
    except OSError as err:
        print(name, errno.errorcode[err.errno])
sys.stdout.flush()
while len(sys.argv) > 1 and not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def sched_daemon(nvml_double) -> Iterator[str]:
    original = CONFIG.read_text()
    config = original + SCHED_SECTION
    NvmlScript().write(devices=DEVICES)
    for name, minor in [(f"nvidia{n}", n) for n in range(4)] + [("nvidiactl", 255)]:
        node = Path("/dev") / name  # the sandbox's private /dev: nothing appears on the host
        if not node.exists():
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
        os.chmod(node, 0o666)  # as the driver makes them: the device cgroup alone fences them
    restart_daemon(config)
    wait_for(lambda: json.loads(Ctl()("alice", "gpus", "--json", check=True).stdout)["available"],
             "the GPUs to be read")
    yield config
    NvmlScript().remove()
    restart_daemon(original)


@pytest.fixture
def probe() -> Path:
    path = Path("/home/alice/probe.py")
    path.write_text(PROBE)
    os.chmod(path, 0o644)
    return path


def release_file(name: str) -> str:
    """A path jobs of alice and bob can wait for; creating it lets them end."""
    directory = Path("/srv/sched-flags")
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o777)
    path = directory / name
    path.unlink(missing_ok=True)
    return str(path)


def log_of(ctl: Ctl, user: str, job_id: int) -> str:
    return ctl(user, "logs", str(job_id), check=True).stdout


def probe_result(ctl: Ctl, user: str, job_id: int) -> Dict[str, str]:
    text = wait_for(lambda: (lambda t: t if "nvidiactl" in t else None)(log_of(ctl, user, job_id)),
                    f"job {job_id}'s probe output")
    result = {}
    for line in text.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            result[key] = value
        elif " " in line:
            key, _, value = line.partition(" ")
            result[key] = value
    return result


def submit_all(ctl: Ctl, user: str, *args: str) -> List[int]:
    return [int(line) for line in ctl(user, "submit", *args, check=True).stdout.split()]


def test_gpus_are_exclusive_seen_by_uuid_and_fenced_by_the_device_cgroup(sched_daemon, ctl,
                                                                         probe) -> None:
    done = release_file("exclusive")
    a = ctl.submit("alice", "python3", str(probe), done, opts=["--gpus", "2"])
    b = ctl.submit("bob", "python3", str(probe), done, opts=["--gpus", "2"])
    plain = ctl.submit("alice", "python3", str(probe), opts=[])
    waiting = ctl.submit("bob", "true", opts=["--gpus", "1"])
    ja, jb = ctl.wait_state("alice", a, "running"), ctl.wait_state("bob", b, "running")
    assert len(ja["gpus"]) == 2 and len(jb["gpus"]) == 2 and not set(ja["gpus"]) & set(jb["gpus"])
    queued = ctl.job("bob", waiting)
    assert queued["state"] == "queued" and queued["gpus"] == [] and queued["position"] == 1
    assert "held by jobs" in queued["waiting_for"]
    for job_id, job, user in ((a, ja, "alice"), (b, jb, "bob")):
        seen = probe_result(ctl, user, job_id)
        assert seen["CVD"] == ",".join(job["gpus"])
        own = {f"nvidia{MINORS[UUIDS.index(uuid)]}" for uuid in job["gpus"]}
        for name in ("nvidia0", "nvidia1", "nvidia2", "nvidia3"):
            assert seen[name] == ("ENXIO" if name in own else "EPERM"), (job_id, name, seen)
        assert seen["nvidiactl"] == "ENXIO"
    seen = probe_result(ctl, "alice", plain)
    assert seen["CVD"] == "" and all(seen[f"nvidia{n}"] == "EPERM" for n in range(4))
    ctl("alice", "stop", str(a), check=True)
    started = ctl.wait_state("bob", waiting, "starting", "running", "succeeded")
    assert started["gpus"][0] in ja["gpus"], "a freed GPU went to the queued job"
    Path(done).touch()
    ctl.wait_state("bob", b, "succeeded")


def test_queue_order_priority_and_dependencies(sched_daemon, ctl) -> None:
    ctl("carol", "drain", check=True)
    try:
        assert ctl("alice", "undrain").returncode == 4, "only admins undrain"
        first = ctl.submit("alice", "sh", "-c", "exit 3")
        low = ctl.submit("alice", "true", opts=["--priority", "-5"])
        after_ok = ctl.submit("alice", "true", opts=["--after", str(first)])
        after_any = ctl.submit("alice", "true", opts=["--after-any", str(first)])
        assert ctl("alice", "submit", "--priority", "3", "--", "true").returncode == 2
        listed = {job["id"]: job for job in json.loads(ctl("alice", "list", "--json", check=True).stdout)}
        assert listed[first]["position"] < listed[low]["position"]
        assert listed[after_ok]["waiting_for"] == f"job {first} to succeed"
        assert "undrained" in listed[first]["waiting_for"]
    finally:
        ctl("carol", "undrain", check=True)
    ctl.wait_state("alice", first, "failed")
    failed = ctl.wait_state("alice", after_ok, "failed")
    assert failed["reason"] == "dependency-failed" and failed["started_at"] is None
    assert ctl.wait_state("alice", after_any, "succeeded")["started_at"] is not None
    ctl.wait_state("alice", low, "succeeded")
    assert ctl("alice", "submit", "--after", "999999", "--", "true").returncode == 2


def test_an_array_runs_k_at_once_each_with_its_index(sched_daemon, ctl) -> None:
    tasks = submit_all(ctl, "alice", "--array", "0-5%2", "--gpus", "1", "--",
                       "sh", "-c", "echo index=$GPUJOB_ARRAY_INDEX; sleep 0.3")
    assert len(tasks) == 6
    most = 0
    while True:  # one List call is one moment of the daemon's state
        listed = json.loads(ctl("alice", "list", "--json", check=True).stdout)
        jobs = [job for job in listed if job["id"] in tasks]
        most = max(most, sum(job["state"] in ("starting", "running", "stopping") for job in jobs))
        if len(jobs) == len(tasks) and all(job["state"] == "succeeded" for job in jobs):
            break
        time.sleep(0.05)
    assert 1 <= most <= 2
    assert [job["array_index"] for job in jobs] == list(range(6))
    assert {job["array_id"] for job in jobs} == {tasks[0]}
    assert all(f"index={i}" in log_of(ctl, "alice", t) for i, t in enumerate(tasks))
    assert ctl("alice", "wait", str(tasks[0])).returncode == 0


def test_a_staggered_array_starts_its_tasks_apart(sched_daemon, ctl) -> None:
    tasks = submit_all(ctl, "alice", "--array", "0-2", "--stagger", "0.5s", "--", "true")
    ended = [ctl.wait_state("alice", t, "succeeded") for t in tasks]
    starts = sorted(job["started_at"] for job in ended)
    as_seconds = [time.mktime(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + s[19:-1])
                  for s in starts]
    assert all(b - a >= 0.45 for a, b in zip(as_seconds, as_seconds[1:])), starts


def test_stop_of_a_queued_job_and_of_an_array(sched_daemon, ctl) -> None:
    done = release_file("stop-array")
    tasks = submit_all(ctl, "alice", "--array", "0-3%1", "--",
                       "sh", "-c", f"while [ ! -e {done} ]; do sleep 0.05; done")
    ctl.wait_state("alice", tasks[0], "running")
    assert ctl.job("alice", tasks[1])["state"] == "queued"
    ctl("alice", "stop", str(tasks[0]), check=True)
    ended = [ctl.wait_state("alice", t, "stopped") for t in tasks]
    assert all(job["reason"] == "stopped" for job in ended)
    assert all(job["started_at"] is None for job in ended[1:]), "queued tasks never ran"


def test_resubmit_with_dependents_resumes_a_pipeline(sched_daemon, ctl) -> None:
    flag = release_file("pipeline")
    a = ctl.submit("alice", "true", opts=["--name", "stage-a"])
    b = ctl.submit("alice", "test", "-e", flag, opts=["--name", "stage-b", "--after", str(a)])
    c = ctl.submit("alice", "true", opts=["--name", "stage-c", "--after", str(b)])
    ctl.wait_state("alice", b, "failed")
    assert ctl.wait_state("alice", c, "failed")["reason"] == "dependency-failed"
    Path(flag).touch()
    resubmitted = ctl("alice", "resubmit", "--with-dependents", str(b), check=True)
    new = [int(line) for line in resubmitted.stdout.split()]
    assert len(new) == 2
    nb, nc = (ctl.wait_state("alice", job_id, "succeeded") for job_id in new)
    assert nb["resubmit_of"] == b and nc["resubmit_of"] == c and nc["after"] == [nb["id"]]
    assert nb["after"] == [a], "the finished stage counts as met, and did not run again"
    runs_of_a = [j for j in json.loads(ctl("alice", "list", "--all", "--json", check=True).stdout)
                 if j["name"] == "stage-a"]
    assert len(runs_of_a) == 1


def kill_the_daemon() -> None:
    """kill -9; systemd restarts it (Restart=on-failure), and the new one reconciles."""
    old = daemon_pid()
    sh("systemctl", "kill", "-s", "KILL", "gpujobd")
    wait_for(lambda: daemon_pid() not in (0, old)
             and sh("systemctl", "is-active", "gpujobd", check=False).stdout.strip() == "active",
             "gpujobd to be restarted")
    sh("systemctl", "reset-failed", "gpujobd", check=False)  # three kills would reach the start limit


def test_randomized_jobs_with_daemon_kills_never_share_a_gpu(sched_daemon, ctl) -> None:
    seed = int(os.environ.get("GPUJOBD_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (GPUJOBD_TEST_SEED={seed} reruns it)")
    rng = random.Random(seed)
    ids = []
    for _ in range(30):
        user = rng.choice(("alice", "bob"))
        gpus = rng.choice((0, 1, 1, 2, 3))
        seconds = f"{rng.uniform(0.05, 0.6):.2f}"
        ids.append((user, ctl.submit(user, "sleep", seconds, opts=["--gpus", str(gpus)])))
    kills = sorted(rng.uniform(0.2, 4.0) for _ in range(3))
    began = time.monotonic()
    while True:
        if kills and time.monotonic() - began >= kills[0]:
            kills.pop(0)
            kill_the_daemon()
        listed = ctl("root", "list", "--all", "--json")
        if listed.returncode != 0:
            continue  # the daemon is between its kill and its restart
        jobs = [job for job in json.loads(listed.stdout) if job["id"] in {job_id for _, job_id in ids}]
        holders: Dict[str, int] = {}
        for job in jobs:
            if job["state"] in ("starting", "running", "stopping"):
                for uuid in job["gpus"]:
                    assert uuid not in holders, (seed, uuid, holders.get(uuid), job["id"])
                    holders[uuid] = job["id"]
        if not kills and len(jobs) == len(ids) and all(job["state"] in FINAL for job in jobs):
            break
        left = [job["id"] for job in jobs if job["state"] not in FINAL]
        assert time.monotonic() - began < HANG_S, f"seed {seed}: jobs {left} never ended"
        time.sleep(0.05)
    # A job whose scope the daemon was creating when it was killed ends start-failed (nothing ran);
    # every other one ran to its end.
    for job in jobs:
        assert job["state"] == "succeeded" or job["reason"] == "start-failed", (seed, job)


def test_starts_past_the_start_slots_wait_queued_and_every_job_runs(ctl) -> None:
    """daemon.starts_in_flight_max: twelve tasks submitted at once start two at a time, in the order
    of the daemon's own journal (queued -> starting, then the scope active), and none is lost."""
    original = CONFIG.read_text()
    slots = "[daemon]\nstarts_in_flight_max = 2\n"
    # Into the [daemon] table of whatever the module's daemon runs with (a second header is invalid).
    restart_daemon(original.replace("[daemon]\n", slots, 1) if "[daemon]\n" in original
                   else original + "\n" + slots)
    try:
        cursor = sh("journalctl", "-u", "gpujobd", "-n", "0", "--show-cursor").stdout.split("cursor: ")[-1]
        ids = submit_all(ctl, "alice", "--array", "0-11", "--", "true")
        assert len(ids) == 12
        for job_id in ids:
            assert ctl.wait_state("alice", job_id, *FINAL, timeout=HANG_S)["state"] == "succeeded"
        events = [json.loads(line) for line in sh("journalctl", "-u", "gpujobd", "--after-cursor",
                                                  cursor.strip(), "-o", "json").stdout.splitlines()]
        starting, most = set(), 0
        seen = {"job.dequeued": 0, "job.started": 0}
        for event in events:
            name, job_id = event.get("EVENT"), event.get("GPUJOB_ID")
            if name in seen and job_id is not None and int(job_id) in ids:
                seen[name] += 1
                (starting.add if name == "job.dequeued" else starting.discard)(int(job_id))
                most = max(most, len(starting))
        assert seen == {"job.dequeued": 12, "job.started": 12}, "every task's start is in the journal"
        assert most == 2, f"at most two jobs starting at once, and two did (found {most})"
    finally:
        restart_daemon(original)
