"""The bus layer: the real D-Bus service and the real client on a private dbus-daemon owned by the test.

No systemd and no system bus: a `dbus-daemon` of the test's own (a config file in a temporary
directory, any user may connect), the real `ManagerService` published on it by the real `publish()`,
over a real `Manager` whose timers run on the service's GLib loop, whose systemd, spawner and files
are the stateful fakes of tests/unit/test_manager.py and whose store is a real SQLite file. The
service's GLib loop runs on a thread of its own, as the daemon's does in its process; the test
drives the fakes on that thread.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

BUS_START_TIMEOUT_S = 10.0
LOOP_CALL_TIMEOUT_S = 10.0
AS_USER = Path(__file__).resolve().parent / "as_user.py"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def bus_address() -> Iterator[str]:
    """A private dbus-daemon's address; the daemon and its directory are gone after the test."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("needs dbus-daemon (Debian: dbus-daemon)")
    where = Path(tempfile.mkdtemp(prefix="gpujobd-bus-"))
    where.chmod(0o755)  # a caller of another user reaches the socket
    config = where / "bus.conf"
    config.write_text(BUS_CONFIG.format(socket=where / "socket"))
    log = where / "dbus-daemon.log"  # its complaints (it cannot raise its fd limit here, ...)
    with open(log, "wb") as errors_out:
        daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
                                  stdout=subprocess.PIPE, stderr=errors_out, text=True)
    try:
        address = _first_line(daemon, BUS_START_TIMEOUT_S, log)
        assert address.startswith("unix:"), f"dbus-daemon printed {address!r}, not an address"
        yield address
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        shutil.rmtree(where, ignore_errors=True)


def _first_line(process: subprocess.Popen, timeout: float, log: Path) -> str:
    lines: List[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        raise AssertionError(f"dbus-daemon gave no address within {timeout}s (exit {process.poll()}): "
                             f"{log.read_text(errors='replace')}")
    return lines[0].strip()


class Loop:
    """A GLib main loop (the default context) on a thread of its own; `call` runs a function there."""

    def __init__(self) -> None:
        from gi.repository import GLib

        self._glib = GLib
        self._loop = GLib.MainLoop()
        self._thread = threading.Thread(target=self._loop.run, name="service-loop", daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        done = threading.Event()
        result: dict = {}

        def run() -> bool:
            try:
                result["value"] = function(*args)
            except BaseException as error:  # handed to the caller's thread
                result["error"] = error
            done.set()
            return False

        self._glib.idle_add(run)
        if not done.wait(LOOP_CALL_TIMEOUT_S):
            raise AssertionError(f"the service loop did not run {function} within {LOOP_CALL_TIMEOUT_S}s")
        if "error" in result:
            raise result["error"]
        return result.get("value")

    def stop(self) -> None:
        self._loop.quit()
        self._thread.join(timeout=LOOP_CALL_TIMEOUT_S)


class LiveService:
    """The real ManagerService over a real Manager (fakes for systemd and the supervisor, a real
    Store), published on the private bus by the real publish()."""

    def __init__(self, address: str, state_dir: Path) -> None:
        self.loop = Loop()
        self.loop.call(self._build, address, state_dir)

    def _build(self, address: str, state_dir: Path) -> None:
        import pydbus

        from gpujobd.daemon.adapters import users
        from gpujobd.daemon.adapters.dbus_service import ManagerService, publish
        from gpujobd.daemon.main import _GLibScheduler
        from gpujobd.daemon.manager import Manager
        from gpujobd.daemon.store import Store
        from gpujobd.shared.config import Config
        from tests.unit.test_manager import FakeFiles, FakeSpawner, FakeSystemd, Journal

        self.bus = pydbus.connect(address)
        self.store = Store(state_dir / "gpujobd.sqlite3")
        journal = Journal(self.store)
        self.systemd = FakeSystemd(journal)
        self.files = FakeFiles(journal)
        self.service: Optional[ManagerService] = None
        self.manager = Manager(Config(), self.store, self.systemd, self.files, FakeSpawner(journal),
                               _GLibScheduler(), self._changed, users=users)
        self.systemd.manager = self.manager
        self.service = ManagerService(self.manager, self.bus.con)
        self._unpublish = publish(self.bus, self.service)

    def _changed(self, job: Any) -> None:
        if self.service is not None:
            self.service.job_changed(job)

    def close(self) -> None:
        def down() -> None:
            self._unpublish()
            self.store.close()
            self.files.close()
            self.bus.con.close_sync(None)

        self.loop.call(down)
        self.loop.stop()


@pytest.fixture
def live_service(bus_address: str, tmp_path: Path) -> Iterator[LiveService]:
    service = LiveService(bus_address, tmp_path)
    yield service
    service.close()


def gpujobctl_as(user: str, address: str, *args: str) -> subprocess.CompletedProcess:
    """gpujobctl run as `user` (this process must be root) against the bus at `address`."""
    return subprocess.run([sys.executable, str(AS_USER), user, address, *args], capture_output=True,
                          text=True, timeout=60, cwd="/")
