"""The client's D-Bus transport: the one module of the client that imports a D-Bus library (jeepney).

jeepney is pure Python (no compiled part, no system library), so the client and `gpujobctl` install
with pip into any virtualenv or conda env; docs/client.md says why it and not the daemon's Gio.
Calls are blocking, with the contract's known signatures and a timeout each. What is sent is built
elsewhere as plain values and {key: (signature, value)} dicts, which is how jeepney writes a{sv}
already; replies come back with their variants unwrapped into plain values (`plain`). A D-Bus or
socket failure becomes the `errors.GpujobdError` it means (`error_from_dbus`, `error_from_os`).

One connection carries the calls, behind a lock, so that one Client may serve several threads (an
Optuna study with n_jobs > 1). Each `watch` opens a connection of its own for its signals.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from jeepney import DBusAddress, HeaderFields, MatchRule, Message, MessageType, new_method_call
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import DBusConnection, open_dbus_connection
from jeepney.low_level import Array, DictEntry, Struct, Variant, parse_signature

from gpujobd.client import outgoing
from gpujobd.shared import api, errors
from gpujobd.shared.states import FINAL_STATES

DEFAULT_CALL_TIMEOUT_S = 30.0  # config client.call_timeout_s (mirrored, see client.py)

_DBUS = "org.freedesktop.DBus"
_DBUS_ERROR = _DBUS + ".Error."
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
_HINT = "check `systemctl status gpujobd`"
_FINAL_STATE_NAMES = frozenset(state.value for state in FINAL_STATES)
_SERVICE = DBusAddress(api.OBJECT_PATH, bus_name=api.BUS_NAME, interface=api.INTERFACE)

Wire = Mapping[str, Tuple[str, Any]]  # {key: (D-Bus signature, plain value)}


# --- error mapping -----------------------------------------------------------------------------------


def error_from_dbus(name: str, text: str, what: str,
                    timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> errors.GpujobdError:
    """A D-Bus error reply (its name and message) to the call `what` -> the GpujobdError it means."""
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


def error_from_os(error: BaseException, what: str,
                  timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> errors.GpujobdError:
    """A socket-level failure (no bus socket, refused, closed, timed out) -> the GpujobdError."""
    if isinstance(error, TimeoutError):
        return _timed_out(what, timeout_s)
    return _unavailable(f"{what}: {error}")


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


# --- what is sent and what comes back ------------------------------------------------------------------


def build_spec(argv: Sequence[str], **options: Any) -> Dict[str, Tuple[str, Any]]:
    """The Submit spec as jeepney sends an a{sv}: {key: (signature, value)} (`outgoing.spec_wire`)."""
    return dict(outgoing.spec_wire(argv, **options))


def build_filter(**query: Any) -> Dict[str, Tuple[str, Any]]:
    """The List filter as an a{sv}, with only the keys that are given (`outgoing.filter_wire`)."""
    return dict(outgoing.filter_wire(**query))


def plain(value: Any, signature: str) -> Any:
    """A value jeepney parsed as `signature`, with every variant unwrapped: a{sv} -> {key: value}."""
    return _plain(value, _parsed(signature))


@functools.lru_cache(maxsize=256)
def _parsed(signature: str) -> Any:
    """jeepney's parse of a signature, once per signature: a job's a{sv} holds ~40 variants."""
    return parse_signature(list(signature))


_SCALARS = frozenset("ybnqiuxtdsog")  # one-letter signatures, whose parsed value is already plain


def _plain(value: Any, kind: Any) -> Any:
    if isinstance(kind, Variant):
        inner_signature, inner = value
        return inner if inner_signature in _SCALARS else plain(inner, inner_signature)
    if isinstance(kind, Array):
        element = kind.elt_type
        if isinstance(element, DictEntry):
            return {key: _plain(item, element.fields[1]) for key, item in value.items()}
        return value if isinstance(value, bytes) else [_plain(item, element) for item in value]
    if isinstance(kind, Struct):
        return tuple(_plain(item, field) for item, field in zip(value, kind.fields))
    return value


# --- the connection ----------------------------------------------------------------------------------


class Transport:
    """A jeepney connection to the bus, opened on first use, and the calls gpujobd's contract has.

    `bus`: None for the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured) or a bus address string such
    as "unix:path=/run/x/bus".
    """

    def __init__(self, bus: Optional[str] = None, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        if bus is not None and not isinstance(bus, str):
            raise errors.InvalidArgument(f"bus: give None (the system bus) or a D-Bus address such as "
                                         f"'unix:path=/run/dbus/system_bus_socket', not {type(bus).__name__}")
        self._bus = bus
        self._connection: Optional[DBusConnection] = None
        self._lock = threading.Lock()
        self.call_timeout_s = float(call_timeout_s)

    def call(self, method: str, signature: Optional[str], args: Tuple[Any, ...], reply_type: str) -> Any:
        """Call a method of the contract; its reply as plain values (a tuple).

        An `a{sv}` argument is given as {key: (signature, value)}."""
        reply = self._call(method, signature, args)
        return plain(tuple(reply.body), reply_type)

    def read_log(self, job_id: int, offset: int, max_bytes: int) -> Tuple[bytes, int, bool]:
        """ReadLog: (data, next_offset, job_ended); jeepney reads an `ay` as one bytes value."""
        data, next_offset, ended = self._call("ReadLog", "ttu", (job_id, offset, max_bytes)).body
        return bytes(data), int(next_offset), bool(ended)

    @contextlib.contextmanager
    def watch(self, job_id: Optional[int]) -> Iterator[Callable[[float], None]]:
        """Subscribe to what may end a wait for the job (None: for gpujobd's return after a restart
        only); yields `sleep(seconds)`, which returns at a wakeup or after `seconds`. The subscriptions
        live on a connection of their own, whose AddMatch calls are answered before this yields: a
        signal sent after that is never missed."""
        connection = self._open("subscribing to JobChanged" if job_id is not None
                                else "subscribing to gpujobd's bus name")
        try:
            with _Wakeups(connection, job_id, self.call_timeout_s) as wakeups:
                yield wakeups.sleep
        finally:
            connection.close()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _open(self, what: str) -> DBusConnection:
        try:
            # It says Hello to the bus itself (jeepney's DBusConnection does, on creation). With unix
            # fds negotiated, jeepney reads the rest of a message in one recvmsg; without, 4 KiB a
            # read: a 1 MiB ReadLog reply took 256 reads, each followed by a parse attempt.
            return open_dbus_connection(bus=self._bus or "SYSTEM", auth_timeout=self.call_timeout_s,
                                        enable_fds=True)
        except (OSError, TimeoutError, ValueError, KeyError) as error:
            raise error_from_os(error, f"connecting to the bus ({what})", self.call_timeout_s) from None

    def _call(self, method: str, signature: Optional[str], args: Tuple[Any, ...]) -> Message:
        message = new_method_call(_SERVICE, method, signature.strip("()") if signature else None,
                                  args if signature else ())
        with self._lock:
            if self._connection is None:
                self._connection = self._open(method)
            try:
                reply = self._connection.send_and_get_reply(message, timeout=self.call_timeout_s)
            except (OSError, TimeoutError) as error:
                self._drop_connection()
                raise error_from_os(error, method, self.call_timeout_s) from None
        return _checked_reply(reply, method, self.call_timeout_s)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.close()
            self._connection = None


def _checked_reply(reply: Message, what: str, timeout_s: float) -> Message:
    if reply.header.message_type != MessageType.error:
        return reply
    name = str(reply.header.fields.get(HeaderFields.error_name, ""))
    text = str(reply.body[0]) if reply.body and isinstance(reply.body[0], str) else ""
    raise error_from_dbus(name, text, what, timeout_s)


class _Wakeups:
    """Signal subscriptions that wake `Client.wait`: the job's JobChanged to a final state, and the
    daemon's bus name changing owner (a restart: the job may have been settled meanwhile). Without a
    job, only the latter (a call riding out a restart)."""

    def __init__(self, connection: DBusConnection, job_id: Optional[int], timeout_s: float) -> None:
        self._connection = connection
        self._job_id = job_id
        self._timeout_s = timeout_s
        self._queue: deque[Message] = deque()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Wakeups:
        job_changed = MatchRule(type="signal", interface=api.INTERFACE, member="JobChanged",
                                path=api.OBJECT_PATH)
        owner = MatchRule(type="signal", sender=_DBUS, interface=_DBUS, member="NameOwnerChanged",
                          path="/org/freedesktop/DBus")
        owner.add_arg_condition(0, api.BUS_NAME)
        bus_side = MatchRule(type="signal", sender=api.BUS_NAME, interface=api.INTERFACE,
                             member="JobChanged", path=api.OBJECT_PATH)
        ours, on_the_bus = ([owner], [owner]) if self._job_id is None else \
            ([job_changed, owner], [bus_side, owner])
        for rule in ours:
            # The bus filters by rule; the connection sorts what arrives into this one queue.
            self._stack.enter_context(self._connection.filter(rule, queue=self._queue))
        for rule in on_the_bus:
            try:
                reply = self._connection.send_and_get_reply(message_bus.AddMatch(rule),
                                                            timeout=self._timeout_s)
            except (OSError, TimeoutError) as error:
                self._stack.close()
                raise error_from_os(error, "AddMatch", self._timeout_s) from None
            _checked_reply(reply, "AddMatch", self._timeout_s)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def sleep(self, seconds: float) -> None:
        """Return at the first wakeup, or after `seconds`."""
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            while self._queue:
                if self._wakes(self._queue.popleft()):
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                self._connection.recv_messages(timeout=remaining)
            except TimeoutError:
                return
            except OSError as error:
                raise error_from_os(error, "waiting for JobChanged", self._timeout_s) from None

    def _wakes(self, message: Message) -> bool:
        return wakes(str(message.header.fields.get(HeaderFields.member, "")), tuple(message.body),
                     self._job_id)


def wakes(member: str, body: Tuple[Any, ...], job_id: Optional[int]) -> bool:
    """Whether a signal ends a sleep of `Client.wait` for the job: its JobChanged to a final state,
    or the daemon's name getting a new owner (a restart: the job may have been settled meanwhile)."""
    if member == "JobChanged":
        return bool(body[0] == job_id and body[1] in _FINAL_STATE_NAMES)
    if member == "NameOwnerChanged":
        return bool(body[2])
    return False
