"""The supervisor's contract, and the zygote that starts supervisors.

A job's supervisor is the compiled program `gpujob-supervisor` (native/supervisor.c, built by `make
native`; PROGRAM below): the small root program that runs inside each job's scope and runs the job's
command in it. It starts with fd 0 the read end of the "gate" pipe and fds 1 and 2 the job's log. It
reads one JSON line (the job spec, `encode_spec`), looks up the user's groups, waits for
`RELEASE_LINE` (sent once the scope is active), then runs the command up to `max_runs` times as the
job's user, appends one JSON line per finished run to `runs_file` (RUN_KEYS), and finally writes the
exit record (RECORD_KEYS, then LOG_RECORD_KEYS after a run) atomically to `exit_record`. Its own
exit status is not the job's: EXIT_RECORDED means the record was written.

Here: that contract (the spec and its check, which the daemon runs before it sends one, the record's
keys and values), and the zygote (`python3 -I .../supervisor.py --zygote`), which starts one
supervisor per request. It runs as a script wherever the package is installed, so it imports only
the standard library, and not even gpujobd.shared.states.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

RELEASE_LINE = b"release\n"
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


def log(message: str) -> None:
    """A diagnostic into the log of the job being started (fd 2); it must never fail the zygote."""
    with contextlib.suppress(OSError):
        data = (LOG_PREFIX + message + "\n").encode("utf-8", "backslashreplace")
        while data:
            data = data[os.write(2, data):]


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
# Where the compiled supervisor is: beside this module (`make native` in a checkout, `make install`),
# else where the .deb and the .rpm put it.
PROGRAM_PLACES = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "gpujob-supervisor"),
                  "/usr/libexec/gpujobd/gpujob-supervisor")
PROGRAM = next((path for path in PROGRAM_PLACES if os.access(path, os.X_OK)), PROGRAM_PLACES[0])


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


def main(argv: list | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cgroup_root = CGROUP_ROOT
    if not args or args[0] != ZYGOTE_ARG:
        log(f"usage: python3 -m gpujobd.supervisor {ZYGOTE_ARG} [--cgroup-root DIR] (a job's supervisor "
            f"is {PROGRAM})")
        return EXIT_USAGE
    args = args[1:]
    if len(args) == 2 and args[0] == "--cgroup-root":
        cgroup_root = args[1]
    elif args:
        log(f"usage: python3 -m gpujobd.supervisor {ZYGOTE_ARG} [--cgroup-root DIR]")
        return EXIT_USAGE
    return zygote(0, cgroup_root)


if __name__ == "__main__":
    sys.exit(main())
