"""The small root program that runs inside each job's scope and runs the job's command in it.

The zygote (`zygote` below, started by the daemon as `python3 -I .../supervisor.py --zygote`) forks
one per job, with fd 0 the read end of the "gate" pipe and fds 1 and 2 the job's log. It reads one
JSON line (the job spec, see `encode_spec`), looks up the user's groups, waits for
`RELEASE_LINE` (sent once the scope is active), then runs the command up to `max_runs` times as the
job's user, appends one JSON line per finished run to `runs_file`, and finally writes the exit record
atomically to `exit_record`. Its own exit status is not the job's: 0 means the record was written.

It runs as a script wherever the package is installed, so it imports only the standard library, and
not even gpujobd.shared.states.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings  # noqa: F401  os.execvpe imports it: once here (the zygote), not in each job's child
from errno import EACCES, ENOENT

SUPERVISOR_MODULE = "gpujobd.supervisor"
RELEASE_LINE = b"release\n"
RUN_ENV_VAR = "GPUJOB_RUN"
LOG_PREFIX = "gpujob: "
CGROUP_ROOT = "/sys/fs/cgroup"

# These mirror gpujobd.shared.states.EndReason (tests check that they still do).
REASON_EXIT_CODE = "exit-code"
REASON_SIGNAL = "signal"
REASON_EXEC_FAILED = "exec-failed"
REASON_CHDIR_FAILED = "chdir-failed"
REASON_SETUP_FAILED = "setup-failed"
REASON_START_FAILED = "start-failed"
REASON_LOST = "lost"

SPEC_KEYS = (
    "job_id", "argv", "cwd", "env", "uid", "gid", "user", "umask",
    "exit_record", "runs_file", "max_runs", "restart_delay_s", "stop_on_failure", "log_max_bytes",
    "log_drain_s",
)
MAX_DELAY_S = 100 * 365 * 24 * 3600  # what the daemon allows (spec.MAX_TIMEOUT_S); sleeps overflow above
MAX_LOG_DRAIN_S = 3600  # config jobs.log_drain_s's maximum
RUN_KEYS = ("run", "started_at", "ended_at", "exit_code", "signal", "reason", "detail")
RECORD_KEYS = (
    "job_id", "started_at", "ended_at", "exit_code", "signal", "reason", "detail",
    "leftover_processes", "leftovers_counted", "runs", "max_runs", "terminated_by_signal",
    "stop_signal_phase", "stop_signal_after_s",
)
LOG_RECORD_KEYS = ("log_bytes", "log_truncated", "log_error")  # after a run: how the log fared
# When the first stop signal came (the record's stop_signal_phase; None when none came): while a run
# was in progress, between two runs (the loop would have run again), or after the last run had ended
# by itself (the command was done: the signal ended nothing of it).
PHASE_RUN = "run"
PHASE_BETWEEN_RUNS = "between-runs"
PHASE_AFTER_LAST_RUN = "after-last-run"

EXIT_RECORDED = 0  # the exit record was written, whatever happened to the job
EXIT_RECORD_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_SPEC = 3  # no (valid) spec arrived, so there is nowhere to write a record

CHILD_FAILED_STATUS = 127
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LEFTOVERS_UNAVAILABLE = "leftover count unavailable"

_STEP_REASONS = {"setup": REASON_SETUP_FAILED, "chdir": REASON_CHDIR_FAILED, "exec": REASON_EXEC_FAILED}
_CANNOT_RERUN = frozenset(_STEP_REASONS.values()) | {REASON_LOST}


class SpecError(ValueError):
    """The job spec from the daemon is malformed; nothing is run."""


class Spec:
    """A validated job spec; attributes are named as in SPEC_KEYS."""

    __slots__ = SPEC_KEYS
    job_id: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    uid: int
    gid: int
    user: str
    umask: int
    exit_record: str
    runs_file: str
    max_runs: int
    restart_delay_s: float
    stop_on_failure: bool
    log_max_bytes: int
    log_drain_s: float

    def __init__(self, fields: dict) -> None:
        for key in SPEC_KEYS:
            setattr(self, key, fields[key])


# ---------------------------------------------------------------------------------------------------
# The spec: built by the daemon with encode_spec, read here with parse_spec.


def encode_spec(fields: dict) -> bytes:
    """The gate's first line for the daemon: compact JSON, newline-terminated. Raises SpecError."""
    spec_from_dict(fields)
    return json.dumps(fields, separators=(",", ":")).encode("ascii") + b"\n"


def parse_spec(line: bytes) -> Spec:
    try:
        fields = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise SpecError(f"job spec is not JSON: {exc}") from None
    return spec_from_dict(fields)


def spec_from_dict(fields: object) -> Spec:
    if not isinstance(fields, dict):
        raise SpecError("job spec is not a JSON object")
    missing = [key for key in SPEC_KEYS if key not in fields]
    unknown = sorted(set(fields) - set(SPEC_KEYS))
    if missing or unknown:
        raise SpecError(f"job spec: missing keys {missing}, unknown keys {unknown}")
    _check_int(fields, "job_id", 0)
    _check_int(fields, "uid", 1)  # uid 0 is refused: user code never runs as root
    _check_int(fields, "gid", 0)
    _check_int(fields, "umask", 0, 0o777)
    _check_int(fields, "max_runs", 1)
    _check_int(fields, "log_max_bytes", 0)
    _check_argv(fields["argv"])
    _check_env(fields["env"])
    _check_text(fields, "user")
    for key in ("cwd", "exit_record", "runs_file"):
        _check_text(fields, key)
        if not fields[key].startswith("/"):
            raise SpecError(f"job spec: {key} must be an absolute path")
    _check_seconds(fields, "restart_delay_s", MAX_DELAY_S)
    _check_seconds(fields, "log_drain_s", MAX_LOG_DRAIN_S)
    if not isinstance(fields["stop_on_failure"], bool):
        raise SpecError("job spec: stop_on_failure must be a boolean")
    return Spec(fields)


def _check_int(fields: dict, key: str, low: int, high: int | None = None) -> None:
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise SpecError(f"job spec: {key} must be an integer {bounds}")


def _check_seconds(fields: dict, key: str, high: float) -> None:
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise SpecError(f"job spec: {key} must be a number from 0 to {high}")


def _check_text(fields: dict, key: str) -> None:
    if not _is_clean_text(fields[key]):
        raise SpecError(f"job spec: {key} must be a non-empty string without NUL")


def _is_clean_text(value: object) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def _check_argv(argv: object) -> None:
    if not isinstance(argv, list) or not argv or not _is_clean_text(argv[0]):
        raise SpecError("job spec: argv must be a non-empty list starting with the command")
    if not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
        raise SpecError("job spec: argv must hold strings without NUL")


def _check_env(env: object) -> None:
    if not isinstance(env, dict):
        raise SpecError("job spec: env must be an object")
    for name, value in env.items():
        if not _is_clean_text(name) or "=" in name or not isinstance(value, str) or "\0" in value:
            raise SpecError(f"job spec: bad environment variable {name!r}")


# ---------------------------------------------------------------------------------------------------
# Records: pure functions from what happened to the dicts that are written.


def run_record_from_status(run: int, started_at: float, ended_at: float, status: int) -> dict:
    """A finished run from its wait status; exit_code and signal stay separate (137 is not SIGKILL)."""
    exit_code = sig = None
    if os.WIFEXITED(status):
        exit_code = os.WEXITSTATUS(status)
        reason, detail = REASON_EXIT_CODE, f"exited with code {exit_code}"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        reason, detail = REASON_SIGNAL, f"killed by {signal_name(sig)}"
        if os.WCOREDUMP(status):
            detail += " (core dumped)"
    else:
        reason, detail = REASON_LOST, f"unexpected wait status {status:#x}"
    return _run_record(run, started_at, ended_at, exit_code, sig, reason, detail)


def run_record_from_failure(run: int, started_at: float, ended_at: float, step: str, message: str) -> dict:
    """A run whose command never started: the child failed at `step` (setup, chdir or exec)."""
    return _run_record(run, started_at, ended_at, None, None, _STEP_REASONS[step], message)


def _run_record(run: int, started_at: float, ended_at: float, exit_code: int | None, sig: int | None,
                reason: str, detail: str) -> dict:
    return {"run": run, "started_at": started_at, "ended_at": ended_at, "exit_code": exit_code,
            "signal": sig, "reason": reason, "detail": detail}


def signal_name(signum: int | None) -> str:
    if signum is None:
        return "a stop signal"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def should_run_again(last_run: dict, runs_done: int, max_runs: int, stop_on_failure: bool,
                     received_signal: int | None) -> bool:
    if received_signal is not None or runs_done >= max_runs:
        return False
    if last_run["reason"] in _CANNOT_RERUN:
        return False  # the same setup, chdir or exec would fail again
    succeeded = last_run["reason"] == REASON_EXIT_CODE and last_run["exit_code"] == 0
    return succeeded or not stop_on_failure


def stop_signal_phase(spec: Spec, runs: list, received_signal: int | None,
                      received_during_run: bool) -> str | None:
    """When the first stop signal came, told apart for the daemon (see PHASE_*)."""
    if received_signal is None:
        return None
    if received_during_run:
        return PHASE_RUN
    would_go_on = should_run_again(runs[-1], len(runs), spec.max_runs, spec.stop_on_failure, None)
    return PHASE_BETWEEN_RUNS if would_go_on else PHASE_AFTER_LAST_RUN


def build_exit_record(spec: Spec, runs: list, ended_at: float, leftovers: int | None,
                      received_signal: int | None, phase: str | None = None,
                      signal_after_s: float | None = None) -> dict:
    """The job's exit record after at least one run; leftovers None means they could not be counted.
    `phase` and `signal_after_s`: when the first stop signal came (stop_signal_phase, own_age_s)."""
    last = runs[-1]
    detail = last["detail"]
    if leftovers is None:
        detail = f"{detail}; {LEFTOVERS_UNAVAILABLE}" if detail else LEFTOVERS_UNAVAILABLE
    return {"job_id": spec.job_id, "started_at": runs[0]["started_at"], "ended_at": ended_at,
            "exit_code": last["exit_code"], "signal": last["signal"], "reason": last["reason"],
            "detail": detail, "leftover_processes": leftovers or 0,
            # Counted and none: the scope empties, and ends, as this supervisor exits (the daemon
            # then asks for no stop).
            "leftovers_counted": leftovers is not None, "runs": len(runs),
            "max_runs": spec.max_runs, "terminated_by_signal": received_signal,
            "stop_signal_phase": phase, "stop_signal_after_s": signal_after_s}


def build_start_failed_record(spec: Spec, ended_at: float, detail: str, received_signal: int | None,
                              signal_after_s: float | None = None) -> dict:
    return {"job_id": spec.job_id, "started_at": None, "ended_at": ended_at, "exit_code": None,
            "signal": None, "reason": REASON_START_FAILED, "detail": detail, "leftover_processes": 0,
            "leftovers_counted": False, "runs": 0, "max_runs": spec.max_runs,
            "terminated_by_signal": received_signal, "stop_signal_phase": None,
            "stop_signal_after_s": signal_after_s}


# ---------------------------------------------------------------------------------------------------
# Files and cgroups.


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data`: temp file in the same directory, fsync, rename, fsync the directory."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)


def append_run(path: str, run: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, encode_json_line(run))
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_json_line(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii") + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def cgroup_path_from_proc(text: str) -> str | None:
    """The unified (v2) cgroup path from /proc/<pid>/cgroup text; v1 lines are ignored."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def count_leftover_processes(cgroup_root: str, cgroup_path: str, own_pid: int) -> int | None:
    """Processes in the cgroup other than `own_pid`, or None if cgroup.procs cannot be read."""
    procs = os.path.join(cgroup_root, cgroup_path.lstrip("/"), "cgroup.procs")
    try:
        with open(procs) as f:
            pids = {int(word) for word in f.read().split()}
    except (OSError, ValueError):
        return None
    pids.discard(own_pid)
    return len(pids)


def own_leftover_processes(cgroup_root: str) -> int | None:
    try:
        with open("/proc/self/cgroup") as f:
            path = cgroup_path_from_proc(f.read())
    except OSError:
        return None
    return None if path is None else count_leftover_processes(cgroup_root, path, os.getpid())


def log(message: str) -> None:
    """A diagnostic into the job's log (fd 2); it must never fail the supervisor."""
    with contextlib.suppress(OSError):
        _write_all(2, (LOG_PREFIX + message + "\n").encode("utf-8", "backslashreplace"))


# ---------------------------------------------------------------------------------------------------
# The log: the job writes into a pipe; a thread copies it to the log file up to log_max_bytes.
# (Issue 15: a job can neither fill the disk through its log nor lose the news that its log failed.)

LOG_PUMP_CHUNK = 65536


class _LogPump:
    """Owns the log file (moved to a high fd, which the job's processes never inherit); fds 1 and 2
    become a pipe. Past `cap` bytes (0: none) one line says so and the rest is read and dropped, so
    the job runs on; a write that fails (ENOSPC, EIO) is remembered for the exit record."""

    def __init__(self, cap: int, drain_s: float) -> None:
        self.cap = cap
        self.drain_s = drain_s  # after the last run, how long it may take to copy what is left in the pipe
        self.written = 0
        self.truncated = False
        self.error: str | None = None
        self._log_fd = os.dup(1)
        os.set_inheritable(self._log_fd, False)
        read_end, write_end = os.pipe()
        self._read_fd = read_end
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._copy, name="log-pump", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, LOG_PUMP_CHUNK)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        if self.truncated or self.error is not None:
            return
        if self.cap and self.written + len(data) > self.cap:
            data = data[: self.cap - self.written]
            self.truncated = True
        try:
            _write_all(self._log_fd, data)
            self.written += len(data)
            if self.truncated:
                _write_all(self._log_fd, (f"\n{LOG_PREFIX}log truncated at {self.cap} bytes "
                                          "(jobs.log_max_bytes); the job runs on, its further output "
                                          "is dropped\n").encode())
        except OSError as exc:
            self.error = exc.strerror or str(exc)

    def finish(self) -> dict:
        """Stop feeding the pipe ourselves, let the pump copy what is left, say how the log fared;
        our own last words go to the log file directly again."""
        os.dup2(self._log_fd, 1)
        os.dup2(self._log_fd, 2)
        self._thread.join(self.drain_s)  # a leftover process may hold the pipe open: never wait on it
        return {"log_bytes": self.written, "log_truncated": self.truncated, "log_error": self.error}


# ---------------------------------------------------------------------------------------------------
# Signals: the first stop signal is remembered and every one is forwarded to the running child.


class _StoppedBeforeRelease(Exception):
    pass


def process_age_s(stat_text: str, now_boottime: float, clock_ticks: int) -> float | None:
    """Seconds since the process of `stat_text` (/proc/<pid>/stat) started, on CLOCK_BOOTTIME. Its start
    time is rounded down to a clock tick, so this never under-counts: the supervisor starts before its
    scope is active, and a stop signal RuntimeMaxSec=T sends always comes at an age of T or more."""
    fields = stat_text.rpartition(")")[2].split()  # the command name in parentheses may hold spaces
    try:
        return round(now_boottime - int(fields[19]) / clock_ticks, 6)
    except (IndexError, ValueError, ZeroDivisionError):
        return None


def own_age_s() -> float | None:
    try:
        with open("/proc/self/stat") as f:
            text = f.read()
        return process_age_s(text, time.clock_gettime(time.CLOCK_BOOTTIME), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


class _Signals:
    def __init__(self) -> None:
        self.received: int | None = None
        self.received_after_s: float | None = None  # the supervisor's age then (own_age_s)
        self.received_during_run = False
        self.child: int | None = None
        self.released = False

    def note(self, signum: int) -> None:
        """Remember the first stop signal: which, when, and whether a run was in progress."""
        if self.received is None:
            self.received = signum
            self.received_after_s = own_age_s()
            self.received_during_run = self.child is not None

    def handle(self, signum: int, frame: object) -> None:
        self.note(signum)
        if not self.released:
            raise _StoppedBeforeRelease()
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signum)

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)
        # An inherited SIG_IGN for SIGCHLD would make the kernel reap the child before waitpid does.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _block_stop_signals() -> None:
    # pthread_sigmask runs any handler already caught before returning, so state is current after it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _pause(signals: _Signals, delay_s: float) -> None:
    """Sleep between runs; a stop signal ends the sleep (time.sleep would just resume)."""
    if delay_s <= 0:
        return
    _block_stop_signals()
    try:
        if signals.received is None:
            info = signal.sigtimedwait(STOP_SIGNALS, delay_s)
            if info is not None:
                signals.note(info.si_signo)
    finally:
        _unblock_stop_signals()


# ---------------------------------------------------------------------------------------------------
# The gate.


class _Gate:
    """Reads lines from the gate pipe without reading past them into anything else."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def read_line(self) -> bytes | None:
        """The next line with its newline, or None at EOF before a complete line."""
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"


def _reopen_stdin_as_devnull() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)


# ---------------------------------------------------------------------------------------------------
# One run: the child drops privileges and execs; the parent waits and reports.


class _ChildFailure(Exception):
    def __init__(self, step: str, errno: int, message: str) -> None:
        super().__init__(message)
        self.step, self.errno, self.message = step, errno, message


def lookup_groups(spec: Spec) -> list[int] | OSError:
    """The user's supplementary groups, looked up while the gate is still closed: NSS may load a
    module and ask a service for them (systemd's userdb: a dlopen and a varlink call in every fresh
    child), milliseconds that would otherwise come between the release and the command. A failure is
    reported by each run's child (a setup failure), as the lookup's own failure there was."""
    try:
        return os.getgrouplist(spec.user, spec.gid)
    except OSError as exc:
        return exc


def _run_child(spec: Spec, run: int, error_fd: int, groups: list[int] | OSError) -> None:
    """In the forked child: never returns, and never runs the command unless every step succeeded."""
    try:
        try:
            _drop_privileges(spec, groups)
            _enter_cwd(spec.cwd)
            os.umask(spec.umask)
            _close_fds_except(error_fd)
            _reset_signals()
            env = dict(spec.env)
            env[RUN_ENV_VAR] = str(run)
            _exec(spec.argv, env)
        except _ChildFailure as failure:
            report = [failure.step, failure.errno, failure.message]
        except BaseException as exc:
            report = ["setup", 0, f"unexpected error: {exc!r}"]
        _write_all(error_fd, json.dumps(report).encode("ascii"))
    finally:
        os._exit(CHILD_FAILED_STATUS)


def _drop_privileges(spec: Spec, groups: list[int] | OSError) -> None:
    uid, gid = spec.uid, spec.gid
    if isinstance(groups, OSError):
        raise _ChildFailure("setup", groups.errno or 0, f"getgrouplist: {groups.strerror}")
    step = "setgroups"
    try:
        os.setgroups(groups)
        step = "setresgid"
        os.setresgid(gid, gid, gid)
        step = "setresuid"
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise _ChildFailure("setup", exc.errno or 0, f"{step}: {exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
            or set(os.getgroups()) != set(groups):
        raise _ChildFailure("setup", 0, f"privileges not dropped to uid {uid} gid {gid}")


def _enter_cwd(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise _ChildFailure("chdir", exc.errno or 0, chdir_failure_message(cwd, exc.strerror or "")) from None


def chdir_failure_message(cwd: str, strerror: str) -> str:
    """Why the job's directory could not be entered, with a hint when a `~` was never expanded."""
    message = f"{cwd}: {strerror}"
    if "~" in cwd:
        message += ("; the path holds a literal '~': the shell expands ~ only at the start of a word "
                    "(not after --cwd=), so write --cwd ~/dir or --cwd=$HOME/dir")
    return message


def _close_fds_except(keep: int) -> None:
    # Listing the open fds beats closerange up to RLIMIT_NOFILE, which can be huge and which Python 3.9
    # closes one by one; /proc/self/fd stays readable to the process itself after the uid change.
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, keep)
        os.closerange(keep + 1, _max_fd())
        return
    for fd in fds:
        if fd >= 3 and fd != keep:
            with contextlib.suppress(OSError):  # EBADF for the fd listdir itself used
                os.close(fd)


def _max_fd() -> int:
    try:
        return max(os.sysconf("SC_OPEN_MAX"), 1024)
    except (OSError, ValueError):
        return 65536


def _reset_signals() -> None:
    """Default dispositions and an empty mask for the command. exec resets a caught signal itself,
    but an ignored one stays ignored; Python knows every signal's disposition (inherited ones
    included), so only those not at the default are set: a handful of calls, not one per signal."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP) or signal.getsignal(signum) == signal.SIG_DFL:
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _exec(argv: list, env: dict) -> None:
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        message = exec_failure_message(argv[0], exc.errno or 0, exc.strerror or "", env.get("PATH", ""))
        raise _ChildFailure("exec", exc.errno or 0, message) from None


def exec_failure_message(program: str, errno: int, strerror: str, path: str) -> str:
    """Why the command could not be run: for a name searched in PATH, which PATH, and a hint for
    `python` (Debian and Ubuntu have only python3, unless a virtualenv is active)."""
    message = f"{program}: {strerror}"
    if "/" in program or errno not in (ENOENT, EACCES):
        return message
    message += f" (searched PATH={path})"
    if program == "python":
        message += ("; this system may have no `python`: run python3, or submit from an activated "
                    "virtualenv (the job inherits its PATH)")
    return message


def run_once(spec: Spec, run: int, signals: _Signals, groups: list[int] | OSError) -> dict | None:
    """Run the command once and wait for it; None if a stop signal came before it could start."""
    started_at = time.time()
    try:
        error_r, error_w = os.pipe()  # both ends are close-on-exec: EOF on error_r means the exec worked
    except OSError as exc:
        return _fork_failed(run, started_at, "pipe", exc)
    try:
        _block_stop_signals()
        try:
            if signals.received is not None:
                return None
            started_at = time.time()
            pid = os.fork()
            if pid == 0:
                _run_child(spec, run, error_w, groups)
            signals.child = pid
        except OSError as exc:
            return _fork_failed(run, started_at, "fork", exc)
        finally:
            _unblock_stop_signals()  # a signal that arrived meanwhile is forwarded now
        os.close(error_w)
        error_w = -1
        failure = _read_child_failure(error_r)
        status = _wait_for_child(pid, signals)
    finally:
        os.close(error_r)
        if error_w >= 0:
            os.close(error_w)
    ended_at = time.time()
    if failure is not None:
        step, message = failure
        log(f"{step} failed: {message}")
        return run_record_from_failure(run, started_at, ended_at, step, message)
    if status is None:
        return _run_record(run, started_at, ended_at, None, None, REASON_LOST,
                           "the command's exit status was lost (reaped elsewhere)")
    return run_record_from_status(run, started_at, ended_at, status)


def _fork_failed(run: int, started_at: float, step: str, exc: OSError) -> dict:
    message = f"{step}: {exc.strerror}"
    log(f"setup failed: {message}")
    return run_record_from_failure(run, started_at, time.time(), "setup", message)


def _read_child_failure(fd: int) -> tuple | None:
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    if not data:
        return None
    try:
        step, _errno, message = json.loads(data)
        if step in _STEP_REASONS:
            return step, str(message)
    except ValueError:
        pass
    return "setup", "the child reported a malformed error"


def _wait_for_child(pid: int, signals: _Signals) -> int | None:
    """The child's wait status, or None if it was reaped elsewhere."""
    try:
        # Wait without reaping first: until it is reaped the pid cannot be reused, so a signal
        # forwarded meanwhile cannot hit some other process.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        _block_stop_signals()
        try:
            signals.child = None
            _, status = os.waitpid(pid, 0)
        finally:
            _unblock_stop_signals()
    except ChildProcessError:
        signals.child = None
        return None
    return status


# ---------------------------------------------------------------------------------------------------
# The whole job.


def supervise(gate_fd: int, cgroup_root: str) -> int:
    signals = _Signals()
    gate = _Gate(gate_fd)
    spec = None
    pump = None
    try:
        signals.install()
        spec = _read_spec(gate)
        if spec is None:
            return EXIT_NO_SPEC
        groups = lookup_groups(spec)
        # The log pump's pipe and thread are set up behind the gate too, not between release and
        # command; with stop signals held, so that one caught meanwhile finds the pump in place.
        _block_stop_signals()
        pump = _LogPump(spec.log_max_bytes, spec.log_drain_s)
        _unblock_stop_signals()
        released = gate.read_line()
        signals.released = True
    except _StoppedBeforeRelease:
        if spec is None:
            log(f"received {signal_name(signals.received)} before the job spec; nothing was run")
            return EXIT_NO_SPEC
        return _finish_unreleased(spec, f"received {signal_name(signals.received)} before release; "
                                        "nothing was run", signals, pump)
    if released != RELEASE_LINE:
        what = "closed before release" if released is None else "sent something other than release"
        return _finish_unreleased(spec, f"the gate {what}; nothing was run", signals, pump)
    _reopen_stdin_as_devnull()
    runs = _run_all(spec, signals, groups)
    log_fate = pump.finish()
    if not runs:  # a stop signal came after release but before the first run started
        return _finish_unreleased(spec, f"received {signal_name(signals.received)} before the first run; "
                                        "nothing was run", signals)
    leftovers = own_leftover_processes(cgroup_root)
    phase = stop_signal_phase(spec, runs, signals.received, signals.received_during_run)
    record = build_exit_record(spec, runs, time.time(), leftovers, signals.received, phase,
                               signals.received_after_s)
    record.update(log_fate)
    return _write_exit_record(spec, record)


def _read_spec(gate: _Gate) -> Spec | None:
    line = gate.read_line()
    if line is None:
        log("the gate closed before the job spec arrived; nothing was run")
        return None
    try:
        return parse_spec(line)
    except SpecError as exc:
        log(f"{exc}; nothing was run")
        return None


def _run_all(spec: Spec, signals: _Signals, groups: list[int] | OSError) -> list:
    runs: list = []
    while True:
        record = run_once(spec, len(runs) + 1, signals, groups)
        if record is None:
            return runs
        runs.append(record)
        try:
            append_run(spec.runs_file, record)
        except OSError as exc:
            log(f"cannot append to {spec.runs_file}: {exc.strerror}")
        if not should_run_again(record, len(runs), spec.max_runs, spec.stop_on_failure, signals.received):
            return runs
        _pause(signals, spec.restart_delay_s)


def _finish_unreleased(spec: Spec, detail: str, signals: _Signals, pump: _LogPump | None = None) -> int:
    if pump is not None:
        pump.finish()  # our last words go to the log file directly
    log(detail)
    return _write_exit_record(spec, build_start_failed_record(spec, time.time(), detail, signals.received,
                                                              signals.received_after_s))


def _write_exit_record(spec: Spec, record: dict) -> int:
    try:
        write_atomic(spec.exit_record, encode_json_line(record))
    except OSError as exc:
        log(f"cannot write the exit record {spec.exit_record}: {exc.strerror}")
        return EXIT_RECORD_FAILED
    return EXIT_RECORDED


# ---------------------------------------------------------------------------------------------------
# The zygote: one pre-started process that starts a gated supervisor per job, so that the daemon's
# thread never waits for a process start. The supervisor is the compiled program (PROGRAM, built from
# native/supervisor.c), spawned with posix_spawn (a vfork and an exec: no copy of a Python heap).
# Its fd 0 is a SOCK_SEQPACKET socket to the daemon. Each request is one message carrying exactly two
# fds (SCM_RIGHTS): the gate's read end and the job's log, both opened by the daemon. The zygote
# answers with the supervisor's PID (the PID the daemon puts into the job's scope): fd 0 the gate,
# fds 1 and 2 the log, a session of its own.
# The zygote never holds a gate's write end, so a dead daemon still closes every gate; it exits when
# the daemon's end closes. Its SIGCHLD is ignored, so the kernel reaps its children: no zombie, and
# nothing of the zygote stays in (or keeps alive) a job's scope.

ZYGOTE_ARG = "--zygote"
ZYGOTE_REQUEST = b"fork"
ZYGOTE_FDS = 2  # the gate's read end, the job's log
ZYGOTE_FAILED = b"0"  # the answer when no child could be started
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "gpujob-supervisor")


def zygote(sock_fd: int, cgroup_root: str) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    while True:
        message, fds = _receive_request(sock)
        if message is None:
            return EXIT_RECORDED  # the daemon closed its end
        pid = _spawn_supervisor(fds, cgroup_root) if len(fds) == ZYGOTE_FDS else None
        for fd in fds:
            os.close(fd)
        sock.send(ZYGOTE_FAILED if pid is None else str(pid).encode("ascii"))


def _receive_request(sock: socket.socket) -> tuple:
    """(message, fds) of the next request; (None, []) when the other end is closed."""
    fd_size = ZYGOTE_FDS * 4
    message, ancillary, _flags, _addr = sock.recvmsg(64, socket.CMSG_SPACE(fd_size + 4),
                                                     socket.MSG_CMSG_CLOEXEC)
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, usable, 4)]
    if not message:
        for fd in fds:
            os.close(fd)
        return None, []
    if message != ZYGOTE_REQUEST:
        log(f"zygote: unknown request {message[:20]!r}")
        for fd in fds:
            os.close(fd)
        return message, []
    return message, fds


def _spawn_supervisor(fds: list, cgroup_root: str) -> int | None:
    try:
        return os.posix_spawn(PROGRAM, [PROGRAM, "--cgroup-root", cgroup_root], dict(os.environ),
                              setsid=True, file_actions=[(os.POSIX_SPAWN_DUP2, fds[0], 0),
                                                         (os.POSIX_SPAWN_DUP2, fds[1], 1),
                                                         (os.POSIX_SPAWN_DUP2, fds[1], 2)])
    except OSError as exc:
        log(f"zygote: cannot start {PROGRAM}: {exc.strerror}")
        return None


def supervisor_argv(python: str) -> list:
    """How the daemon starts the supervisor: -I so no PYTHON* variable or cwd can change what runs as root."""
    return [python, "-I", "-m", SUPERVISOR_MODULE]


def main(argv: list | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cgroup_root = CGROUP_ROOT
    as_zygote = bool(args) and args[0] == ZYGOTE_ARG
    if as_zygote:
        args = args[1:]
    if len(args) == 2 and args[0] == "--cgroup-root":
        cgroup_root = args[1]
    elif args:
        log(f"usage: python3 -m gpujobd.supervisor [{ZYGOTE_ARG}] [--cgroup-root DIR]")
        return EXIT_USAGE
    return zygote(0, cgroup_root) if as_zygote else supervise(0, cgroup_root)


if __name__ == "__main__":
    sys.exit(main())
