"""The machine under test: gpujobd installed from this checkout as a service, a user, the config.

Inside the sandbox everything done here vanishes with it. On a host (GPUJOBD_BENCH_HOST_SYSTEMD=1)
the daemon keeps its state in directories of its own (/var/lib/gpujobd-bench, /var/log/gpujobd-bench)
so a real job database is never touched, and the previous configuration file is put back at the end.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from benchmarks.stats import check

CHECKOUT = Path(__file__).resolve().parents[1]
PREFIX = Path("/usr/local")
LIBDIR = PREFIX / "lib" / "gpujobd"
GPUJOBCTL = str(PREFIX / "bin" / "gpujobctl")
SYSTEM_PYTHON = "/usr/bin/python3"  # what gpujobctl and gpujobd run with (make install)
CONFIG = Path("/etc/gpujobd/gpujobd.toml")
STATE_DIR = Path("/var/lib/gpujobd-bench")
LOG_DIR = Path("/var/log/gpujobd-bench")
JOB_LOG_DIR = LOG_DIR / "jobs"
DB_FILE = STATE_DIR / "gpujobd.sqlite3"
CGROUP_ROOT = Path("/sys/fs/cgroup")
SLICE = "gpujob.slice"
BENCH_USER = "gjbench"
HOST_ENV = "GPUJOBD_BENCH_HOST_SYSTEMD"
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
NON_FINAL = ("queued", "starting", "running", "stopping")


def sh(*argv: str, check_rc: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check_rc and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def where() -> Optional[str]:
    """'sandbox' inside the sandbox, 'host' where asked for and PID 1 is systemd, else None."""
    if os.environ.get("GPUJOBD_IN_SANDBOX"):
        return "sandbox"
    if os.environ.get(HOST_ENV) == "1" and Path("/proc/1/comm").read_text().strip() == "systemd":
        return "host"
    return None


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    def env(self) -> Dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": self.home, "USER": self.name,
                "LOGNAME": self.name, "LANG": "C.UTF-8"}

    def popen_kw(self) -> Dict[str, Any]:
        """subprocess arguments that run a command as this user, from its home (no runuser, no PAM)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "env": self.env(),
                "cwd": self.home}


class Testbed:
    def __init__(self, stop_timeout_s: float, source: Path = CHECKOUT):
        self.stop_timeout_s = stop_timeout_s
        self.source = source
        self.workdir = Path(tempfile.mkdtemp(prefix="gpujobd-bench-"))
        self._old_config: Optional[bytes] = None
        self.user: User
        self._client: Any = None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        sh("make", "-s", "-C", str(self.source), "install", f"PREFIX={PREFIX}")
        sys.path.insert(0, str(LIBDIR))  # this process's own gpujobd (client, store): the installed one
        self.user = self._ensure_user(BENCH_USER)
        self.write_config()
        sh("busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
           "ReloadConfig")
        sh("systemctl", "daemon-reload")
        self.reset_state()
        self.start_daemon()
        self._stage_files()

    def _ensure_user(self, name: str) -> User:
        if sh("id", name, check_rc=False).returncode != 0:
            sh("useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name)
        entry = pwd.getpwnam(name)
        return User(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def write_config(self, extra: str = "") -> None:
        if self._old_config is None and CONFIG.exists():
            self._old_config = CONFIG.read_bytes()
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG.write_text(
            # The bench user queues thousands of jobs on purpose: no per-user cap on active jobs.
            f'[daemon]\nstate_dir = "{STATE_DIR}"\nlog_dir = "{LOG_DIR}"\n\n'
            "[limits]\nmax_active_jobs_per_user = 0\n\n"
            f"[jobs]\nstop_timeout_s = {self.stop_timeout_s}\n{extra}"
        )
        CONFIG.chmod(0o644)

    def _stage_files(self) -> None:
        """The helper scripts the bench user runs, somewhere it can read them."""
        self.workdir.chmod(0o755)
        for name in ("agent.py", "tree.sh", "floor_service.py"):
            shutil.copy(HERE / name, self.workdir / name)
            (self.workdir / name).chmod(0o755)

    def teardown(self) -> None:
        if self._client is not None:
            self._client = None
        if where() == "host":
            sh("systemctl", "stop", "gpujobd", check_rc=False)
            if self._old_config is not None:
                CONFIG.write_bytes(self._old_config)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the daemon ------------------------------------------------------------------------------
    def start_daemon(self) -> float:
        """systemctl start (Type=notify: returns once the daemon reconciled and is ready); seconds."""
        started = time.perf_counter()
        done = sh("systemctl", "start", "gpujobd", check_rc=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            journal = sh("journalctl", "-u", "gpujobd", "-n", "30", "--no-pager", check_rc=False).stdout
            raise RuntimeError(f"gpujobd did not start: {done.stderr.strip()}\n{journal}")
        self._client = None
        return elapsed

    def stop_daemon(self) -> None:
        sh("systemctl", "stop", "gpujobd")
        self._client = None

    def reset_state(self) -> None:
        """An empty job history: the daemon stopped, its database, exit records and logs removed."""
        sh("systemctl", "stop", "gpujobd", check_rc=False)
        for path in (STATE_DIR, LOG_DIR):
            shutil.rmtree(path, ignore_errors=True)

    def main_pid(self) -> int:
        pid = int(sh("systemctl", "show", "-P", "MainPID", "gpujobd").stdout.strip())
        check(pid > 0, "gpujobd is not running")
        return pid

    def client(self) -> Any:
        """A root client (may see and wait for every job) of the installed daemon."""
        if self._client is None:
            from gpujobd.client import Client

            self._client = Client(call_timeout_s=120)
        return self._client

    def wait_idle(self, timeout_s: float = 120) -> None:
        """Until no job is queued, starting, running or stopping."""
        deadline = time.monotonic() + timeout_s
        while self.active_jobs():
            check(time.monotonic() < deadline, f"jobs still active after {timeout_s}s")
            time.sleep(0.05)

    def wait_responsive(self, timeout_s: float = 600) -> None:
        """Until the daemon answers a call again (it serves one call at a time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.client().list(limit=1, raw=True)
                return
            except Exception:
                check(time.monotonic() < deadline, f"gpujobd did not answer for {timeout_s}s")
                time.sleep(1)

    def active_jobs(self) -> List[int]:
        client = self.client()
        return [job["id"] for state in NON_FINAL
                for job in client.list(all=True, state=state, raw=True)]

    # -- commands --------------------------------------------------------------------------------
    def ctl(self, *args: str) -> List[str]:
        return [GPUJOBCTL, *args]

    def agent(self, *args: str) -> List[str]:
        return [SYSTEM_PYTHON, "-I", str(self.workdir / "agent.py"), "--lib", str(LIBDIR), *args]

    def floor_service(self, reply_json: str) -> List[str]:
        return [SYSTEM_PYTHON, "-I", str(self.workdir / "floor_service.py"), "--lib", str(LIBDIR),
                reply_json]

    def job_log(self, job_id: int) -> Path:
        return JOB_LOG_DIR / f"{job_id}.log"

    def scope_cgroup(self, unit: str) -> Path:
        return CGROUP_ROOT / SLICE / unit


# -- process accounting ------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time spent by all cores outside idle and iowait since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def cpu_breakdown(daemon: int) -> Dict[str, float]:
    """CPU seconds so far of the machine, gpujobd, systemd (PID 1) and dbus-daemon."""
    return {"machine": machine_busy_seconds(), "gpujobd": cpu_seconds(daemon), "systemd": cpu_seconds(1),
            "dbus-daemon": sum(cpu_seconds(pid) for pid in pids_of("dbus-daemon"))}


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def pids_of(name: str) -> List[int]:
    return [int(p) for p in sh("pgrep", "-x", name, check_rc=False).stdout.split()]


def cgroup_pids(cgroup: Path) -> List[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (FileNotFoundError, ProcessLookupError, OSError):
        return []


def cgroup_populated(cgroup: Path) -> bool:
    try:
        return "populated 1" in (cgroup / "cgroup.events").read_text()
    except (FileNotFoundError, OSError):
        return False


def processes_matching(marker: str) -> List[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[Any]:
    end = time.monotonic() + seconds

    def left() -> float:
        remaining = end - time.monotonic()
        check(remaining > 0, f"timed out after {seconds}s waiting for {what}")
        return remaining

    yield left


# -- the machine -------------------------------------------------------------------------------------
def machine(place: str) -> Dict[str, Any]:
    return {
        "where": place,
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": _meminfo_kib("MemTotal") * 1024,
        "kernel": platform.release(),
        "os": _os_release(),
        "virtualization": sh("systemd-detect-virt", "--vm", check_rc=False).stdout.strip() or "none",
        "systemd": sh("systemctl", "--version").stdout.splitlines()[0],
        "python_daemon": sh(SYSTEM_PYTHON, "--version").stdout.strip(),
        "python_runner": sys.version.split()[0],
        "cgroup_controllers": (CGROUP_ROOT / "cgroup.controllers").read_text().strip()
        if (CGROUP_ROOT / "cgroup.controllers").exists() else "",
        "gpujobd_commit": _git("rev-parse", "--short", "HEAD"),
        "gpujobd_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _git(*args: str) -> str:
    done = sh("git", "-C", str(CHECKOUT), *args, check_rc=False)
    return done.stdout.strip() if done.returncode == 0 else ""
