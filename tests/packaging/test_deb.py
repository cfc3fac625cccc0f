"""The Debian package, installed and used the way a lab admin would: apt install, a user's job,
an upgrade under that running job, apt remove, apt purge.

Runs inside the sandbox only (`make package-test`, which builds the two .debs first): everything it
installs, every user it adds, vanishes with the sandbox. Outside it, or without a .deb in dist/, it
skips. The steps depend on each other and run in file order; a step whose predecessor failed skips.

Which packages: $GPUJOBD_DEB (installed first) and $GPUJOBD_DEB_UPGRADE (the upgrade), as
`make package-test` sets them; else the lowest and highest version of dist/gpujobd_*_<arch>.deb.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
DIST = CHECKOUT / "dist"
USER = "labuser"
# What an admin's root shell has: nothing of this machine's pyenv or the test's virtual environment.
ADMIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
JOB_CMD = ["sh", "-c", "while :; do date; sleep 0.2; done"]
APT_TIMEOUT_S = 300
WAIT_S = 30.0
POLL_S = 0.1
CGROUP = Path("/sys/fs/cgroup")
# This machine's image ships the container convention /usr/sbin/policy-rc.d ("exit 101": start no
# service from a maintainer script). A lab server has none; inside the sandbox it is moved aside.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _version(deb: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _debs() -> List[Path]:
    chosen = [os.environ.get("GPUJOBD_DEB"), os.environ.get("GPUJOBD_DEB_UPGRADE")]
    if chosen[0]:
        return [(CHECKOUT / p).resolve() for p in chosen if p]
    found = sorted(p.resolve() for p in DIST.glob("gpujobd_*_*.deb"))
    if len(found) < 2:
        return found
    # dpkg's order, not the file names': the lowest version is installed, the highest upgrades it.
    def newer(a: Path, b: Path) -> bool:
        return subprocess.run(["dpkg", "--compare-versions", _version(a), "gt", _version(b)]).returncode == 0

    lowest = highest = found[0]
    for deb in found[1:]:
        if newer(lowest, deb):
            lowest = deb
        if newer(deb, highest):
            highest = deb
    return [lowest, highest] if lowest != highest else [lowest]


DEBS = _debs() if os.environ.get("GPUJOBD_IN_SANDBOX") else []  # dpkg-deb may not exist elsewhere

pytestmark = [
    pytest.mark.skipif(not os.environ.get("GPUJOBD_IN_SANDBOX"),
                       reason="installs packages: runs only inside the sandbox (make package-test)"),
    pytest.mark.skipif(not DEBS or not DEBS[0].exists(), reason="no .deb in dist/: make deb"),
]


# -- helpers -----------------------------------------------------------------------------------
def sh(*argv: str, check: bool = True, timeout: float = 60, env: Optional[Dict[str, str]] = None,
       cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else ADMIN_ENV, cwd=cwd or "/root")
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def apt(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """apt-get as an admin runs it; the index is refreshed once if a dependency cannot be found."""
    done = sh("apt-get", "-y", *args, check=False, timeout=APT_TIMEOUT_S)
    if done.returncode != 0 and "install" in args and not _state.get("apt-updated"):
        _state["apt-updated"] = True
        sh("apt-get", "update", "-qq", timeout=APT_TIMEOUT_S)
        done = sh("apt-get", "-y", *args, check=False, timeout=APT_TIMEOUT_S)
    if check and done.returncode != 0:
        raise AssertionError(f"apt-get {args} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """gpujobctl, as the unprivileged user, from their home directory."""
    env = dict(ADMIN_ENV, HOME=f"/home/{USER}", USER=USER, LOGNAME=USER)
    return sh("runuser", "-u", USER, "--", "gpujobctl", *args, check=check, env=env, cwd=f"/home/{USER}")


def job(job_id: int) -> Dict:
    return json.loads(ctl("status", str(job_id), "--json").stdout)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def unit_active(unit: str) -> bool:
    return sh("systemctl", "is-active", "--quiet", unit, check=False).returncode == 0


def scope_pids(unit: str) -> List[int]:
    try:
        return sorted(int(p) for p in (CGROUP / "gpujob.slice" / unit / "cgroup.procs").read_text().split())
    except FileNotFoundError:
        return []
    except OSError as error:  # ENODEV: the cgroup was removed between open and read
        if error.errno == errno.ENODEV:
            return []
        raise


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def daemon_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "gpujobd").stdout.strip() or 0)


def installed_version() -> Optional[str]:
    done = sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Version}", "gpujobd", check=False)
    return done.stdout[3:] if done.returncode == 0 and done.stdout.startswith("ii") else None


def log_lines(job_id: int) -> int:
    return len(Path(f"/var/log/gpujobd/jobs/{job_id}.log").read_text().splitlines())


def submit() -> Dict:
    job_id = int(ctl("submit", "--name", "pkg-test", "--", *JOB_CMD).stdout.strip())
    found = wait_for(lambda: (lambda j: j if j["state"] == "running" else None)(job(job_id)),
                     f"job {job_id} to run")
    wait_for(lambda: log_lines(job_id) >= 2, f"job {job_id} to write output")
    return found


# The steps share what they found; each one needs the one before it to have passed.
_state: Dict[str, object] = {}


def needs(step: str) -> None:
    if not _state.get(step):
        pytest.skip(f"an earlier step ({step}) did not pass")


@pytest.fixture(scope="module", autouse=True)
def admin_machine():
    if POLICY_RC_D.exists():
        POLICY_RC_D.rename(POLICY_RC_D.with_name("policy-rc.d.sandbox-disabled"))
    if sh("id", USER, check=False).returncode != 0:
        sh("useradd", "--create-home", "--user-group", "--shell", "/bin/sh", USER)
    yield
    journal = sh("journalctl", "-u", "gpujobd", "--no-pager", "-o", "short-monotonic", check=False).stdout
    (CHECKOUT / ".scratch").mkdir(exist_ok=True)
    (CHECKOUT / ".scratch" / "package-test-journal.txt").write_text(journal)


# -- the admin's steps -------------------------------------------------------------------------
def test_install_enables_and_starts_the_service():
    deb = DEBS[0]
    assert installed_version() is None, "gpujobd is already installed in the sandbox"
    apt("install", str(deb))
    assert installed_version() == _version(deb)
    assert sh("systemctl", "is-enabled", "gpujobd").stdout.strip() == "enabled"
    wait_for(lambda: unit_active("gpujobd"), "gpujobd.service to be active")
    assert sh("systemctl", "show", "-P", "StatusText", "gpujobd").stdout.strip() == "serving org.gpujobd1"
    # What the admin finds on disk.
    assert shutil.which("gpujobctl", path=ADMIN_ENV["PATH"]) == "/usr/bin/gpujobctl"
    assert shutil.which("gpujobd", path=ADMIN_ENV["PATH"]) == "/usr/bin/gpujobd"
    unit = Path("/lib/systemd/system/gpujobd.service").read_text()
    assert "ExecStart=/usr/bin/gpujobd\n" in unit and "@BINDIR@" not in unit
    assert Path("/lib/systemd/system/gpujob.slice").is_file()
    assert Path("/usr/share/dbus-1/system.d/org.gpujobd1.conf").is_file()
    conffiles = sh("dpkg-query", "-W", "-f", "${Conffiles}", "gpujobd").stdout
    assert "/etc/gpujobd/gpujobd.toml" in conffiles
    assert Path("/var/lib/gpujobd").is_dir() and Path("/var/log/gpujobd").is_dir()
    sh("gpujobd", "--check-config")
    sh("man", "-w", "gpujobd")
    sh("man", "-w", "gpujobctl")
    assert Path("/usr/share/bash-completion/completions/gpujobctl").is_file()
    assert Path("/usr/share/zsh/vendor-completions/_gpujobctl").is_file()
    # The client is importable by the system's python3 (docs/client.md).
    sh("/usr/bin/python3", "-c", "import gpujobd.client")
    # The NVML bindings are recommended (python3-pynvml, in contrib), never a hard dependency, and
    # no copy of them is shipped: without them the daemon runs and its GPU watcher says what to install.
    assert "python3-pynvml" in sh("dpkg-deb", "-f", str(deb), "Recommends").stdout
    depends = sh("dpkg-deb", "-f", str(deb), "Depends").stdout
    assert "python3-jeepney" in depends, depends  # the client's D-Bus library (docs/client.md)
    assert "pynvml" not in depends and "nvidia-ml-py" not in depends, depends
    assert not [f for f in sh("dpkg", "-L", "gpujobd").stdout.split() if f.endswith("pynvml.py")]
    if sh("/usr/bin/python3", "-c", "import pynvml", check=False).returncode != 0:
        report = wait_for(lambda: (lambda r: r if r["state"] == "unavailable" else None)(
            json.loads(ctl("gpus", "--json").stdout)), "the GPU watcher to report NVML unavailable")
        assert "python3-pynvml" in report["reason"], report
    _state["installed"] = True


def test_a_users_job_survives_the_upgrade_and_is_still_followed():
    needs("installed")
    if len(DEBS) < 2:
        pytest.skip("only one .deb: make package-test builds a second, higher version")
    # The admin has tuned the configuration: an upgrade must keep it (conffile).
    config = Path("/etc/gpujobd/gpujobd.toml")
    tuned = config.read_text().replace("# stop_timeout_s = 10.0",
                                       "stop_timeout_s = 3.0  # tuned by the lab admin")
    assert "tuned by the lab admin" in tuned
    config.write_text(tuned)
    found = submit()
    job_id, unit = found["id"], found["unit"]
    pids_before = scope_pids(unit)
    assert len(pids_before) >= 2, pids_before  # the supervisor and the job's shell at least
    old_daemon = daemon_pid()
    daemon_cgroup = (CGROUP / "system.slice" / "gpujobd.service" / "cgroup.procs").read_text().split()
    assert not set(map(str, pids_before)) & set(daemon_cgroup), "the job lives in the service's cgroup"

    apt("install", str(DEBS[1]))

    assert installed_version() == _version(DEBS[1])
    wait_for(lambda: unit_active("gpujobd") and daemon_pid() not in (0, old_daemon),
             "the upgraded daemon to be running")
    assert "tuned by the lab admin" in config.read_text()
    # The job went through the upgrade untouched: same scope, same processes, still writing.
    assert unit_active(unit)
    still = scope_pids(unit)
    assert all(alive(pid) for pid in pids_before[:2]), (pids_before, still)
    assert set(pids_before[:2]) <= set(still), (pids_before, still)
    lines = log_lines(job_id)
    wait_for(lambda: log_lines(job_id) > lines + 2, "the job to keep writing after the upgrade")
    # ... and the new daemon follows it: re-attached, stoppable, its end recorded.
    assert job(job_id)["state"] == "running"
    assert str(job_id) in ctl("list").stdout
    ctl("stop", str(job_id))
    ended = wait_for(lambda: (lambda j: j if j["state"] not in ("running", "stopping") else None)(
        job(job_id)), f"job {job_id} to end after gpujobctl stop")
    assert ended["state"] == "stopped", ended
    wait_for(lambda: not unit_active(unit), f"{unit} to be gone")
    assert not any(alive(pid) for pid in pids_before)
    _state["upgraded"] = True


def test_remove_stops_the_daemon_and_leaves_running_jobs_alone():
    needs("installed")
    found = submit()
    job_id, unit = found["id"], found["unit"]
    _state["remove-job"] = (job_id, unit)
    pids = scope_pids(unit)

    done = apt("remove", "gpujobd")
    assert "running jobs keep running" in done.stdout + done.stderr  # the prerm tells the admin

    assert not unit_active("gpujobd")
    assert installed_version() is None
    assert shutil.which("gpujobctl", path=ADMIN_ENV["PATH"]) is None
    # The job runs on in its scope, unsupervised by any daemon, still writing its log.
    assert unit_active(unit) and all(alive(pid) for pid in pids[:2])
    lines = log_lines(job_id)
    wait_for(lambda: log_lines(job_id) > lines + 2, "the job to keep running after apt remove")
    # Remove keeps state, logs and configuration (dpkg status "rc").
    assert sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "gpujobd").stdout.startswith("rc")
    assert Path("/var/lib/gpujobd/gpujobd.sqlite3").is_file()
    assert Path("/etc/gpujobd/gpujobd.toml").is_file()
    _state["removed"] = True


def test_reinstall_after_remove_finds_the_job_again():
    needs("removed")
    job_id, unit = _state["remove-job"]
    deb = DEBS[-1]
    apt("install", str(deb))
    wait_for(lambda: unit_active("gpujobd"), "gpujobd.service to be active again")
    assert job(job_id)["state"] == "running"
    ctl("stop", str(job_id))
    wait_for(lambda: job(job_id)["state"] == "stopped", f"job {job_id} to be stopped")
    wait_for(lambda: not unit_active(unit), f"{unit} to be gone")
    _state["reinstalled"] = True


def test_purge_removes_state_logs_and_configuration():
    needs("installed")
    apt("purge", "gpujobd")
    status = sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "gpujobd", check=False).stdout
    assert not status.startswith(("ii", "rc")), status
    for gone in ("/var/lib/gpujobd", "/var/log/gpujobd", "/etc/gpujobd",
                 "/etc/systemd/system/multi-user.target.wants/gpujobd.service",
                 "/lib/systemd/system/gpujobd.service", "/usr/share/dbus-1/system.d/org.gpujobd1.conf",
                 "/usr/lib/python3/dist-packages/gpujobd"):
        assert not Path(gone).exists(), f"{gone} is still there after apt purge"
    assert not unit_active("gpujobd")
