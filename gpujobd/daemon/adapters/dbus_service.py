"""The D-Bus service: authorize the caller, decode, call the manager, encode. Nothing else.

Published with pydbus on the system bus under api.BUS_NAME (`publish()`). The caller's identity
comes from the bus (GetConnectionUnixUser of the message's sender), never from an argument or /proc;
when it cannot be established, the call is denied. GpujobdError subclasses become D-Bus errors with
their stable names; anything else becomes org.gpujobd1.Error.Internal, logged here, with no
traceback on the wire.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol, Tuple, TypeVar

from gi.repository import Gio, GLib
from pydbus.generic import signal
from pydbus.method_call_context import MethodCallContext
from pydbus.registration import ObjectRegistration, ObjectWrapper

from gpujobd import __version__
from gpujobd.daemon.manager import Caller, Manager
from gpujobd.shared import api, jobspec
from gpujobd.shared.config import DaemonConfig
from gpujobd.shared.errors import GpujobdError, Internal, InvalidArgument, PermissionDenied
from gpujobd.shared.log import get_logger
from gpujobd.shared.model import Job
from gpujobd.shared.states import JobState

log = get_logger()
CALLER_CACHE_SIZE = 4096
JOB_REPLY_CACHE_SIZE = 1024  # jobs whose last a{sv} is kept for the next Get or List of them
_WIRE_ERRORS: Dict[str, type] = {}

F = TypeVar("F", bound=Callable[..., Any])
Wire = Mapping[str, Tuple[str, Any]]  # {field: (D-Bus signature, plain value)}


def _wire_error(err: GpujobdError) -> Exception:
    """pydbus names the D-Bus error after the exception class; give it a class with our name."""
    name = type(err).dbus_name()
    if name not in _WIRE_ERRORS:
        _WIRE_ERRORS[name] = type(name, (Exception,), {})
    return _WIRE_ERRORS[name](str(err))


def on_the_wire(method: F) -> F:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except GpujobdError as err:
            log.info("api.error", method=method.__name__, error=type(err).dbus_name(), message=str(err))
            raise _wire_error(err) from None
        except Exception:
            log.exception("api.internal_error", method=method.__name__)
            raise _wire_error(Internal(
                "gpujobd failed internally; the administrator finds the details with "
                "`journalctl -u gpujobd`")) from None
    return wrapper  # type: ignore[return-value]


class GpuReports(Protocol):
    """What the service asks of the GPU watcher (gpujobd.daemon.gpu.watcher.Watcher)."""

    def report(self) -> Dict[str, Any]: ...

    def job_gpu_memory(self, job_id: int) -> Optional[Dict[str, int]]: ...


NO_WATCHER_REPORT = {"state": "disabled", "available": False, "reason": "this daemon has no GPU watcher",
                     "devices": [], "strays": []}


def replies_with_variant(method: F) -> F:
    """Mark a method that builds its whole D-Bus reply itself (see _Dispatcher)."""
    method.replies_with_variant = True  # type: ignore[attr-defined]
    return method


class _Dispatcher(ObjectWrapper):  # type: ignore[misc]  # pydbus has no type information
    """pydbus's dispatch, except that a method may return its whole reply as a ready GLib.Variant.

    pydbus builds every reply from Python values, and for an `ay` that is one Variant per byte:
    2 s per MiB, measured, which made `gpujobctl logs -f` crawl at 0.15 MB/s."""

    __slots__ = ()

    def call_method(self, connection: Gio.DBusConnection, sender: str, object_path: str,
                    interface_name: str, method_name: str, parameters: GLib.Variant,
                    invocation: Gio.DBusMethodInvocation) -> None:
        if interface_name != api.INTERFACE:  # the Version property: anyone, no caller to establish
            return self._dispatch(connection, sender, object_path, interface_name, method_name,
                                  parameters, invocation)
        # Who is calling is asked of the bus without blocking the loop (once per connection); the
        # call runs when the answer comes, its method then finds the caller known.
        self.object.resolve_caller(
            sender, lambda: self._dispatch(connection, sender, object_path, interface_name, method_name,
                                           parameters, invocation),
            lambda denied: _reply_error(invocation, method_name, denied))
        return None

    def _dispatch(self, connection: Gio.DBusConnection, sender: str, object_path: str,
                  interface_name: str, method_name: str, parameters: GLib.Variant,
                  invocation: Gio.DBusMethodInvocation) -> None:
        method = getattr(self.object, method_name, None)
        if method is None or not getattr(method, "replies_with_variant", False):
            return super().call_method(connection, sender, object_path, interface_name, method_name,
                                       parameters, invocation)
        try:
            reply = method(*parameters.unpack(), dbus_context=MethodCallContext(invocation))
        except Exception as err:  # on_the_wire has given it its stable D-Bus name
            invocation.return_dbus_error(type(err).__name__, str(err))
            return None
        invocation.return_value(reply)
        return None


def _reply_error(invocation: Gio.DBusMethodInvocation, method_name: str, err: GpujobdError) -> None:
    log.info("api.error", method=method_name, error=type(err).dbus_name(), message=str(err))
    wire = _wire_error(err)
    invocation.return_dbus_error(type(wire).__name__, str(wire))


def publish(bus: Any, service: ManagerService) -> Callable[[], None]:
    """Export the service at api.OBJECT_PATH and own api.BUS_NAME; returns the undo."""
    interfaces = Gio.DBusNodeInfo.new_for_xml(api.INTROSPECTION_XML).interfaces
    registration = ObjectRegistration(bus, api.OBJECT_PATH, interfaces,
                                      _Dispatcher(service, interfaces), own_wrapper=True)
    try:
        name = bus.request_name(api.BUS_NAME, allow_replacement=False)
    except Exception:
        registration.unregister()
        raise

    def unpublish() -> None:
        name.unown()
        registration.unregister()
    return unpublish


class ManagerService:
    dbus = api.INTROSPECTION_XML
    JobChanged = signal()
    StrayFound = signal()
    StrayCleared = signal()

    def __init__(self, manager: Manager, connection: Gio.DBusConnection,
                 gpus: Optional[GpuReports] = None,
                 caller_lookup_timeout_s: float = DaemonConfig.caller_lookup_timeout_s):
        self._manager = manager
        self._caller_lookup_timeout_ms = int(caller_lookup_timeout_s * 1000)
        self._con = connection
        self._gpus = gpus
        self._callers: collections.OrderedDict[str, Caller] = collections.OrderedDict()
        self._lookups: Dict[str, List[Tuple[Callable[[], None], Callable[[GpujobdError], None]]]] = {}
        self._replies = JobReplies(JOB_REPLY_CACHE_SIZE)

    @property
    def Version(self) -> str:
        return __version__

    @replies_with_variant
    @on_the_wire
    def Submit(self, wire: Mapping[str, Any], dbus_context: Any = None) -> GLib.Variant:
        caller = self._caller(dbus_context)
        job = self._manager.submit(caller, jobspec.decode(wire))
        # Without its place in the queue: that is planned after this reply, and asking for it now
        # would plan every queued job's place for every submit.
        return GLib.Variant.new_tuple(_vardict(self._encode(job, caller, with_wait=False)))

    # SubmitAll and Resubmit reply with the new ids only: an array may have thousands of tasks, and
    # no reply may outgrow the bus's message limit (the client reads the jobs with Get).
    @on_the_wire
    def SubmitAll(self, wire: Mapping[str, Any], dbus_context: Any = None) -> List[int]:
        return [job.id for job in self._manager.submit_all(self._caller(dbus_context), jobspec.decode(wire))]

    @on_the_wire
    def Resubmit(self, job_id: int, with_dependents: bool, dbus_context: Any = None) -> List[int]:
        return [job.id for job in self._manager.resubmit(self._caller(dbus_context), job_id, with_dependents)]

    @on_the_wire
    def Drain(self, dbus_context: Any = None) -> None:
        self._manager.set_draining(self._caller(dbus_context), True)

    @on_the_wire
    def Undrain(self, dbus_context: Any = None) -> None:
        self._manager.set_draining(self._caller(dbus_context), False)

    @on_the_wire
    def Validate(self, wire: Mapping[str, Any], dbus_context: Any = None) -> None:
        self._manager.validate(self._caller(dbus_context), jobspec.decode(wire))

    @on_the_wire
    def Stop(self, job_id: int, dbus_context: Any = None) -> str:
        return self._manager.stop(self._caller(dbus_context), job_id)

    @on_the_wire
    def Prune(self, older_than_days: int, dbus_context: Any = None) -> int:
        return self._manager.prune(self._caller(dbus_context), older_than_days)

    @replies_with_variant
    @on_the_wire
    def Get(self, job_id: int, dbus_context: Any = None) -> GLib.Variant:
        caller = self._caller(dbus_context)  # the reply built here, as List's: the most frequent call
        job = self._manager.get(job_id)
        context = self._reply_context(job, caller)
        return GLib.Variant.new_tuple(
            self._replies.of_job(job, context, lambda: self._encode_wire(job, context)))

    @replies_with_variant
    @on_the_wire
    def List(self, filters: Mapping[str, Any], dbus_context: Any = None) -> GLib.Variant:
        caller = self._caller(dbus_context)
        include_ended, user, state, limit, after_id = decode_filter(filters)
        jobs = self._manager.list(include_ended=include_ended, user=user, state=state, limit=limit,
                                  after_id=after_id)
        encoded = [self._list_entry(job, caller) for job in jobs]
        # The newest-N view keeps its newest jobs; a page forward keeps its first ones (the client
        # goes on after the last id it got).
        kept = fit_in_reply(encoded, newest=include_ended and after_id is None)
        return GLib.Variant.new_tuple(GLib.Variant.new_array(_VARDICT_ENTRY, kept))

    def _list_entry(self, job: Job, caller: Caller) -> GLib.Variant:
        wire = self._encode_wire(job, self._reply_context(job, caller))
        entry = self._replies.vardict(job.id, wire)
        if entry.get_size() <= api.LIST_ENTRY_MAX_BYTES:
            return entry
        # A row stored before the size bounds (or under larger ones): shown clipped, never whole.
        return _vardict(variants(api.clipped_job_wire(wire)))

    @on_the_wire
    # `list`, not `List`: in this class body, List names the method above.
    def Runs(self, job_id: int, limit: int, dbus_context: Any = None) -> list[Dict[str, GLib.Variant]]:
        self._caller(dbus_context)
        return [{key: GLib.Variant(signature, value) for key, (signature, value) in
                 api.encode_run(run).items()} for run in self._manager.runs(job_id, limit)]

    @replies_with_variant
    @on_the_wire
    def ReadLog(self, job_id: int, offset: int, max_bytes: int, dbus_context: Any = None) -> GLib.Variant:
        caller = self._caller(dbus_context)
        data, next_offset, ended = self._manager.read_log(caller, job_id, offset, max_bytes)
        return GLib.Variant.new_tuple(
            GLib.Variant.new_from_bytes(GLib.VariantType.new("ay"), GLib.Bytes.new(data), True),
            GLib.Variant("t", next_offset), GLib.Variant("b", ended))

    @on_the_wire
    def Gpus(self, dbus_context: Any = None) -> Dict[str, GLib.Variant]:
        self._caller(dbus_context)  # any known user may look, as at `ps`
        report = self._gpus.report() if self._gpus is not None else NO_WATCHER_REPORT
        return variants(api.encode_gpu_report(report))

    def job_changed(self, job: Job) -> None:
        # Emitted on the connection itself, with GLib's constructors: through pydbus's `signal`
        # (declared above for the registration) it cost ~4 times more, and a job sends four.
        self._con.emit_signal(None, api.OBJECT_PATH, api.INTERFACE, "JobChanged", GLib.Variant.new_tuple(
            GLib.Variant.new_uint64(job.id), GLib.Variant.new_string(job.state.value)))

    def stray_found(self, stray: Mapping[str, Any]) -> None:
        self.StrayFound(variants(api.encode_stray(stray)))

    def stray_cleared(self, stray: Mapping[str, Any]) -> None:
        self.StrayCleared(variants(api.encode_stray(stray)))

    # -- helpers ---------------------------------------------------------------------------------
    def resolve_caller(self, sender: Optional[str], then: Callable[[], None],
                       deny: Callable[[GpujobdError], None]) -> None:
        """Run `then` once the caller behind `sender` is known: at once if it is, else when the bus
        has answered GetConnectionUnixUser, asked asynchronously; calls from the same new sender wait
        for that one answer, and run in the order they came. `deny` gets why the caller is refused."""
        if not sender:
            deny(PermissionDenied("gpujobd could not establish who is calling; the call is denied"))
            return
        if sender in self._callers:
            then()
            return
        waiting = self._lookups.get(sender)
        if waiting is not None:
            waiting.append((then, deny))
            return
        self._lookups[sender] = [(then, deny)]
        self._con.call(*_UID_OF_SENDER, GLib.Variant("(s)", (sender,)), GLib.VariantType.new("(u)"),
                       Gio.DBusCallFlags.NONE, self._caller_lookup_timeout_ms, None,
                       lambda con, result: self._looked_up(sender, con, result))

    def _looked_up(self, sender: str, con: Gio.DBusConnection, result: Gio.AsyncResult) -> None:
        waiting = self._lookups.pop(sender, [])
        try:
            try:
                uid = int(con.call_finish(result).unpack()[0])
            except GLib.Error as err:
                raise _uid_unknown(err) from None
            self._remember(sender, self._manager.caller_from_uid(uid))
        except GpujobdError as denied:
            for _then, deny in waiting:
                deny(denied)
            return
        except Exception:  # a passwd lookup that broke: every waiting call gets an answer still
            log.exception("api.internal_error", method="GetConnectionUnixUser")
            for _then, deny in waiting:
                deny(Internal("gpujobd failed internally; the administrator finds the details with "
                              "`journalctl -u gpujobd`"))
            return
        for then, _deny in waiting:
            then()

    def _remember(self, sender: str, caller: Caller) -> None:
        self._callers[sender] = caller
        if len(self._callers) > CALLER_CACHE_SIZE:
            self._callers.popitem(last=False)

    def _caller(self, dbus_context: Any) -> Caller:
        sender = getattr(dbus_context, "sender", None)
        if not sender:
            raise PermissionDenied("gpujobd could not establish who is calling; the call is denied")
        caller = self._callers.get(sender)
        if caller is None:  # a method called directly, not through the bus (resolve_caller)
            caller = self._manager.caller_from_uid(self._sender_uid(sender))
            self._remember(sender, caller)
        return caller

    def _sender_uid(self, sender: str) -> int:
        try:
            reply = self._con.call_sync(*_UID_OF_SENDER, GLib.Variant("(s)", (sender,)),
                                        GLib.VariantType.new("(u)"), Gio.DBusCallFlags.NONE,
                                        self._caller_lookup_timeout_ms, None)
        except GLib.Error as err:
            raise _uid_unknown(err) from None
        return int(reply.unpack()[0])

    def _encode(self, job: Job, caller: Caller, with_wait: bool = True) -> Dict[str, GLib.Variant]:
        return variants(self._encode_wire(job, self._reply_context(job, caller, with_wait)))

    def _reply_context(self, job: Job, caller: Caller, with_wait: bool = True) -> Tuple[Any, ...]:
        """What a job's wire form depends on besides the job: its GPU memory now, its place in the
        queue, and whether the caller may see its environment."""
        gpu_memory = (self._gpus.job_gpu_memory(job.id)
                      if self._gpus is not None and not job.state.is_final else None)
        queued = with_wait and job.state is JobState.QUEUED
        wait = self._manager.queue.wait_of(job.id) if queued else None
        return (gpu_memory, (wait.waiting_for, wait.position) if wait is not None else None,
                caller.uid == job.uid or caller.is_admin)

    def _encode_wire(self, job: Job, context: Tuple[Any, ...]) -> Dict[str, Tuple[str, Any]]:
        gpu_memory, wait, shows_env = context
        wire = api.encode_job(job, log_path=self._manager.log_path(job.id), gpu_memory=gpu_memory,
                              wait=wait)
        if not shows_env:
            wire.pop("env", None)  # may hold secrets: its owner and admins only
        return wire


# The bus daemon's answer to "which uid is behind this sender?": destination, path, interface, method.
_UID_OF_SENDER = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "GetConnectionUnixUser")


def _uid_unknown(err: GLib.Error) -> PermissionDenied:
    return PermissionDenied(f"gpujobd could not establish your user id ({err.message}); the call is denied")


_VARDICT_ENTRY = GLib.VariantType.new("a{sv}")
_SV_ENTRY = GLib.VariantType.new("{sv}")


def _vardict(values: Mapping[str, GLib.Variant]) -> GLib.Variant:
    """An a{sv} built with GLib's constructors: half the cost of pydbus's pure-Python path."""
    return GLib.Variant.new_array(_SV_ENTRY, [
        GLib.Variant.new_dict_entry(GLib.Variant.new_string(key), GLib.Variant.new_variant(value))
        for key, value in values.items()])


class _Kept(NamedTuple):
    key: str  # the wire form's repr
    reply: GLib.Variant
    job: Optional[Job]  # the version it was encoded from, and what else went into it (`of_job`)
    context: Any


class JobReplies:
    """The a{sv} last sent for each of the most recently asked jobs, sent again while the job's wire
    form is the same: a job polled by `gpujobctl wait`, a status loop or a dashboard is encoded once
    per change, not once per call (GLib builds ~190 Variants for a job with a 30-entry environment,
    which was most of a Get's daemon time). The key is the wire form's repr, so nothing has to say
    when a job changed: whatever changes what would be sent changes the key.

    `of_job` skips even the encoding while it is asked for the very Job object (they are immutable,
    and the store hands out one per version of a job) in the same context."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._kept: collections.OrderedDict[int, _Kept] = collections.OrderedDict()

    def of_job(self, job: Job, context: Any, encode: Callable[[], Wire]) -> GLib.Variant:
        """The reply for this version of `job`, where `context` is everything else `encode` reads."""
        kept = self._kept.get(job.id)
        if kept is not None and kept.job is job and kept.context == context:
            self._kept.move_to_end(job.id)
            return kept.reply
        return self.vardict(job.id, encode(), job, context)

    def vardict(self, job_id: int, wire: Wire, job: Optional[Job] = None,
                context: Any = None) -> GLib.Variant:
        key = repr(wire)
        kept = self._kept.get(job_id)
        reply = kept.reply if kept is not None and kept.key == key else _vardict(variants(wire))
        self._kept[job_id] = _Kept(key, reply, job, context)
        self._kept.move_to_end(job_id)
        if len(self._kept) > self._size:
            self._kept.popitem(last=False)
        return reply


def variants(wire: Mapping[str, Tuple[str, Any]]) -> Dict[str, GLib.Variant]:
    """{field: (signature, value)} -> {field: GLib.Variant}; records of an aa{sv} field in turn."""
    return {key: _variant(signature, value) for key, (signature, value) in wire.items()}


def _string_map(signature: str, value: Mapping[str, Any]) -> GLib.Variant:
    make_value = _SCALARS[signature[3]]
    return GLib.Variant.new_array(_ENTRY_TYPES[signature], [
        GLib.Variant.new_dict_entry(GLib.Variant.new_string(key), make_value(item))
        for key, item in value.items()])


def _variant(signature: str, value: Any) -> GLib.Variant:
    """One field's Variant through GLib's own constructors where the signature is one a job's fields
    use: PyGObject's generic GLib.Variant(signature, value) parses the signature in Python for every
    element, which made a job's a{sv} cost ~120 such calls (a Get's reply, most of its daemon time)."""
    scalar = _SCALARS.get(signature)
    if scalar is not None:
        return scalar(value)
    if signature == "as":
        return GLib.Variant.new_strv(list(value))
    if signature in _ARRAY_TYPES:
        make_item = _SCALARS[signature[1]]
        return GLib.Variant.new_array(_ARRAY_TYPES[signature], [make_item(item) for item in value])
    if signature in _ENTRY_TYPES:
        return _string_map(signature, value)
    if signature == "aa{sv}":
        return GLib.Variant.new_array(_VARDICT_ENTRY, [_vardict(variants(item)) for item in value])
    return GLib.Variant(signature, value)


_SCALARS: Dict[str, Callable[[Any], GLib.Variant]] = {
    "s": GLib.Variant.new_string, "b": GLib.Variant.new_boolean, "d": GLib.Variant.new_double,
    "i": GLib.Variant.new_int32, "u": GLib.Variant.new_uint32, "x": GLib.Variant.new_int64,
    "t": GLib.Variant.new_uint64, "y": GLib.Variant.new_byte, "n": GLib.Variant.new_int16,
    "q": GLib.Variant.new_uint16,
}
_ARRAY_TYPES = {f"a{code}": GLib.VariantType.new(code) for code in _SCALARS}
_ENTRY_TYPES = {f"a{{s{code}}}": GLib.VariantType.new(f"{{s{code}}}") for code in _SCALARS}


def fit_in_reply(entries: List[GLib.Variant], *, newest: bool) -> List[GLib.Variant]:
    """As many entries as fit in api.LIST_REPLY_MAX_BYTES (at least one), so that no List reply can
    exceed the bus's message limit whatever is stored."""
    ordered = list(reversed(entries)) if newest else entries
    kept: List[GLib.Variant] = []
    size = 0
    for entry in ordered:
        size += entry.get_size()
        if kept and size > api.LIST_REPLY_MAX_BYTES:
            break
        kept.append(entry)
    return list(reversed(kept)) if newest else kept


def decode_filter(filters: Mapping[str, Any]) -> tuple:
    unknown = api.unknown_keys(filters, api.FILTER_FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown list filters {unknown}; known: {sorted(api.FILTER_FIELDS)}")
    for key, kind, what in (("all", bool, "a boolean (b)"), ("user", str, "a user name (s)"),
                            ("state", str, "a state name (s)"), ("limit", int, "a count (u)"),
                            ("after_id", int, "a job id (t)")):
        if key in filters and (not isinstance(filters[key], kind)
                               or (kind is int and isinstance(filters[key], bool))):
            raise InvalidArgument(f"list filter {key!r}: expected {what}")
    state: Optional[JobState] = None
    if filters.get("state"):
        try:
            state = JobState(filters["state"])
        except ValueError:
            raise InvalidArgument(f"unknown state {filters['state']!r}; known: "
                                  f"{', '.join(s.value for s in JobState)}") from None
    limit = min(int(filters.get("limit") or api.LIST_PAGE_MAX), api.LIST_PAGE_MAX)
    after_id = filters.get("after_id", None)
    return bool(filters.get("all")), filters.get("user") or None, state, limit, after_id
