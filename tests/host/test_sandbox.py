"""The sandbox boots a real systemd, and leaves this host exactly as it found it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.sandbox.sandbox import PREFIX, Sandbox, cgroup2_mount, cleanup_stale

SANDBOX_PY = Path(__file__).resolve().parents[1] / "sandbox" / "sandbox.py"


def _etc_digest() -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk("/etc"):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns}:{info.st_mode}\n".encode())
    return digest.hexdigest()


def _sandbox_cgroups(launcher: int = 0) -> list:
    """Cgroups of the sandboxes this test run started (another run's sandboxes may be alive)."""
    return sorted(p.name for p in cgroup2_mount().glob(f"{PREFIX}{launcher or os.getpid()}.*"))


def _processes_of_sandboxes(launcher: int = 0) -> list:
    """Host processes whose cgroup is (under) a cgroup of a sandbox this test run started."""
    prefix = f"{PREFIX}{launcher or os.getpid()}."
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if prefix in cgroups:
            found.append(entry.name)
    return found


def test_boots_real_systemd_with_a_system_bus_and_journal():
    with Sandbox() as sbx:
        state = sbx.exec(["systemctl", "is-system-running"], capture=True)
        bus = sbx.exec(["busctl", "--system", "status", "org.freedesktop.systemd1"], capture=True)
        journal = sbx.exec(["journalctl", "--no-pager", "-n", "1"], capture=True)
        comm = sbx.exec(["cat", "/proc/1/comm"], capture=True)
    assert state.stdout.strip() == "running"
    assert bus.returncode == 0, bus.stderr
    assert journal.returncode == 0, journal.stderr
    assert comm.stdout.strip() == "systemd"


def test_leaves_host_tmp_etc_processes_and_cgroups_as_found(tmp_path):
    canary = Path("/tmp") / f"gpujobd-canary-{os.getpid()}"
    canary.write_text("still here")
    # An old file and a directory too: what systemd-tmpfiles --clean (age) or --remove would take.
    old_canary = Path("/tmp") / f"gpujobd-canary-old-{os.getpid()}"
    old_canary.write_text("old")
    month_ago = time.time() - 30 * 86400
    os.utime(old_canary, (month_ago, month_ago))
    dir_canary = Path("/tmp") / f"gpujobd-canary-dir-{os.getpid()}"
    dir_canary.mkdir()
    etc_before = _etc_digest()
    try:
        with Sandbox() as sbx:
            sbx.add_user("sbxuser")
            wrote = sbx.run(["sh", "-c", "rm -rf /tmp/gpujobd-canary-*; touch /tmp/inside /etc/inside"])
            assert wrote.returncode == 0
            inside = sbx.exec(["ls", "/tmp"], capture=True).stdout.split()
            assert "inside" in inside and canary.name not in inside
        assert canary.read_text() == "still here"
        assert "inside" not in os.listdir("/tmp")
        # Other processes on the host may come and go in /tmp: the canaries stand for its contents.
        assert old_canary.read_text() == "old" and dir_canary.is_dir()
        assert not Path("/etc/inside").exists()
        assert _etc_digest() == etc_before
        assert "sbxuser" not in Path("/etc/passwd").read_text()
        assert _processes_of_sandboxes() == []
        assert _sandbox_cgroups() == []
    finally:
        for path in (canary, old_canary):
            path.unlink(missing_ok=True)
        if dir_canary.exists():
            dir_canary.rmdir()


def test_device_nodes_made_inside_stay_inside():
    name = f"gpujobd-sbx-node-{os.getpid()}"
    assert not Path("/dev", name).exists()
    with Sandbox() as sbx:
        made = sbx.exec(["sh", "-c", f"mknod /dev/{name} c 195 250 && stat -c '%t:%T' /dev/{name}"],
                        capture=True)
        usable = sbx.exec(["sh", "-c", "echo x > /dev/null && head -c 4 /dev/urandom | wc -c && "
                                       "test -c /dev/pts/ptmx && tty_ok=$(script -qc true /dev/null "
                                       ">/dev/null 2>&1 && echo pty) ; echo ${tty_ok:-nopty}"],
                          capture=True)
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == "c3:fa"  # major 195, minor 250, in hex: the node exists inside
        assert usable.returncode == 0, usable.stderr
        assert usable.stdout.split() == ["4", "pty"]
        assert not Path("/dev", name).exists()  # ... and not on the host while the sandbox runs
    assert not Path("/dev", name).exists()


def test_two_at_once_and_one_after_another():
    results = {}

    def boot(key: str) -> None:
        with Sandbox() as sbx:
            results[key] = sbx.exec(["systemctl", "is-system-running"], capture=True).stdout.strip()
            results[key + "-cgroup"] = sbx.exec(["cat", "/proc/self/cgroup"], capture=True).stdout

    threads = [threading.Thread(target=boot, args=(k,)) for k in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    boot("c")
    assert results["a"] == results["b"] == results["c"] == "running"
    assert _sandbox_cgroups() == []


def test_command_exit_status_and_user_come_back():
    done = subprocess.run([sys.executable, str(SANDBOX_PY), "run", "--user", "sbxuser", "--",
                           "sh", "-c", "id -un; exit 7"], capture_output=True, text=True)
    assert done.returncode == 7, done.stderr
    assert done.stdout.strip() == "sbxuser"


def test_killed_launcher_takes_the_sandbox_down():
    launcher = subprocess.Popen([sys.executable, str(SANDBOX_PY), "run", "--", "sleep", "4242"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            "4242" in _cmdline(pid) for pid in _processes_of_sandboxes(launcher.pid)):
        time.sleep(0.05)
    assert _processes_of_sandboxes(launcher.pid), "the sandbox never started its command"
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_of_sandboxes(launcher.pid):
        time.sleep(0.05)
    assert _processes_of_sandboxes(launcher.pid) == []
    cleanup_stale()
    assert _sandbox_cgroups(launcher.pid) == []


def test_ctrl_c_tears_down():
    launcher = subprocess.Popen([sys.executable, str(SANDBOX_PY), "run", "--", "sleep", "4343"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            "4343" in _cmdline(pid) for pid in _processes_of_sandboxes(launcher.pid)):
        time.sleep(0.05)
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=20) != 0
    assert _processes_of_sandboxes(launcher.pid) == []
    assert _sandbox_cgroups(launcher.pid) == []


def test_failed_boot_exits_non_zero_with_the_boot_log():
    before = set(p.name for p in cgroup2_mount().glob(PREFIX + "*"))
    done = subprocess.run([sys.executable, str(SANDBOX_PY), "run", "--boot-timeout", "0.001", "--",
                           "true"], capture_output=True, text=True)
    assert done.returncode == 125
    assert "boot failed" in done.stderr and "sandbox boot log" in done.stderr
    assert set(p.name for p in cgroup2_mount().glob(PREFIX + "*")) <= before


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
