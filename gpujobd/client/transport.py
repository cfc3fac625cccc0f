"""The client's D-Bus transport: the one module of the client that imports a D-Bus library (Gio).

Calls go straight through Gio's `call_sync` with the contract's known signatures: no introspection
round trip per connection, and every call has a timeout. A D-Bus or Gio failure becomes the
`errors.GpujobdError` it means (`error_from_glib`). What is sent is built elsewhere as plain values
and {key: (signature, value)} dicts; they become GLib.Variant values only here.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

from gi.repository import Gio, GLib

from gpujobd.client import outgoing
from gpujobd.shared import api, errors
from gpujobd.shared.model import FINAL_STATES

DEFAULT_CALL_TIMEOUT_S = 30.0

_DBUS = "org.freedesktop.DBus"
_DBUS_ERROR = _DBUS + ".Error."
_REMOTE_ERROR = re.compile(r"\AGDBus\.Error:([^\s:]+):\s?(.*)\Z", re.DOTALL)
_UNAVAILABLE_ERRORS = frozenset(
    _DBUS_ERROR + name
    for name in ("ServiceUnknown", "NameHasNoOwner", "Disconnected", "NoServer", "SpawnChildExited",
                 "SpawnChildSignaled", "SpawnExecFailed", "SpawnFailed", "SpawnServiceNotFound")
)
_TIMEOUT_ERRORS = frozenset(_DBUS_ERROR + name for name in ("NoReply", "Timeout", "TimedOut"))
_DENIED_ERRORS = frozenset(
    _DBUS_ERROR + name for name in ("AccessDenied", "InteractiveAuthorizationRequired")
)
_INVALID_ERRORS = frozenset(_DBUS_ERROR + name for name in ("InvalidArgs", "InvalidSignature"))
_MISMATCH_ERRORS = frozenset(
    _DBUS_ERROR + name for name in ("UnknownMethod", "UnknownObject", "UnknownInterface")
)
# Local (not remote) errors that mean the bus cannot be reached: no socket, refused, closed, ...
_UNREACHABLE_IO_ERRORS = ("NOT_FOUND", "CONNECTION_REFUSED", "CLOSED", "BROKEN_PIPE", "CONNECTION_CLOSED",
                          "NOT_CONNECTED", "HOST_UNREACHABLE", "NETWORK_UNREACHABLE", "PERMISSION_DENIED")
_HINT = "check `systemctl status gpujobd`"
_FINAL_STATE_NAMES = frozenset(state.value for state in FINAL_STATES)

Wire = Mapping[str, Tuple[str, Any]]  # {key: (D-Bus signature, plain value)}


# --- error mapping -----------------------------------------------------------------------------------


def error_from_glib(error: Any, what: str, timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> errors.GpujobdError:
    """A GLib.Error raised by a D-Bus call (or by connecting) -> the GpujobdError it means.

    `what` names the operation for the message ("Submit", "connecting to the system bus").
    """
    message = str(getattr(error, "message", None) or error)
    remote = _REMOTE_ERROR.match(message)
    if remote is not None:
        return _error_from_remote(remote.group(1), remote.group(2), what, timeout_s)
    if _is_io_error(error, ("TIMED_OUT",)):
        return _timed_out(what, timeout_s)
    if _is_io_error(error, _UNREACHABLE_IO_ERRORS):
        return _unavailable(message)
    return errors.GpujobdError(f"{what} failed: {message}")


def _error_from_remote(name: str, text: str, what: str, timeout_s: float) -> errors.GpujobdError:
    if name.startswith(errors.ERROR_PREFIX):
        return errors.from_dbus_name(name, text)
    if name in _UNAVAILABLE_ERRORS:
        return _unavailable(text)
    if name in _TIMEOUT_ERRORS:
        return _timed_out(what, timeout_s, text)
    if name in _DENIED_ERRORS:
        return errors.PermissionDenied(
            f"the system bus refused {what} ({text}): is gpujobd's D-Bus policy installed? "
            "Ask the server's administrator"
        )
    if name in _INVALID_ERRORS:
        return errors.InvalidArgument(f"{what}: {text}")
    if name in _MISMATCH_ERRORS:
        return errors.GpujobdError(
            f"the service at {api.BUS_NAME} does not implement {api.INTERFACE}.{what} ({text}): "
            "the client and the daemon are probably different versions"
        )
    return errors.GpujobdError(f"{what} failed: {name}: {text}")


def _is_io_error(error: Any, code_names: Tuple[str, ...]) -> bool:
    matches = getattr(error, "matches", None)
    if matches is None:
        return False
    codes = (getattr(Gio.IOErrorEnum, name, None) for name in code_names)
    return any(code is not None and matches(Gio.io_error_quark(), code) for code in codes)


def _unavailable(detail: str) -> errors.Unavailable:
    return errors.Unavailable(
        f"gpujobd is not running or the system bus is unreachable ({detail.strip()}): {_HINT}"
    )


def _timed_out(what: str, timeout_s: float, detail: str = "") -> errors.Unavailable:
    extra = f" ({detail.strip()})" if detail.strip() else ""
    return errors.Unavailable(
        f"gpujobd did not answer {what} within {timeout_s:g}s{extra}: it may be overloaded or hung; "
        f"{_HINT}"
    )


# --- what is sent, as GLib.Variant values ------------------------------------------------------------


def to_variants(wire: Wire) -> Dict[str, GLib.Variant]:
    """{key: (signature, value)} -> {key: GLib.Variant}: an a{sv} ready to send."""
    return {key: GLib.Variant(signature, value) for key, (signature, value) in wire.items()}


def build_spec(argv: Sequence[str], **options: Any) -> Dict[str, GLib.Variant]:
    """The Submit spec as an a{sv} dict of GLib.Variant values (see `outgoing.spec_wire`)."""
    return to_variants(outgoing.spec_wire(argv, **options))


def build_filter(**query: Any) -> Dict[str, GLib.Variant]:
    """The List filter as an a{sv} dict, with only the keys that are given (`outgoing.filter_wire`)."""
    return to_variants(outgoing.filter_wire(**query))


# --- the connection ----------------------------------------------------------------------------------


class Transport:
    """A Gio connection to the bus, opened on first use, and the calls gpujobd's contract has.

    `bus`: None for the system bus (Gio honours DBUS_SYSTEM_BUS_ADDRESS), a Gio.DBusConnection, a
    pydbus bus (its connection is used) or a bus address string such as "unix:path=/run/x/bus".
    """

    def __init__(self, bus: Any = None, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self._bus = bus
        self._connection: Gio.DBusConnection | None = None
        self.call_timeout_s = float(call_timeout_s)

    def call(self, method: str, signature: str | None, args: Tuple[Any, ...], reply_type: str) -> Any:
        """Call a method of the contract; its reply unpacked into plain values (a tuple).

        An `a{sv}` argument is given as {key: (signature, value)}."""
        return self._call(method, self._arguments(signature, args), reply_type).unpack()

    def read_log(self, job_id: int, offset: int, max_bytes: int) -> Tuple[bytes, int, bool]:
        """ReadLog, with its bytes taken as one buffer (not unpacked byte by byte)."""
        reply = self._call("ReadLog", GLib.Variant("(ttu)", (job_id, offset, max_bytes)), "(aytb)")
        data = reply.get_child_value(0).get_data_as_bytes().get_data() or b""
        return bytes(data), reply.get_child_value(1).get_uint64(), reply.get_child_value(2).get_boolean()

    @contextlib.contextmanager
    def watch(self, job_id: int) -> Iterator[Callable[[float], None]]:
        """Subscribe to what may end a wait for the job; yields `sleep(seconds)`, which returns at
        a wakeup or after `seconds`. The subscriptions live on a private main context."""
        connection = self._conn()
        context = GLib.MainContext.new()
        context.push_thread_default()
        try:
            with _Wakeups(connection, job_id) as wakeups:
                yield lambda seconds: wakeups.wait(context, seconds)
        finally:
            context.pop_thread_default()

    @staticmethod
    def _arguments(signature: str | None, args: Tuple[Any, ...]) -> GLib.Variant | None:
        if signature is None:
            return None
        if signature == "(a{sv})":
            args = (to_variants(args[0]),)
        return GLib.Variant(signature, args)

    def _conn(self) -> Gio.DBusConnection:
        if self._connection is None:
            self._connection = self._open()
        return self._connection

    def _open(self) -> Gio.DBusConnection:
        bus = self._bus
        try:
            if bus is None:
                return Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
            if isinstance(bus, str):
                flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                         | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
                return Gio.DBusConnection.new_for_address_sync(bus, flags, None, None)
        except GLib.Error as error:
            raise error_from_glib(error, "connecting to the system bus", self.call_timeout_s) from None
        return getattr(bus, "con", bus)  # a pydbus bus wraps its Gio.DBusConnection as .con

    def _call(self, method: str, args: GLib.Variant | None, reply_type: str) -> GLib.Variant:
        connection = self._conn()
        try:
            return connection.call_sync(
                api.BUS_NAME, api.OBJECT_PATH, api.INTERFACE, method, args,
                GLib.VariantType.new(reply_type), Gio.DBusCallFlags.NONE,
                int(self.call_timeout_s * 1000), None,
            )
        except GLib.Error as error:
            raise error_from_glib(error, method, self.call_timeout_s) from None


class _Wakeups:
    """Signal subscriptions that wake `Client.wait`: the job's JobChanged to a final state, and the
    daemon's bus name changing owner (a restart: the job may have been settled meanwhile)."""

    def __init__(self, connection: Gio.DBusConnection, job_id: int) -> None:
        self._connection = connection
        self._job_id = job_id
        self._subscriptions: List[int] = []
        self._woken = False

    def __enter__(self) -> _Wakeups:
        self._subscribe(api.BUS_NAME, api.INTERFACE, "JobChanged", api.OBJECT_PATH, None,
                        self._on_job_changed)
        self._subscribe(_DBUS, _DBUS, "NameOwnerChanged", "/org/freedesktop/DBus", api.BUS_NAME,
                        self._on_owner_changed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for subscription in self._subscriptions:
            self._connection.signal_unsubscribe(subscription)
        self._subscriptions.clear()

    def wait(self, context: GLib.MainContext, seconds: float) -> None:
        """Run the context until a wakeup or `seconds` pass."""
        if self._woken:
            self._woken = False
            return
        timer = GLib.timeout_source_new(max(1, int(seconds * 1000)))
        timer.set_callback(self._on_timer)
        timer.attach(context)
        try:
            while not self._woken:
                context.iteration(True)
        finally:
            timer.destroy()
        self._woken = False

    def _subscribe(self, sender: str, interface: str, member: str, path: str, arg0: str | None,
                   callback: Callable[..., None]) -> None:
        self._subscriptions.append(self._connection.signal_subscribe(
            sender, interface, member, path, arg0, Gio.DBusSignalFlags.NONE, callback
        ))

    def _on_job_changed(self, _conn: Any, _sender: str, _path: str, _iface: str, _member: str,
                        params: GLib.Variant) -> None:
        job_id, state = params.unpack()
        if job_id == self._job_id and state in _FINAL_STATE_NAMES:
            self._woken = True

    def _on_owner_changed(self, _conn: Any, _sender: str, _path: str, _iface: str, _member: str,
                          params: GLib.Variant) -> None:
        _name, _old, new = params.unpack()
        if new:
            self._woken = True

    def _on_timer(self, *_args: object) -> bool:
        self._woken = True
        return GLib.SOURCE_REMOVE
