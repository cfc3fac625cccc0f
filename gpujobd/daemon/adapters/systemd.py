"""The systemd adapter: transient scopes, their start and stop, and their state changes, over D-Bus.

It speaks to systemd on the daemon's one system-bus connection (Gio, shared with the D-Bus service)
so that every wait is a signal dispatched by the one GLib main loop: no thread, no polling. sd_notify
goes through pystemd. Nothing else in gpujobd talks to systemd.
"""

from __future__ import annotations

import collections
import functools
import string
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from gi.repository import Gio, GLib

from gpujobd.shared import text
from gpujobd.shared.config import DaemonConfig
from gpujobd.shared.log import get_logger, guarded
from gpujobd.shared.model import UNIT_PREFIX, UNIT_SUFFIX, Job

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SCOPE_IFACE = "org.freedesktop.systemd1.Scope"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"
_JOB_REMOVED_RULE = (f"type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',"
                     f"interface='{MANAGER_IFACE}',member='JobRemoved'")
# What on_unit_changed is given of a unit's PropertiesChanged. A scope's carries ~40 properties, and
# unpacking them all through PyGObject was a third of the daemon's CPU in a burst (8 signals a job).
UNIT_CHANGE_PROPERTIES = ("ActiveState", "SubState", "Result")

log = get_logger()
_SAFE = set(string.ascii_letters + string.digits)

JobDone = Callable[[str], None]  # called with systemd's job result: done, failed, canceled, timeout, …
UnitChanged = Callable[[str, Dict[str, Any]], None]  # unit, its changed UNIT_CHANGE_PROPERTIES (plain)


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
    """Calls and signals of systemd's Manager, for the daemon's own units only.

    Every call from the main loop is asynchronous (`Gio.DBusConnection.call`): the loop never waits
    for systemd; a reply or error comes back as a callback. Signals are matched per unit at the bus
    (a rule per job unit for its `PropertiesChanged`, its path; and, while its start job runs, one
    for `JobRemoved` with arg2 = the unit), so units that are not ours, however many start on the
    machine, never wake the daemon. dbus-daemon caps the rules of one connection (512 on a default
    system bus): past `max_unit_rules` own rules, a kind of signal falls back to one rule for all
    units, filtered here, until the units beyond the cap have ended.
    """

    def __init__(self, connection: Gio.DBusConnection, unit_prefix: str,
                 max_unit_rules: int = DaemonConfig.unit_match_rules_max,
                 max_calls_in_flight: int = DaemonConfig.systemd_calls_in_flight_max,
                 call_timeout_s: float = DaemonConfig.systemd_call_timeout_s):
        self._con = connection
        self._call_timeout_ms = int(call_timeout_s * 1000)
        # dbus-daemon fails a connection's call past its pending replies (max_replies_per_connection,
        # 128 on a default system bus) with LimitsExceeded: a burst of submits started that many
        # scopes at once and some jobs ended start-failed. Calls past the cap wait, in order.
        self._max_calls = max_calls_in_flight
        self._in_flight = 0
        self._waiting_calls: Deque[Callable[[], None]] = collections.deque()
        self._unit_path_prefix = unit_object_path(unit_prefix)
        self._max_unit_rules = max_unit_rules
        self._pending_jobs: Dict[str, JobDone] = {}  # start job path -> on_done
        self._early_results: Dict[str, Tuple[str, str]] = {}  # job path -> (unit, result), before the reply
        self._starting: Dict[str, str] = {}  # unit -> its JobRemoved match rule ("" under the broad one)
        self._watched: Dict[str, Optional[int]] = {}  # unit -> its PropertiesChanged subscription
        self._broad_props: Optional[int] = None
        self._broad_jobs: Optional[str] = None
        self._on_unit_changed: Optional[UnitChanged] = None
        self._on_unit_removed: Optional[Callable[[str], None]] = None
        self._subscriptions: List[int] = []

    # -- signals ---------------------------------------------------------------------------------
    def subscribe(self, on_unit_changed: UnitChanged, on_unit_removed: Callable[[str], None]) -> None:
        """Receive our units' changes. `on_unit_removed` is kept for the port: a unit's end is its
        PropertiesChanged (systemd flushes it before UnitRemoved), so no UnitRemoved rule is added."""
        self._on_unit_changed = on_unit_changed
        self._on_unit_removed = on_unit_removed
        # Dispatch for JobRemoved without a rule of its own: the rules are added per unit (arg2).
        self._subscriptions = [
            self._con.signal_subscribe(SYSTEMD, MANAGER_IFACE, "JobRemoved", SYSTEMD_PATH, None,
                                       Gio.DBusSignalFlags.NO_MATCH_RULE, self._job_removed),
        ]
        self._call(SYSTEMD, SYSTEMD_PATH, MANAGER_IFACE, "Subscribe", None)  # systemd emits only when asked

    def watch_unit(self, unit: str) -> None:
        """Deliver this unit's PropertiesChanged (idempotent) until `unwatch_unit`."""
        if unit in self._watched:
            return
        if self._broad_props is None and self._unit_rules() < self._max_unit_rules:
            self._watched[unit] = self._con.signal_subscribe(
                SYSTEMD, PROPS_IFACE, "PropertiesChanged", unit_object_path(unit), None,
                Gio.DBusSignalFlags.NONE, self._unit_properties_changed)
            return
        self._watched[unit] = None
        if self._broad_props is None:
            log.warning("systemd.unit_rules_full", max_unit_rules=self._max_unit_rules,
                        hint="PropertiesChanged of every unit is received until our units are fewer")
            self._broad_props = self._con.signal_subscribe(
                SYSTEMD, PROPS_IFACE, "PropertiesChanged", None, None, Gio.DBusSignalFlags.NONE,
                self._any_properties_changed)

    def unwatch_unit(self, unit: str) -> None:
        subscription = self._watched.pop(unit, None)
        if subscription is not None:
            self._con.signal_unsubscribe(subscription)
        if self._broad_props is not None and all(sub is not None for sub in self._watched.values()):
            self._con.signal_unsubscribe(self._broad_props)
            self._broad_props = None

    def _unit_rules(self) -> int:
        return sum(1 for sub in self._watched.values() if sub is not None) + \
            sum(1 for rule in self._starting.values() if rule)

    def _job_removed(self, _con: Gio.DBusConnection, _sender: str, _path: str, _iface: str, _signal: str,
                     params: GLib.Variant) -> None:
        _id, job_path, unit, result = params.unpack()
        if unit not in self._starting:
            return  # another unit's job, delivered through the broad rule
        callback = self._pending_jobs.pop(job_path, None)
        if callback is None:  # removed before StartTransientUnit's reply was dispatched
            self._early_results[job_path] = (unit, result)
            return
        self._start_over(unit)
        guarded(callback, "systemd.job_removed")(result)

    def _start_over(self, unit: str) -> None:
        for job_path in [path for path, (u, _) in self._early_results.items() if u == unit]:
            del self._early_results[job_path]  # another job of the unit (a stop while it started)
        rule = self._starting.pop(unit, "")
        if rule:
            self._remove_match(rule)
        if self._broad_jobs is not None and not self._starting:
            self._remove_match(self._broad_jobs)
            self._broad_jobs = None

    # A unit's signal is handed on by exactly one subscription, decided by the unit alone: its own
    # (it has one for as long as it is watched), else the broad one. Deciding by whether the broad
    # subscription exists when a callback runs lost signals: GDBus queues one callback per matching
    # subscription when the message arrives, and the broad one may have come or gone before they run
    # (a burst past max_unit_rules left finished jobs `running`).
    def _unit_properties_changed(self, _con: Gio.DBusConnection, _sender: str, path: str, _iface: str,
                                 _signal: str, params: GLib.Variant) -> None:
        self._properties_changed(_unit_name_from_path(path), params)

    def _any_properties_changed(self, _con: Gio.DBusConnection, _sender: str, path: str, _iface: str,
                                _signal: str, params: GLib.Variant) -> None:
        if not path.startswith(self._unit_path_prefix):
            return
        unit = _unit_name_from_path(path)
        if unit in self._watched and self._watched[unit] is None:  # no subscription of its own
            self._properties_changed(unit, params)

    def _properties_changed(self, unit: str, params: GLib.Variant) -> None:
        if unit not in self._watched or self._on_unit_changed is None:
            return
        if params.get_child_value(0).get_string() not in (UNIT_IFACE, SCOPE_IFACE):
            return
        changed = _looked_up(params.get_child_value(1), UNIT_CHANGE_PROPERTIES)
        if changed:
            guarded(self._on_unit_changed, "systemd.unit_changed")(unit, changed)

    # -- match rules of our own ------------------------------------------------------------------
    def _add_match(self, rule: str) -> None:
        self._call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "AddMatch",
                   GLib.Variant.new_tuple(GLib.Variant.new_string(rule)))

    def _remove_match(self, rule: str) -> None:
        self._call(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "RemoveMatch",
                   GLib.Variant.new_tuple(GLib.Variant.new_string(rule)))

    def _watch_start_job(self, unit: str) -> None:
        """JobRemoved of this unit's start job, matched at the bus before the start is asked for
        (dbus-daemon handles one connection's messages in order, so the rule is in place first)."""
        if self._unit_rules() < self._max_unit_rules:
            rule = _JOB_REMOVED_RULE + f",arg2='{unit}'"
            self._add_match(rule)
            self._starting[unit] = rule
            return
        self._starting[unit] = ""
        if self._broad_jobs is None:
            self._broad_jobs = _JOB_REMOVED_RULE
            self._add_match(self._broad_jobs)

    # -- calls -----------------------------------------------------------------------------------
    def _call(self, destination: str, path: str, iface: str, method: str, args: Optional[GLib.Variant],
              reply_type: Optional[str] = None, on_reply: Optional[Callable[[Any], None]] = None,
              on_error: Optional[Callable[[str], None]] = None) -> None:
        """An asynchronous call; `on_reply(unpacked)` or `on_error(message)` later, on the main loop.
        An error without `on_error` is logged. At most `max_calls_in_flight` are sent at once; the
        others are sent in the order they were made as replies come back."""
        def done(con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
            self._in_flight -= 1
            self._send_waiting_calls()
            try:
                reply = con.call_finish(result)
            except GLib.Error as err:
                text = _dbus_error_text(err)
                if on_error is not None:
                    guarded(on_error, "systemd.call_failed")(text)
                else:
                    log.warning("systemd.call_failed", method=method, error=text)
                return
            if on_reply is not None:
                guarded(on_reply, "systemd.reply")(reply.unpack() if reply is not None else None)

        def send() -> None:
            self._in_flight += 1
            self._con.call(destination, path, iface, method, args,
                           GLib.VariantType.new(reply_type) if reply_type else None,
                           Gio.DBusCallFlags.NONE, self._call_timeout_ms, None, done)

        self._waiting_calls.append(send)
        self._send_waiting_calls()

    def _send_waiting_calls(self) -> None:
        while self._waiting_calls and self._in_flight < self._max_calls:
            self._waiting_calls.popleft()()

    def _call_sync(self, path: str, iface: str, method: str, args: Optional[GLib.Variant],
                   reply_type: Optional[str] = None) -> Any:
        """A blocking call: only for the start's reconcile and rare reads (see list_units)."""
        try:
            reply = self._con.call_sync(
                SYSTEMD, path, iface, method, args,
                GLib.VariantType.new(reply_type) if reply_type else None,
                Gio.DBusCallFlags.NONE, self._call_timeout_ms, None)
        except GLib.Error as err:
            raise SystemdError(_dbus_error_text(err)) from None
        return reply.unpack() if reply is not None else None

    def start_scope(self, unit: str, properties: Sequence[Tuple[str, GLib.Variant]],
                    on_done: JobDone) -> None:
        """Create a transient scope; `on_done(result)` runs when systemd's start job has finished
        (result `done`, or `failed: <systemd's error>` when systemd refused the call)."""
        self.watch_unit(unit)
        self._watch_start_job(unit)

        def started(reply: Any) -> None:
            (job_path,) = reply
            early = self._early_results.pop(job_path, None)
            if early is None:
                self._pending_jobs[job_path] = on_done
                return
            self._start_over(unit)
            on_done(early[1])

        def refused(message: str) -> None:
            self._start_over(unit)
            on_done(f"failed: {message}")

        self._call(SYSTEMD, SYSTEMD_PATH, MANAGER_IFACE, "StartTransientUnit",
                   _start_transient_args(unit, properties), "(o)",
                   on_reply=started, on_error=refused)

    def stop_unit(self, unit: str) -> None:
        """Ask systemd to stop a unit; a unit that is not there is no error. Its end comes as signals."""
        def failed(message: str) -> None:
            if "NoSuchUnit" not in message:
                log.warning("systemd.stop_failed", unit=unit, error=message)

        self._call(SYSTEMD, SYSTEMD_PATH, MANAGER_IFACE, "StopUnit",
                   GLib.Variant("(ss)", (unit, "replace")), "(o)", on_error=failed)

    def list_units(self, pattern: str) -> List[UnitInfo]:
        """Synchronous: used by the reconcile before the daemon serves, and at the end of a job bound
        to another (whether that one is ending), where the answer is needed there and then."""
        (units,) = self._call_sync(SYSTEMD_PATH, MANAGER_IFACE, "ListUnitsByPatterns",
                                   GLib.Variant("(asas)", ([], [pattern])),
                                   "(a(ssssssouso))")
        return [UnitInfo(name=u[0], active_state=u[3], sub_state=u[4]) for u in units]

    def unit_property(self, unit: str, iface: str, name: str) -> Any:
        """One property of a loaded unit, or None when the unit is gone. Synchronous: read only when a
        scope ended without its Result having come in a signal (the reconcile, mostly)."""
        try:
            (value,) = self._call_sync(unit_object_path(unit), PROPS_IFACE, "Get",
                                       GLib.Variant("(ss)", (iface, name)), "(v)")
        except SystemdError:
            return None
        return value


@functools.lru_cache(maxsize=4096)  # a job's scope sends ~8 PropertiesChanged: unescaped once
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

    def watch_units(self, units: Sequence[str]) -> None:
        for unit in units:
            self._systemd.watch_unit(unit)

    def unwatch_unit(self, unit: str) -> None:
        self._systemd.unwatch_unit(unit)

    def list_job_units(self) -> Dict[str, str]:
        return {u.name: u.active_state for u in self._systemd.list_units(f"{UNIT_PREFIX}*{UNIT_SUFFIX}")}

    def scope_result(self, unit: str) -> Optional[str]:
        value = self._systemd.unit_property(unit, SCOPE_IFACE, "Result")
        return str(value) if value is not None else None


def _looked_up(properties: GLib.Variant, names: Sequence[str]) -> Dict[str, Any]:
    """The named entries of an a{sv}, unpacked; the others are never converted to Python."""
    found = {}
    for name in names:
        value = properties.lookup_value(name, None)
        if value is not None:
            found[name] = value.unpack()
    return found


_PROPERTY = GLib.VariantType.new("(sv)")
_AUXILIARY_UNIT = GLib.VariantType.new("(sa(sv))")


def _start_transient_args(unit: str, properties: Sequence[Tuple[str, GLib.Variant]]) -> GLib.Variant:
    """StartTransientUnit's (ssa(sv)a(sa(sv))), mode "fail", no auxiliary units: built with GLib's
    constructors (PyGObject's generic one costs ~10 times more, once per job)."""
    return GLib.Variant.new_tuple(
        GLib.Variant.new_string(unit), GLib.Variant.new_string("fail"),
        GLib.Variant.new_array(_PROPERTY, [
            GLib.Variant.new_tuple(GLib.Variant.new_string(name), GLib.Variant.new_variant(value))
            for name, value in properties]),
        GLib.Variant.new_array(_AUXILIARY_UNIT, []))

