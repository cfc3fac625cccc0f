#!/usr/bin/python3
"""A throwaway systemd, booted as PID 1 of private namespaces over a copy-on-write view of this host.

    sandbox.py run [--user NAME] [--boot-timeout S] [--] CMD [ARG...]
    sandbox.py cleanup

`run` boots the sandbox, runs CMD inside it (as root, or as a throwaway user it creates there) in a
scope of the sandbox's systemd, tears everything down and exits with CMD's exit status. Exit codes of
its own: 125 the sandbox could not be booted (its boot log is shown), 126 bad usage or not root.

What the sandbox is made of (see docs/sandbox.md): new PID, mount and cgroup namespaces; an overlay
root (lower: the host's /, upper: tmpfs); private tmpfs on /run, /tmp and /var/tmp; a fresh cgroup2
hierarchy rooted in a cgroup of its own in the host's v2 tree; the checkout bind-mounted read-write at
its own path. Teardown kills the whole cgroup (cgroup.kill), waits for it to empty and removes its
directories, on every path: normal exit, failure, Ctrl-C, SIGTERM. If the launcher itself is killed
with SIGKILL, PR_SET_PDEATHSIG takes the sandbox down with it and the next launch removes the empty
cgroup left behind.

Standard library only: it runs with the system's python3 before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
PREFIX = "gpujobd-sbx."
BOOT_TARGET = "gpujobd-sandbox.target"
DEFAULT_BOOT_TIMEOUT_S = 30.0
TEARDOWN_TIMEOUT_S = 10.0
BOOT_PROBE_INTERVAL_S = 0.02
EXIT_BOOT_FAILED = 125
EXIT_USAGE = 126
PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    pass


def cgroup2_mount() -> Path:
    """Where this host's cgroup v2 hierarchy is mounted (unified, or the hybrid 'unified' mount)."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return Path(fields[4])
    raise SandboxError("no cgroup2 hierarchy is mounted on this host; the sandbox needs one")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cgroup_populated(cgroup: Path) -> bool:
    try:
        events = (cgroup / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events


def _wait_cgroup_empty(cgroup: Path, timeout_s: float) -> bool:
    """Wait for the kernel to report the cgroup empty; cgroup.events signals POLLPRI on change."""
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.open(cgroup / "cgroup.events", os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while _cgroup_populated(cgroup):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(min(left, 0.1) * 1000)
        return True
    finally:
        os.close(fd)


def _remove_cgroup_tree(cgroup: Path) -> None:
    for dirpath, _dirnames, _files in os.walk(cgroup, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


def _kill_cgroup(cgroup: Path) -> None:
    kill_file = cgroup / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
        return
    for dirpath, _dirs, _files in os.walk(cgroup):  # kernels before 5.14 have no cgroup.kill
        for pid in (Path(dirpath) / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def destroy_cgroup(cgroup: Path) -> None:
    if not cgroup.exists():
        return
    _kill_cgroup(cgroup)
    if not _wait_cgroup_empty(cgroup, TEARDOWN_TIMEOUT_S):
        raise SandboxError(f"{cgroup}: processes survived SIGKILL for {TEARDOWN_TIMEOUT_S}s")
    _remove_cgroup_tree(cgroup)


def cleanup_stale() -> list[str]:
    """Remove sandboxes whose launcher died without tearing down (SIGKILL)."""
    removed = []
    for cgroup in cgroup2_mount().glob(PREFIX + "*"):
        launcher = cgroup.name[len(PREFIX):].split(".")[0]
        if launcher.isdigit() and _pid_alive(int(launcher)):
            continue
        destroy_cgroup(cgroup)
        removed.append(cgroup.name)
    return removed


def _set_pdeathsig_kill() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


class Sandbox:
    """One booted sandbox. Use as a context manager: boot on enter, teardown on exit."""

    def __init__(self, boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S, checkout: Path = CHECKOUT):
        self.boot_timeout_s = boot_timeout_s
        self.checkout = checkout
        self.name = f"{PREFIX}{os.getpid()}.{time.monotonic_ns() % 10**9}"
        self.cgroup = cgroup2_mount() / self.name
        self.pid1: int | None = None
        self._launcher: subprocess.Popen | None = None
        self._boot_log: collections.deque[str] = collections.deque(maxlen=400)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        try:
            self.boot()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def boot(self) -> None:
        self.cgroup.mkdir()
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SBX_NAME": self.name,
            "SBX_CHECKOUT": str(self.checkout),
            "SBX_TARGET": BOOT_TARGET,
            "SBX_UNITS": str(HERE / "units"),
        }
        self._launcher = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--cgroup", "--propagation", "private",
             "--kill-child=SIGKILL", "sh", str(HERE / "pid1-setup.sh")],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=self._enter_sandbox_cgroup, text=True, errors="replace",
        )
        threading.Thread(target=self._collect_boot_log, daemon=True).start()
        self.pid1 = self._find_pid1()
        self._wait_running()

    def _enter_sandbox_cgroup(self) -> None:
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        _set_pdeathsig_kill()

    def _collect_boot_log(self) -> None:
        assert self._launcher is not None and self._launcher.stdout is not None
        for line in self._launcher.stdout:
            self._boot_log.append(line.rstrip("\n"))

    def _find_pid1(self) -> int:
        assert self._launcher is not None
        children = Path(f"/proc/{self._launcher.pid}/task/{self._launcher.pid}/children")
        deadline = time.monotonic() + self.boot_timeout_s
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                self._boot_failed(f"the namespace launcher exited with {self._launcher.returncode}")
            found = children.read_text().split() if children.exists() else []
            if found:
                return int(found[0])
            time.sleep(BOOT_PROBE_INTERVAL_S)
        self._boot_failed("PID 1 never appeared")
        raise AssertionError("unreachable")

    def _wait_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout_s
        state = "unknown"
        while time.monotonic() < deadline:
            if self._launcher is not None and self._launcher.poll() is not None:
                self._boot_failed(f"systemd exited with {self._launcher.returncode}")
            probe = self.exec(["systemctl", "is-system-running"], capture=True)
            state = probe.stdout.strip() or "unreachable"
            if state == "running":
                return
            if state in ("degraded", "maintenance", "stopping"):
                break
            time.sleep(BOOT_PROBE_INTERVAL_S)
        self._boot_failed(f"is-system-running said {state!r} (wanted 'running' within "
                          f"{self.boot_timeout_s}s)")

    def _boot_failed(self, why: str) -> None:
        report = [f"sandbox: boot failed: {why}", "---- sandbox boot log ----", *self._boot_log]
        if self.pid1 is not None and self._launcher is not None and self._launcher.poll() is None:
            for argv in (["systemctl", "--failed", "--no-pager"],
                         ["journalctl", "--no-pager", "-n", "60"]):
                out = self.exec(argv, capture=True)
                report += [f"---- {' '.join(argv)} ----", out.stdout + out.stderr]
        raise SandboxError("\n".join(report))

    def teardown(self) -> None:
        """SIGKILL PID 1 first (the kernel then kills its whole PID namespace) so that unshare reaps
        it, then kill and remove whatever is left in the sandbox's cgroup."""
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self._launcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._launcher.wait(timeout=TEARDOWN_TIMEOUT_S)
        destroy_cgroup(self.cgroup)
        if self._launcher is not None:
            self._launcher.wait(timeout=TEARDOWN_TIMEOUT_S)
            self._launcher = None

    # -- running things inside -----------------------------------------------------------------
    def _nsenter(self, argv: list[str], cwd: str = "/") -> list[str]:
        assert self.pid1 is not None
        # Not nsenter's --wd: it opens the directory before entering the mount namespace, and a
        # directory of the host's mount tree has no path inside the sandbox.
        return ["nsenter", "-t", str(self.pid1), "-m", "-p", "-C", "-r", "--",
                "env", f"--chdir={cwd}", *argv]

    def exec(self, argv: list[str], capture: bool = False, cwd: str = "/",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the sandbox's namespaces (in the sandbox's root cgroup, not in a unit)."""
        return subprocess.run(
            self._nsenter(argv, cwd), env=env, capture_output=capture, text=True,
            stdin=subprocess.DEVNULL, preexec_fn=self._enter_sandbox_cgroup,
        )

    def add_user(self, name: str) -> None:
        done = self.exec(["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name],
                         capture=True)
        if done.returncode != 0:
            raise SandboxError(f"useradd {name} inside the sandbox failed: {done.stderr.strip()}")

    def run(self, argv: list[str], user: str | None = None, cwd: str | None = None,
            env: dict[str, str] | None = None, capture: bool = False) -> subprocess.CompletedProcess:
        """Run argv in a transient scope of the sandbox's systemd, as root or as `user`."""
        scope = ["systemd-run", "--scope", "--quiet", "--collect", "--unit",
                 f"sandbox-run-{time.monotonic_ns()}"]
        if user is not None:
            scope += [f"--uid={user}", f"--gid={user}"]
        return subprocess.run(
            self._nsenter([*scope, "--", *argv], cwd or os.getcwd()),
            env=env if env is not None else self._run_env(user),
            capture_output=capture, text=True, preexec_fn=self._enter_sandbox_cgroup,
        )

    def _run_env(self, user: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SUDO_", "XDG_"))}
        env["GPUJOBD_IN_SANDBOX"] = self.name
        if user is not None:
            home = self.exec(["getent", "passwd", user], capture=True).stdout.split(":")
            env.update(USER=user, LOGNAME=user, HOME=home[5] if len(home) > 5 else "/")
        return env


# -- command line ------------------------------------------------------------------------------
def _raise_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        print("sandbox: run needs a command, e.g. sandbox.py run -- systemctl status", file=sys.stderr)
        return EXIT_USAGE
    cleanup_stale()
    try:
        with Sandbox(boot_timeout_s=args.boot_timeout) as sbx:
            if args.user:
                sbx.add_user(args.user)
            return sbx.run(args.command, user=args.user).returncode
    except SandboxError as err:
        print(err, file=sys.stderr)
        return EXIT_BOOT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="boot a sandbox, run a command inside, tear down")
    run.add_argument("--user", help="create this throwaway user inside and run the command as it")
    run.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT_S, metavar="S")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("cleanup", help="remove what killed launchers left behind")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("sandbox: must run as root (it creates namespaces, mounts and cgroups)", file=sys.stderr)
        return EXIT_USAGE
    # SIGINT too: a launcher started in the background by a non-interactive shell inherits it
    # ignored, and Ctrl-C (or a test's SIGINT) would then leave the sandbox running.
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, _raise_on_signal)
    if args.verb == "cleanup":
        for name in cleanup_stale():
            print(f"removed {name}")
        return 0
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    try:
        return _cmd_run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
