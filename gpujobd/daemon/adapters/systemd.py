"""The systemd adapter: transient scopes, their start and stop, and their state changes, over D-Bus.

It speaks to systemd on the daemon's one system-bus connection (Gio, shared with the D-Bus service)
so that every wait is a signal dispatched by the one GLib main loop: no thread, no polling. sd_notify
goes through pystemd. Nothing else in gpujobd talks to systemd.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from gi.repository import Gio, GLib

from gpujobd.shared import text
from gpujobd.shared.log import guarded
from gpujobd.shared.model import UNIT_PREFIX, UNIT_SUFFIX, Job

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SCOPE_IFACE = "org.freedesktop.systemd1.Scope"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
CALL_TIMEOUT_MS = 25_000

_SAFE = set(string.ascii_letters + string.digits)

JobDone = Callable[[str], None]  # called with systemd's job result: done, failed, canceled, timeout, …
UnitChanged = Callable[[str, Dict[str, Any]], None]  # unit name, changed properties (plain values)


class SystemdError(RuntimeError):
    """systemd refused a call; the message is systemd's own."""


@dataclass(frozen=True)
class UnitInfo:
    name: str
    active_state: str
    sub_state: str


def unit_object_path(unit: str) -> str:
    """systemd's object path for a unit name (sd_bus_path_encode)."""
    escaped = "".join(c if c in _SAFE else f"_{ord(c):02x}" for c in unit)
    return f"{SYSTEMD_PATH}/unit/{escaped}"


def _dbus_error_text(err: GLib.Error) -> str:
    """'org.freedesktop.systemd1.NoSuchUnit: Unit x not loaded.' from a GDBus error."""
    if not Gio.DBusError.is_remote_error(err):
        return err.message
    name = Gio.DBusError.get_remote_error(err)
    Gio.DBusError.strip_remote_error(err)  # in place: leaves systemd's own message
    return f"{name}: {err.message}"


class Systemd:
    """Calls and signals of systemd's Manager, for the units whose names start with `unit_prefix`."""

    def __init__(self, connection: Gio.DBusConnection, unit_prefix: str):
        self._con = connection
        self._unit_path_prefix = unit_object_path(unit_prefix)
        self._pending_jobs: Dict[str, JobDone] = {}
        self._on_unit_changed: Optional[UnitChanged] = None
        self._on_unit_removed: Optional[Callable[[str], None]] = None
        self._subscriptions: List[int] = []

    # -- signals ---------------------------------------------------------------------------------
    def subscribe(self, on_unit_changed: UnitChanged, on_unit_removed: Callable[[str], None]) -> None:
        self._on_unit_changed = on_unit_changed
        self._on_unit_removed = on_unit_removed
        self._subscriptions = [
            self._con.signal_subscribe(SYSTEMD, MANAGER_IFACE, "JobRemoved", SYSTEMD_PATH, None,
                                       Gio.DBusSignalFlags.NONE, self._job_removed),
            self._con.signal_subscribe(SYSTEMD, MANAGER_IFACE, "UnitRemoved", SYSTEMD_PATH, None,
                                       Gio.DBusSignalFlags.NONE, self._unit_removed),
            self._con.signal_subscribe(SYSTEMD, PROPS_IFACE, "PropertiesChanged", None, None,
                                       Gio.DBusSignalFlags.NONE, self._properties_changed),
        ]
        self._call(SYSTEMD_PATH, MANAGER_IFACE, "Subscribe", None)

    def _job_removed(self, _con: Gio.DBusConnection, _sender: str, _path: str, _iface: str, _signal: str,
                     params: GLib.Variant) -> None:
        _id, job_path, _unit, result = params.unpack()
        callback = self._pending_jobs.pop(job_path, None)
        if callback is not None:
            guarded(callback, "systemd.job_removed")(result)

    def _unit_removed(self, _con: Gio.DBusConnection, _sender: str, _path: str, _iface: str, _signal: str,
                      params: GLib.Variant) -> None:
        unit, unit_path = params.unpack()
        if unit_path.startswith(self._unit_path_prefix) and self._on_unit_removed is not None:
            guarded(self._on_unit_removed, "systemd.unit_removed")(unit)

    def _properties_changed(self, _con: Gio.DBusConnection, _sender: str, path: str, _iface: str,
                            _signal: str, params: GLib.Variant) -> None:
        if not path.startswith(self._unit_path_prefix) or self._on_unit_changed is None:
            return
        interface, changed, _invalidated = params.unpack()
        if interface in (UNIT_IFACE, SCOPE_IFACE) and changed:
            guarded(self._on_unit_changed, "systemd.unit_changed")(_unit_name_from_path(path), changed)

    # -- calls -----------------------------------------------------------------------------------
    def _call(self, path: str, iface: str, method: str, args: Optional[GLib.Variant],
              reply_type: Optional[str] = None) -> Any:
        try:
            reply = self._con.call_sync(
                SYSTEMD, path, iface, method, args,
                GLib.VariantType.new(reply_type) if reply_type else None,
                Gio.DBusCallFlags.NONE, CALL_TIMEOUT_MS, None)
        except GLib.Error as err:
            raise SystemdError(_dbus_error_text(err)) from None
        return reply.unpack() if reply is not None else None

    def start_scope(self, unit: str, properties: Sequence[Tuple[str, GLib.Variant]],
                    on_done: JobDone) -> None:
        """Create a transient scope; `on_done(result)` runs when systemd's start job has finished."""
        args = GLib.Variant("(ssa(sv)a(sa(sv)))", (unit, "fail", list(properties), []))
        (job_path,) = self._call(SYSTEMD_PATH, MANAGER_IFACE, "StartTransientUnit", args, "(o)")
        self._pending_jobs[job_path] = on_done

    def stop_unit(self, unit: str) -> None:
        try:
            self._call(SYSTEMD_PATH, MANAGER_IFACE, "StopUnit",
                       GLib.Variant("(ss)", (unit, "replace")), "(o)")
        except SystemdError as err:
            if "NoSuchUnit" not in str(err):
                raise

    def list_units(self, pattern: str) -> List[UnitInfo]:
        (units,) = self._call(SYSTEMD_PATH, MANAGER_IFACE, "ListUnitsByPatterns",
                              GLib.Variant("(asas)", ([], [pattern])),
                              "(a(ssssssouso))")
        return [UnitInfo(name=u[0], active_state=u[3], sub_state=u[4]) for u in units]

    def unit_property(self, unit: str, iface: str, name: str) -> Any:
        """One property of a loaded unit, or None when the unit is gone."""
        try:
            (value,) = self._call(unit_object_path(unit), PROPS_IFACE, "Get",
                                  GLib.Variant("(ss)", (iface, name)), "(v)")
        except SystemdError:
            return None
        return value


def _unit_name_from_path(path: str) -> str:
    escaped = path.rsplit("/", 1)[1]
    out, i = [], 0
    while i < len(escaped):
        if escaped[i] == "_" and _is_hex(escaped[i + 1:i + 3]):
            out.append(chr(int(escaped[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(escaped[i])
            i += 1
    return "".join(out)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in string.hexdigits for c in text)


def scope_properties(*, pids: Sequence[int], slice_name: str, description: str,
                     stop_timeout_s: float, runtime_max_s: Optional[float],
                     extra: Sequence[Tuple[str, GLib.Variant]] = ()) -> List[Tuple[str, GLib.Variant]]:
    """The properties of a job's scope. PIDs must be real processes other than PID 1 and ourselves."""
    for pid in pids:
        if pid <= 1:
            raise ValueError(f"refusing to put PID {pid} into a scope (0 means the caller, 1 is init)")
    props = [
        ("PIDs", GLib.Variant("au", list(pids))),
        ("Slice", GLib.Variant("s", slice_name)),
        ("Description", GLib.Variant("s", description)),
        ("TimeoutStopUSec", GLib.Variant("t", _usec(stop_timeout_s))),
        ("CollectMode", GLib.Variant("s", "inactive-or-failed")),
    ]
    if runtime_max_s is not None:
        props.append(("RuntimeMaxUSec", GLib.Variant("t", _usec(runtime_max_s))))
    return props + list(extra)


def job_slice(parent: str, uid: int) -> str:
    """A user's sub-slice: gpujob.slice -> gpujob-u1001.slice (systemd nests it by its name)."""
    return f"{parent[: -len('.slice')]}-u{uid}.slice"


DESCRIPTION_MAX_CHARS = 200


def scope_description(job: Job) -> str:
    """The scope's Description= (shown by `systemctl status` and `list-units`): the command with
    every control character escaped, so no job can clear an admin's screen or forge a line."""
    command = text.escaped(" ".join(job.spec.argv)[:DESCRIPTION_MAX_CHARS])
    return f"gpujob {job.id} of {text.escaped(job.user)}: {command}"


def _usec(seconds: float) -> int:
    return round(seconds * 1_000_000)


def notify_ready(status: str) -> None:
    """Tell systemd (Type=notify) that the daemon is ready. A no-op outside a notify service."""
    import pystemd.daemon

    pystemd.daemon.notify(False, "READY=1", f"STATUS={status}")


def notify_status(status: str) -> None:
    import pystemd.daemon

    pystemd.daemon.notify(False, f"STATUS={status}")


class JobUnits:
    """The manager's view of systemd: one scope per job, named and configured here."""

    def __init__(self, systemd: Systemd, slice_name: str, stop_timeout_s: float,
                 per_user_slices: bool = False):
        self._systemd = systemd
        self._slice = slice_name
        self._stop_timeout_s = stop_timeout_s
        self._per_user = per_user_slices

    def start_scope(self, job: Job, pid: int, properties: Sequence[Tuple[str, str, Any]],
                    on_done: JobDone) -> None:
        extra = [(name, GLib.Variant(signature, value)) for name, signature, value in properties]
        description = scope_description(job)
        self._systemd.start_scope(job.unit, scope_properties(
            pids=[pid], slice_name=job_slice(self._slice, job.uid) if self._per_user else self._slice,
            description=description,
            stop_timeout_s=self._stop_timeout_s, runtime_max_s=job.spec.timeout_s, extra=extra,
        ), on_done)

    def stop_unit(self, unit: str) -> None:
        self._systemd.stop_unit(unit)

    def list_job_units(self) -> Dict[str, str]:
        return {u.name: u.active_state for u in self._systemd.list_units(f"{UNIT_PREFIX}*{UNIT_SUFFIX}")}

    def scope_result(self, unit: str) -> Optional[str]:
        value = self._systemd.unit_property(unit, SCOPE_IFACE, "Result")
        return str(value) if value is not None else None
