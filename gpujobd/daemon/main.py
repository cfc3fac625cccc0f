"""`gpujobd`: the composition root. It builds every object, wires the events, and runs the loop.

systemd owns the lifecycle (Type=notify, no fork, no pidfile). READY=1 is sent only after the daemon
has reconciled its state with systemd and owns its bus name.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from gpujobd import __version__
from gpujobd.shared.config import Config
from gpujobd.shared.config_toml import dump_toml, load_config
from gpujobd.shared.errors import ConfigError
from gpujobd.shared.log import guarded


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpujobd",
        description="Run every job of a shared GPU server in its own transient systemd scope. "
                    "Started by systemd (gpujobd.service); users talk to it with gpujobctl.",
        epilog="Configuration: --config, else $GPUJOBD_CONFIG, else /etc/gpujobd/gpujobd.toml "
               "(see docs/configuration.md).",
    )
    parser.add_argument("--config", metavar="PATH", help="configuration file to read")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print the effective values, and exit")
    parser.add_argument("--version", action="version", version=f"gpujobd {__version__}")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from gpujobd.shared.log import configure_logging, get_logger

    try:
        config = load_config(args.config)
    except ConfigError as err:
        configure_logging()  # the file's own log settings are what could not be read: the defaults
        get_logger().error("config.invalid", error=str(err))
        return err.exit_code
    if args.check_config:
        sys.stdout.write(dump_toml(config))
        return 0
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    # pydbus logs every exception a method raises, with its traceback; the service logs its own
    # errors as events (api.error, api.internal_error), so silence the duplicate.
    logging.getLogger("pydbus").setLevel(logging.CRITICAL)
    if os.geteuid() != 0:
        get_logger().error("daemon.not_root", hint="gpujobd starts jobs as their users, so it must run "
                           "as root: run it with `systemctl start gpujobd`")
        return 1
    return run(config)


class _GLibScheduler:
    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]:
        from gi.repository import GLib

        def fire() -> bool:
            guarded(callback, "timer")()
            return False

        return _remover(GLib.timeout_add(int(seconds * 1000), fire))


def _watch_readable(fd: int, callback: Callable[[], bool]) -> Callable[[], None]:
    """Call `callback` on the main loop whenever `fd` is readable (or hung up) until it returns False;
    returns the cancel."""
    from gi.repository import GLib

    return _remover(GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, fd,
                                          GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR,
                                          lambda _fd, _condition: callback()))


def _remover(source: int) -> Callable[[], None]:
    """The cancel of a main-loop source: a no-op once the source is gone (fired, or returned False)."""
    from gi.repository import GLib

    return lambda: GLib.source_remove(source) if GLib.main_context_default().find_source_by_id(
        source) else None


def run(config: Config) -> int:
    from gi.repository import Gio, GLib
    from pydbus import SystemBus

    from gpujobd.daemon import retention
    from gpujobd.daemon.adapters import users
    from gpujobd.daemon.adapters.dbus_service import ManagerService, publish
    from gpujobd.daemon.adapters.mainloop import glib_post
    from gpujobd.daemon.adapters.nvml import Nvml
    from gpujobd.daemon.adapters.procfs import ProcFs
    from gpujobd.daemon.adapters.systemd import JobUnits, Systemd, notify_ready
    from gpujobd.daemon.gpu.strays import system_uid_min
    from gpujobd.daemon.gpu.watcher import Watcher
    from gpujobd.daemon.gpu.worker import Worker
    from gpujobd.daemon.manager import Manager
    from gpujobd.daemon.spawner import RECORD_SUFFIX, RUNS_SUFFIX, JobFiles
    from gpujobd.daemon.store import Store
    from gpujobd.daemon.zygote import Zygote
    from gpujobd.shared import api
    from gpujobd.shared.log import get_logger
    from gpujobd.shared.model import UNIT_PREFIX, Job

    log = get_logger()
    loop = GLib.MainLoop()
    bus = SystemBus()
    state_dir = Path(config.daemon.state_dir)
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    store = Store(state_dir / "gpujobd.sqlite3", config.daemon.db_busy_timeout_s)
    files = JobFiles(Path(config.daemon.job_log_dir), state_dir / "exits")
    systemd = Systemd(bus.con, UNIT_PREFIX, config.daemon.unit_match_rules_max,
                      config.daemon.systemd_calls_in_flight_max, config.daemon.systemd_call_timeout_s)
    service: List[ManagerService] = []

    def reap(pid: int) -> None:
        GLib.child_watch_add(GLib.PRIORITY_DEFAULT, pid, lambda pid, status: None)

    scheduler = _GLibScheduler()
    # One pre-started supervisor forks each job's (docs/design.md, "Starting a job"); the supervisors
    # it forks are its children, reaped by the kernel (it ignores SIGCHLD), not ours.
    zygote = Zygote(config.daemon.zygote_timeout_s, on_started=reap, watch_readable=_watch_readable,
                    call_later=scheduler.call_later)
    zygote.start()

    def changed(job: Job) -> None:
        if service:
            service[0].job_changed(job)

    job_units = JobUnits(systemd, config.daemon.slice, config.jobs.stop_timeout_s,
                         config.daemon.per_user_slices)
    # The GPU watcher: NVML and /proc are read on its one worker thread, never on this loop.
    watcher = Watcher(config, live_jobs=lambda: manager.live_job_ids(), scheduler=scheduler,
                      worker=Worker(post=glib_post), nvml=Nvml(), procs=ProcFs(),
                      stop_unit=job_units.stop_unit, daemon_pid=os.getpid(), uid_min=system_uid_min())
    manager = Manager(config, store, job_units, files, zygote.spawn, scheduler, changed, users=users,
                      gpus=watcher)
    watcher.on_report = manager.gpus_changed
    systemd.subscribe(manager.on_unit_changed, manager.on_unit_removed)
    monitor = _watch_records(Gio, files.record_dir, {RECORD_SUFFIX: manager.on_exit_record,
                                                     RUNS_SUFFIX: manager.on_runs_file})
    _survive_a_lost_database(store, files, config, log)
    manager.reconcile()
    retention.schedule(config, store, files, scheduler, time.time)
    _guard_the_reserve(config, store, files, scheduler, log)
    service.append(ManagerService(manager, bus.con, gpus=watcher,
                                   caller_lookup_timeout_s=config.daemon.caller_lookup_timeout_s))
    watcher.on_stray_found = service[0].stray_found
    watcher.on_stray_cleared = service[0].stray_cleared
    try:
        unpublish = publish(bus, service[0])
    except (GLib.Error, RuntimeError) as err:
        log.error("daemon.bus_name_refused", bus_name=api.BUS_NAME, error=str(err),
                  hint="is the D-Bus policy org.gpujobd1.conf installed? `systemctl reload dbus` "
                       "makes dbus-daemon read it")
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, _quit(loop, log, signum))
    lost_bus: List[bool] = []
    bus.con.set_exit_on_close(False)
    bus.con.connect("closed", lambda *_args: _bus_lost(loop, log, lost_bus))
    notify_ready(f"serving {api.BUS_NAME}")
    log.info("daemon.ready", version=__version__, bus_name=api.BUS_NAME, pid=os.getpid())
    watcher.start()
    try:
        loop.run()
    finally:
        monitor.cancel()
        unpublish()
        zygote.close()
        store.close()
    if lost_bus:
        return EXIT_BUS_LOST  # systemd restarts it (Restart=always), and it connects again
    log.info("daemon.stopped", jobs_left_running="all: jobs live in their own scopes")
    return 0


EXIT_BUS_LOST = 75  # EX_TEMPFAIL


def _bus_lost(loop: Any, log: Any, lost: List[bool]) -> None:
    log.error("daemon.bus_lost", action="exiting so that systemd restarts gpujobd")
    lost.append(True)
    loop.quit()


def _guard_the_reserve(config: Config, store: Any, files: Any, scheduler: Any, log: Any) -> None:
    from gpujobd.daemon.protection import guard_reserve

    def tick() -> None:
        free = files.free_space()[str(files.record_dir)]
        if guard_reserve(free, store, config.limits) == "released":
            log.warning("disk.reserve_released", path=str(store.reserve_path), free_bytes=free,
                        reason="the state filesystem is full; its room is for the ends of running jobs")
        scheduler.call_later(config.limits.disk_check_interval_s, tick)
    tick()


def _survive_a_lost_database(store: Any, files: Any, config: Config, log: Any) -> None:
    """New ids start above every id that has a log or record on disk; the full-disk reserve is kept."""
    highest = files.highest_job_id()
    if store.ensure_ids_above(highest):
        log.warning("daemon.ids_raised", above=highest,
                    reason="the job database knew fewer jobs than there are files of (was it lost?)")
    if not store.keep_reserve(config.limits.db_reserve_mib << 20):
        log.warning("daemon.no_reserve", path=str(store.reserve_path),
                    reason="could not allocate it; ends may be lost when the disk fills")


def _quit(loop: Any, log: Any, signum: int) -> Callable[[], bool]:
    def handler() -> bool:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        loop.quit()
        return False
    return handler


def _watch_records(Gio: Any, directory: Path, handlers: Dict[str, Callable[[int], None]]) -> Any:
    """Supervisors rename their exit record into place and append to their runs file; inotify
    tells us of both without polling."""
    monitor = Gio.File.new_for_path(str(directory)).monitor_directory(
        Gio.FileMonitorFlags.WATCH_MOVES, None)
    interesting = (Gio.FileMonitorEvent.CREATED, Gio.FileMonitorEvent.MOVED_IN,
                   Gio.FileMonitorEvent.RENAMED, Gio.FileMonitorEvent.CHANGES_DONE_HINT)

    def changed(_monitor: Any, file: Any, other_file: Any, event: Any) -> None:
        if event not in interesting:
            return
        target = other_file if event == Gio.FileMonitorEvent.RENAMED else file
        name = target.get_basename() if target is not None else ""
        stem, dot, suffix = name.partition(".")
        handler = handlers.get(dot + suffix)
        if handler is not None and stem.isdigit():
            guarded(handler, "files.record_changed")(int(stem))

    monitor.connect("changed", changed)
    return monitor


if __name__ == "__main__":
    sys.exit(main())
