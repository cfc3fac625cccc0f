"""Integration tests: the real gpujobd service, the real gpujobctl, real scopes on a real systemd.

They run inside the sandbox (`make integration`, which `make test` includes), where everything they
do (installing gpujobd, adding users, starting jobs) vanishes with it. On a host whose PID 1 is
systemd they run only when GPUJOBD_TEST_HOST_SYSTEMD=1 says so explicitly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
USERS = ("alice", "bob", "carol")  # carol is in the admin group
ADMIN_GROUP = "gpujob-admin"
WAIT_S = 20.0
STOP_TIMEOUT_S = 2.0
POLL_S = 0.05


def _where() -> Optional[str]:
    if os.environ.get("GPUJOBD_IN_SANDBOX"):
        return "sandbox"
    if os.environ.get("GPUJOBD_TEST_HOST_SYSTEMD") == "1":
        return "host"
    return None


def pytest_collection_modifyitems(items):
    if _where() is None:
        skip = pytest.mark.skip(reason="integration tests run in the sandbox: `make integration`")
        for item in items:
            if "tests/integration/" in str(item.fspath):
                item.add_marker(skip)


def sh(*argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Ctl:
    """Runs the real gpujobctl as a given user, from that user's home directory."""

    def __call__(self, user: str, *args: str, check: bool = False, timeout: float = 60,
                 stdin: Optional[str] = None) -> subprocess.CompletedProcess:
        home = f"/home/{user}" if user != "root" else "/root"
        done = subprocess.run(["runuser", "-u", user, "--", "gpujobctl", *args], capture_output=True,
                              text=True, timeout=timeout, cwd=home, input=stdin)
        if check and done.returncode != 0:
            raise AssertionError(f"gpujobctl {args} as {user} exited {done.returncode}: "
                                 f"{done.stdout}{done.stderr}")
        return done

    def submit(self, user: str, *cmd: str, opts: List[str] = ()) -> int:  # type: ignore[assignment]
        done = self(user, "submit", *opts, "--", *cmd, check=True)
        return int(done.stdout.strip())

    def job(self, user: str, job_id: int) -> Dict:
        return json.loads(self(user, "status", str(job_id), "--json", check=True).stdout)

    def wait_state(self, user: str, job_id: int, *states: str, timeout: float = WAIT_S) -> Dict:
        return wait_for(lambda: (lambda j: j if j["state"] in states else None)(self.job(user, job_id)),
                        f"job {job_id} to reach {states}", timeout)


def scope_pids(unit: str) -> List[int]:
    procs = Path("/sys/fs/cgroup/gpujob.slice") / unit / "cgroup.procs"
    try:
        return [int(p) for p in procs.read_text().split()]
    except FileNotFoundError:
        return []
    except OSError as error:  # ENODEV: systemd removed the scope's cgroup between open and read
        if error.errno == errno.ENODEV:
            return []
        raise


def processes_matching(marker: str) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def daemon_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "gpujobd").stdout.strip())


@pytest.fixture(scope="session")
def gpujobd_service():
    """gpujobd installed from this checkout with `make install` and started as a service."""
    # In the sandbox all of this vanishes with it; on a host it was asked for explicitly.
    if _where() is not None:
        sh("make", "-s", "-C", str(CHECKOUT), "install", "PREFIX=/usr/local")
        sh("groupadd", "-f", ADMIN_GROUP)
        for user in USERS:
            if sh("id", user, check=False).returncode != 0:
                sh("useradd", "--create-home", "--user-group", "--shell", "/bin/sh", user)
        sh("usermod", "-aG", ADMIN_GROUP, "carol")
        # A short SIGTERM->SIGKILL grace keeps the tests of SIGTERM-ignoring jobs quick.
        Path("/etc/gpujobd/gpujobd.toml").write_text(f"[jobs]\nstop_timeout_s = {STOP_TIMEOUT_S}\n")
        # dbus-daemon notices a new policy file by itself, but not at once; make it certain.
        sh("busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
           "ReloadConfig")
        sh("systemctl", "daemon-reload")
        sh("systemctl", "enable", "--now", "gpujobd")
    sh("systemctl", "is-active", "gpujobd")
    yield
    if _where() == "sandbox":
        journal = sh("journalctl", "--no-pager", "-o", "short-monotonic", check=False).stdout
        (CHECKOUT / ".scratch").mkdir(exist_ok=True)
        (CHECKOUT / ".scratch" / "gpujobd-journal.txt").write_text(journal)


@pytest.fixture
def ctl(gpujobd_service) -> Ctl:
    return Ctl()


# --- the NVML test double (tests/nvml_double), as this sandbox's libnvidia-ml.so.1 -------------------

NVML_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1")
NVML_SCRIPT = Path("/run/nvml-double/script")  # the double's default: the daemon needs no environment


@pytest.fixture(scope="session")
def nvml_double(gpujobd_service) -> Path:
    """The NVML double installed as the system's libnvidia-ml.so.1, read by the installed daemon
    through the pynvml `make install` put beside it; sandbox only (the overlay makes it vanish)."""
    if _where() != "sandbox":
        pytest.skip("the NVML double replaces the system's libnvidia-ml.so.1: sandbox only")
    from tests.nvml_double import LIBRARY_NAME, build

    libdir = build(CHECKOUT / "build" / "nvml-double")
    install_nvml_library(libdir / LIBRARY_NAME)
    return libdir / LIBRARY_NAME


def install_nvml_library(built: Path) -> None:
    NVML_LIBRARY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, NVML_LIBRARY)
    sh("ldconfig")


def remove_nvml_library() -> None:
    NVML_LIBRARY.unlink(missing_ok=True)
    sh("ldconfig")


class NvmlScript:
    """Writes the double's script (tests/nvml_double/script.py) at the path the daemon's NVML reads."""

    path = NVML_SCRIPT

    def write(self, **script) -> None:
        from tests.nvml_double.script import write_script

        write_script(self.path, **script)

    def remove(self) -> None:
        from tests.nvml_double.script import remove_script

        remove_script(self.path)


@pytest.fixture
def nvml_script(nvml_double) -> Iterator[NvmlScript]:
    script = NvmlScript()
    yield script
    script.remove()
