"""The Python client of gpujobd: what users' scripts and `gpujobctl` call.

    from gpujobd.client import Client
    client = Client()
    job = client.submit(["python", "train.py"], name="train", timeout_s=3600)
    for chunk in client.logs(job["id"], follow=True):
        sys.stdout.buffer.write(chunk)
    print(client.wait(job["id"])["state"])

    # A parallel experiment: train in the foreground, evaluate in a loop until training ends.
    train, evaluate = client.submit_with_background(
        ["python", "train.py"], ["python", "eval.py"], name="exp1", timeout_s=3600, max_runs=100)
    print(client.runs(evaluate["id"], limit=5))

Jobs come back as plain dicts shaped like `api.job_to_json` (every `api.JSON_FIELDS` key present, None
where unset, times as ISO 8601 UTC strings); pass `raw=True` for the wire dict instead (only the fields
that are set, times as float seconds since the epoch). Every failure is a `errors.GpujobdError`.

This module and the daemon's server module are the only ones that import a D-Bus library. Calls go
straight through Gio's `call_sync` with the contract's known signatures: no introspection round trip
per connection, and every call has a timeout.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

from gi.repository import Gio, GLib

from gpujobd.shared import api, errors
from gpujobd.shared.model import JobState

DEFAULT_CALL_TIMEOUT_S = 30.0
DEFAULT_FOLLOW_POLL_INTERVAL_S = 0.25
DEFAULT_READ_BYTES = 1 << 20
MAX_UINT32 = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1
# While waiting, the job is re-read this often even without a signal: a safety net for a signal that
# never arrives (a daemon restart, a bus that dropped it). One Get a minute costs nothing.
WAIT_RESYNC_INTERVAL_S = 60.0

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


class WaitTimedOut(errors.GpujobdError):
    """`Client.wait` gave up: the job is still running (exit code 1, like any failed operation)."""


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


# --- building what is sent ---------------------------------------------------------------------------


def spec_values(
    argv: Sequence[str],
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    name: str = "",
    properties: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    background: bool = False,
    max_runs: int | None = None,
    restart_delay_s: float | None = None,
    stop_on_failure: bool = False,
    bind_to: int | None = None,
    gpu_check: str | None = None,
    caller_environ: Mapping[str, str] | None = None,
) -> Dict[str, Any]:
    """Check a submission (a convenience: the daemon re-validates) and return the spec's plain values.

    `env` sent is exactly the explicit env plus LANG from the caller's environment when set and not
    given. A relative `cwd` is taken relative to the caller's working directory. Only the options that
    are set are sent: an absent `max_runs` or `restart_delay_s` means the server's default, and
    `background`, `stop_on_failure` are sent only when true. `max_runs` (other than 1),
    `restart_delay_s` and `stop_on_failure` need `background=True`, as the daemon requires.
    """
    values: Dict[str, Any] = {
        "argv": _checked_argv(argv),
        "cwd": _checked_cwd(cwd),
        "env": _checked_env(env, caller_environ if caller_environ is not None else os.environ),
    }
    if name:
        values["name"] = _checked_name(name)
    if properties:
        values["properties"] = _checked_pairs("properties", properties)
    if timeout_s is not None:
        values["timeout_s"] = _checked_timeout(timeout_s)
    values.update(_loop_values(background, max_runs, restart_delay_s, stop_on_failure))
    if bind_to is not None:
        values["bind_to"] = _checked_id(bind_to, "bind_to (a job id)")
    if gpu_check is not None:
        if gpu_check not in api.GPU_CHECKS:
            raise errors.InvalidArgument(f"gpu_check must be one of {', '.join(api.GPU_CHECKS)}, "
                                         f"not {gpu_check!r}")
        values["gpu_check"] = gpu_check
    return values


def _loop_values(background: bool, max_runs: int | None, restart_delay_s: float | None,
                 stop_on_failure: bool) -> Dict[str, Any]:
    values: Dict[str, Any] = {}
    if _checked_flag("background", background):
        values["background"] = True
    if max_runs is not None:
        values["max_runs"] = _checked_max_runs(max_runs)
    if restart_delay_s is not None:
        values["restart_delay_s"] = _checked_restart_delay(restart_delay_s)
    if _checked_flag("stop_on_failure", stop_on_failure):
        values["stop_on_failure"] = True
    if not background:
        given = [key for key in ("max_runs", "restart_delay_s", "stop_on_failure") if key in values]
        if values.get("max_runs") == 1:
            given.remove("max_runs")  # one run is what a job without a loop does anyway
        if given:
            raise errors.InvalidArgument(f"{', '.join(given)} only apply to background loops: "
                                         "submit with background=True")
    return values


def build_spec(argv: Sequence[str], **options: Any) -> Dict[str, GLib.Variant]:
    """The Submit spec as an a{sv} dict of GLib.Variant values (see `spec_values` for the options)."""
    return to_variants(spec_values(argv, **options), api.SPEC_FIELDS)


def build_filter(
    *, all: bool = False, user: str | None = None, state: str | None = None,
    limit: int | None = None, after_id: int | None = None,
) -> Dict[str, GLib.Variant]:
    """The List filter as an a{sv} dict, with only the keys that are given."""
    values: Dict[str, Any] = {}
    if after_id is not None:
        values["after_id"] = _checked_id(after_id) if after_id else 0
    if all:
        values["all"] = True
    if user:
        values["user"] = _checked_string("user", user)
    if state:
        values["state"] = _checked_state(state)
    if limit is not None:
        values["limit"] = _checked_limit(limit)
    return to_variants(values, api.FILTER_FIELDS)


def to_variants(values: Mapping[str, Any], signatures: Mapping[str, str]) -> Dict[str, GLib.Variant]:
    """Plain values -> GLib.Variant values, typed by the contract's `signatures` (api.SPEC_FIELDS, ...)."""
    return {key: GLib.Variant(signatures[key], value) for key, value in values.items()}


def _checked_string(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{what} must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise errors.InvalidArgument(f"{what} contains a NUL character, which D-Bus cannot carry")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument(
            f"{what} {value!r} is not valid UTF-8: D-Bus carries only UTF-8 strings"
        ) from None
    return value


def _checked_argv(argv: Sequence[str]) -> List[str]:
    if isinstance(argv, (str, bytes)):
        raise errors.InvalidArgument("argv must be a list of strings, not a single string")
    items = [_checked_string("an argument", arg) for arg in argv]
    if not items or not items[0]:
        raise errors.InvalidArgument("the command is empty: give the program to run and its arguments")
    if len(items) > api.MAX_ARGV_ITEMS:
        raise errors.InvalidArgument(f"the command has {len(items)} arguments; at most "
                                     f"{api.MAX_ARGV_ITEMS} are allowed")
    return items


def _checked_cwd(cwd: str | None) -> str:
    if cwd is None:
        try:
            return os.getcwd()
        except OSError as error:
            raise errors.InvalidArgument(
                f"the current directory cannot be read ({error.strerror}): cd somewhere else or give "
                "a working directory"
            ) from None
    return os.path.abspath(_checked_string("the working directory", cwd))


def _checked_env(env: Mapping[str, str] | None, caller_environ: Mapping[str, str]) -> Dict[str, str]:
    pairs = _checked_pairs("env", env or {})
    for key in pairs:
        if not key or "=" in key:
            raise errors.InvalidArgument(f"environment variable name {key!r} is empty or contains '='")
    if len(pairs) > api.MAX_ENV_ITEMS:
        raise errors.InvalidArgument(f"{len(pairs)} environment variables; at most "
                                     f"{api.MAX_ENV_ITEMS} are allowed")
    if "LANG" not in pairs and caller_environ.get("LANG"):
        pairs["LANG"] = _checked_string("LANG", caller_environ["LANG"])
    return pairs


def _checked_pairs(what: str, pairs: Mapping[str, str]) -> Dict[str, str]:
    if not isinstance(pairs, Mapping):
        raise errors.InvalidArgument(f"{what} must be a mapping of strings to strings")
    return {_checked_string(f"a key of {what}", key): _checked_string(f"{what}[{key!r}]", value)
            for key, value in pairs.items()}


def _checked_name(name: str) -> str:
    _checked_string("the name", name)
    if len(name) > api.MAX_NAME_LENGTH:
        raise errors.InvalidArgument(f"the name is {len(name)} characters long; at most "
                                     f"{api.MAX_NAME_LENGTH} are allowed")
    return name


def _checked_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise errors.InvalidArgument(f"the timeout must be a number of seconds, not {timeout_s!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise errors.InvalidArgument(f"the timeout must be a positive number of seconds, not {timeout_s}")
    return float(timeout_s)


def _checked_state(state: str) -> str:
    try:
        return JobState(state).value
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise errors.InvalidArgument(f"unknown state {state!r}: use one of {known}") from None


def _checked_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= api.MAX_LIST_LIMIT:
        raise errors.InvalidArgument(f"the limit must be a whole number from 1 to {api.MAX_LIST_LIMIT}")
    return limit


def _checked_id(job_id: int, what: str = "a job id") -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 <= job_id <= MAX_UINT64:
        raise errors.InvalidArgument(f"{what} is a whole number >= 0, not {job_id!r}")
    return job_id


def _checked_flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise errors.InvalidArgument(f"{what} must be True or False, not {value!r}")
    return value


def _checked_max_runs(max_runs: int) -> int:
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or not 0 < max_runs <= MAX_UINT32:
        raise errors.InvalidArgument(f"max_runs must be a whole number from 1 to {MAX_UINT32} (the "
                                     f"server may allow fewer), not {max_runs!r}")
    return max_runs


def _checked_restart_delay(seconds: float) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise errors.InvalidArgument(f"the restart delay must be a number of seconds, not {seconds!r}")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise errors.InvalidArgument(f"the restart delay must be 0 or more seconds, not {seconds}")
    return float(seconds)


def _checked_run_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_UINT32:
        raise errors.InvalidArgument(f"the runs limit must be a whole number from 0 (all) to "
                                     f"{MAX_UINT32}, not {limit!r}")
    return limit


def _job(wire: Mapping[str, Any], raw: bool) -> Dict[str, Any]:
    return dict(wire) if raw else api.job_to_json(wire)


def _run(wire: Mapping[str, Any], raw: bool) -> Dict[str, Any]:
    return dict(wire) if raw else api.run_to_json(wire)


def is_final(wire: Mapping[str, Any]) -> bool:
    """Whether a job (a wire or JSON dict) is in a final state."""
    return JobState(wire["state"]).is_final


# --- the client --------------------------------------------------------------------------------------


class Client:
    """A connection to gpujobd on the system bus, opened on first use.

    `bus`: None for the system bus (Gio honours DBUS_SYSTEM_BUS_ADDRESS), a Gio.DBusConnection, a
    pydbus bus (its connection is used) or a bus address string such as "unix:path=/run/x/bus".
    """

    def __init__(
        self,
        bus: Any = None,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        follow_poll_interval_s: float = DEFAULT_FOLLOW_POLL_INTERVAL_S,
    ) -> None:
        self._bus = bus
        self._connection: Gio.DBusConnection | None = None
        self.call_timeout_s = float(call_timeout_s)
        self.follow_poll_interval_s = float(follow_poll_interval_s)

    # -- methods of the contract --

    def submit(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "",
        properties: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        background: bool = False,
        max_runs: int | None = None,
        restart_delay_s: float | None = None,
        stop_on_failure: bool = False,
        bind_to: int | None = None,
        gpu_check: str | None = None,
        raw: bool = False,
    ) -> Dict[str, Any]:
        """Submit a job; return it as the daemon recorded it.

        `argv`: the command and its arguments (a list, not a shell string). `cwd`: its working
        directory (default: the current one). `env`: the job's only environment variables besides
        the daemon's safe base (PATH, HOME, USER, ...) and your LANG. `name`: a label. `properties`:
        resource properties of the job's scope the daemon allows (e.g. {"MemoryMax": "8G"}).
        `timeout_s`: stop the job after this many seconds (it then ends `timed-out`).

        Background loops: `background=True` runs the command again after each run ends, up to
        `max_runs` times (default: the server's jobs.default_max_runs), `restart_delay_s` apart
        (default: the server's jobs.restart_delay_s), stopping after the first failed run with
        `stop_on_failure=True`. Each run sees GPUJOB_RUN (1, 2, ...) and GPUJOB_ID. `bind_to`: the id
        of a starting or running job of yours; when it ends, systemd stops this job, which then ends
        `stopped` with reason `bound-job-ended`. `gpu_check` ("off", "refuse", "wait"; default: the
        server's gpu.prestart_check): what to do when a stray process holds one of the job's GPUs.

        Only the options that are set are sent. Raises InvalidArgument for a bad option (checked
        here first, then by the daemon), PermissionDenied, Unavailable, ...
        """
        spec = build_spec(argv, cwd=cwd, env=env, name=name, properties=properties, timeout_s=timeout_s,
                          background=background, max_runs=max_runs, restart_delay_s=restart_delay_s,
                          stop_on_failure=stop_on_failure, bind_to=bind_to, gpu_check=gpu_check)
        (wire,) = self._call("Submit", GLib.Variant("(a{sv})", (spec,)), "(a{sv})").unpack()
        return _job(wire, raw)

    def stop(self, job_id: int) -> str:
        """Ask the daemon to stop a job: api.STOP_STOPPING, or api.STOP_ALREADY_ENDED.

        Stopping is asynchronous (SIGTERM to the job's whole cgroup, SIGKILL after the server's stop
        timeout): `wait` for the job to see it end `stopped`.
        """
        (result,) = self._call("Stop", GLib.Variant("(t)", (_checked_id(job_id),)), "(s)").unpack()
        return result

    def get(self, job_id: int, *, raw: bool = False) -> Dict[str, Any]:
        """One job as the daemon knows it now; NotFound if there is no such job."""
        (wire,) = self._call("Get", GLib.Variant("(t)", (_checked_id(job_id),)), "(a{sv})").unpack()
        return _job(wire, raw)

    def list(
        self,
        *,
        all: bool = False,
        user: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        raw: bool = False,
    ) -> List[Dict[str, Any]]:
        """Jobs the daemon shows: active ones and those ended lately, or every one with all=True.

        `user` and `state` (a JobState value such as "running") filter; `limit` keeps the newest N.
        """
        if limit is not None and limit <= api.LIST_PAGE_MAX:
            query = build_filter(all=all, user=user, state=state, limit=limit)
            (wires,) = self._call("List", GLib.Variant("(a{sv})", (query,)), "(aa{sv})").unpack()
            return [_job(wire, raw) for wire in wires]
        jobs = [job for page in self.pages(all=all, user=user, state=state, raw=raw) for job in page]
        return jobs[-limit:] if limit else jobs

    def pages(self, *, all: bool = False, user: str | None = None, state: str | None = None,
              raw: bool = False) -> Iterator[List[Dict[str, Any]]]:
        """The same jobs as list(), in pages of at most api.LIST_PAGE_MAX, oldest first: a reader
        that stops early (`gpujobctl list --all | head`) costs the daemon one page, not the history."""
        after_id = 0
        while True:
            query = build_filter(all=all, user=user, state=state, limit=api.LIST_PAGE_MAX,
                                 after_id=after_id)
            (wires,) = self._call("List", GLib.Variant("(a{sv})", (query,)), "(aa{sv})").unpack()
            if wires:
                yield [_job(wire, raw) for wire in wires]
            if len(wires) < api.LIST_PAGE_MAX:
                return
            after_id = int(wires[-1]["id"])

    def runs(self, job_id: int, limit: int = 0, *, raw: bool = False) -> List[Dict[str, Any]]:
        """The ended runs of a job, oldest first: the last `limit` of them, or all with limit=0.

        A background loop has one record per ended run; any other job has one once it ended. Each is
        shaped like `api.run_to_json`: run (1-based), started_at, ended_at (ISO 8601 UTC), exit_code,
        signal, reason, detail; with raw=True the wire dict (times as float seconds, unset fields
        left out).
        """
        args = GLib.Variant("(tu)", (_checked_id(job_id), _checked_run_limit(limit)))
        (wires,) = self._call("Runs", args, "(aa{sv})").unpack()
        return [_run(wire, raw) for wire in wires]

    def gpus(self, *, raw: bool = False) -> Dict[str, Any]:
        """The GPU report: availability (and NVML's reason when unavailable), every GPU with its
        processes and their owners (job, unit, stray, unknown), and the stray processes; shaped like
        `api.gpu_report_to_json`, or the wire dict with raw=True. See docs/gpu.md."""
        (wire,) = self._call("Gpus", None, "(a{sv})").unpack()
        return dict(wire) if raw else api.gpu_report_to_json(wire)

    def read_log(
        self, job_id: int, offset: int = 0, max_bytes: int = DEFAULT_READ_BYTES
    ) -> Tuple[bytes, int, bool]:
        """Up to max_bytes of a job's log from offset: (data, next_offset, job_ended)."""
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_UINT64:
            raise errors.InvalidArgument(f"a log offset is a whole number >= 0, not {offset!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 < max_bytes <= MAX_UINT32:
            raise errors.InvalidArgument(f"max_bytes must be a whole number from 1 to {MAX_UINT32}")
        args = GLib.Variant("(ttu)", (_checked_id(job_id), offset, max_bytes))
        reply = self._call("ReadLog", args, "(aytb)")
        data = reply.get_child_value(0).get_data_as_bytes().get_data() or b""
        return bytes(data), reply.get_child_value(1).get_uint64(), reply.get_child_value(2).get_boolean()

    # -- built on them --

    def logs(self, job_id: int, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """Yield a job's log in chunks, each byte once; with follow, until the job ended and all is read.

        Only what was not read yet is asked for (reads go forward from an offset), so following a
        long log costs only what is appended. Between reads that find nothing new, it sleeps
        follow_poll_interval_s.
        """
        ended_before = False
        while True:
            data, offset, ended = self.read_log(job_id, offset)
            if data:
                yield data
            elif not follow or ended_before:
                return
            elif not ended:
                time.sleep(self.follow_poll_interval_s)
            # An empty read with job_ended set is confirmed by one more read: bytes written just
            # before the end are then read even if the daemon looked at the state after the file.
            ended_before = ended

    def wait(self, job_id: int, timeout_s: float | None = None, *, raw: bool = False) -> Dict[str, Any]:
        """Block until the job is in a final state and return it; WaitTimedOut after timeout_s.

        Event driven: subscribes to JobChanged (and to the daemon's name changing owner) before the
        first Get, so an end between the two is not missed; then runs a private GLib main context.
        """
        _checked_id(job_id)
        if timeout_s is not None and not timeout_s >= 0:
            raise errors.InvalidArgument(f"the wait timeout must be >= 0 seconds, not {timeout_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        connection = self._conn()
        context = GLib.MainContext.new()
        context.push_thread_default()
        try:
            with _Wakeups(connection, job_id) as wakeups:
                job = self.get(job_id, raw=True)
                while not is_final(job):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise WaitTimedOut(
                            f"timed out after {timeout_s:g}s waiting for job {job_id}: it is still "
                            f"{job['state']}"
                        )
                    wakeups.wait(context, _shorter(remaining, WAIT_RESYNC_INTERVAL_S))
                    job = self.get(job_id, raw=True)
        finally:
            context.pop_thread_default()
        return _job(job, raw)

    def submit_with_background(
        self,
        foreground_argv: Sequence[str],
        background_argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "",
        timeout_s: float | None = None,
        properties: Mapping[str, str] | None = None,
        max_runs: int | None = None,
        restart_delay_s: float | None = None,
        stop_on_failure: bool = False,
        raw: bool = False,
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """The parallel experiment: a foreground job plus a background loop that lives only as long.

        Submits `foreground_argv`, then `background_argv` as a background loop bound to it
        (background=True, bind_to=the foreground's id, named `name + "-bg"` when a name is given):
        when the foreground job ends, systemd stops the loop. Returns (foreground, background), as
        JSON-shaped dicts (the wire dicts with raw=True).

        `cwd`, `env` and `properties` apply to both jobs; `timeout_s` to the foreground only (the
        loop ends with it); `max_runs`, `restart_delay_s` and `stop_on_failure` to the loop only.
        Both commands and all options are checked here before anything is submitted. If the second
        submission fails anyway (the daemon refuses it, or Ctrl-C), the foreground job is stopped
        and the error re-raised, so a call never leaves half a pair running.
        """
        loop: Dict[str, Any] = dict(
            cwd=cwd, env=env, name=f"{name}-bg" if name else "", properties=properties, background=True,
            max_runs=max_runs, restart_delay_s=restart_delay_s, stop_on_failure=stop_on_failure,
        )
        spec_values(background_argv, **loop)  # a bad loop is refused before the foreground starts
        foreground = self.submit(foreground_argv, cwd=cwd, env=env, name=name, properties=properties,
                                 timeout_s=timeout_s, raw=True)
        try:
            background = self.submit(background_argv, **loop, bind_to=foreground["id"], raw=True)
        except BaseException as error:
            self._stop_after_failed_pair(foreground["id"], error)
            raise
        return _job(foreground, raw), _job(background, raw)

    def _stop_after_failed_pair(self, foreground_id: int, error: BaseException) -> None:
        try:
            self.stop(foreground_id)
        except errors.GpujobdError as stop_error:
            if isinstance(error, errors.GpujobdError):
                # Say both, keeping the first error's class (and so its exit code).
                error.args = (f"{error}; stopping the foreground job {foreground_id} failed too "
                              f"({stop_error}): stop it with `gpujobctl stop {foreground_id}`",)

    # -- plumbing --

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


def _shorter(remaining: float | None, cap: float) -> float:
    return cap if remaining is None else min(remaining, cap)


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
        if job_id == self._job_id and state in {s.value for s in JobState if s.is_final}:
            self._woken = True

    def _on_owner_changed(self, _conn: Any, _sender: str, _path: str, _iface: str, _member: str,
                          params: GLib.Variant) -> None:
        _name, _old, new = params.unpack()
        if new:
            self._woken = True

    def _on_timer(self, *_args: object) -> bool:
        self._woken = True
        return GLib.SOURCE_REMOVE
