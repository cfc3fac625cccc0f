"""gpujobctl: submit, inspect, follow and stop gpujobd jobs from a shell.

Exit codes: 0 success, 1 the operation failed, 2 usage error; `submit --wait` and `wait` exit with the
job's own code (a signal N gives 128+N, a failure without an exit code gives 1). Errors are one line on
stderr, `gpujobctl: <what was wrong>`, never a traceback. The D-Bus client is imported only when a verb
runs, so `-h` and usage errors answer fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

from gpujobd import __version__, api, errors
from gpujobd.model import JobState

PROG = "gpujobctl"
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command killed by SIGPIPE
STATUS_LOG_LINES = 10
TAIL_WINDOW_BYTES = 64 * 1024  # status reads the log from this far before its end, when it can stat it
CGROUP_SLICE_DIR = "/sys/fs/cgroup/gpujob.slice"
PROC_DIR = "/proc"
MAX_SHOWN_PROCESSES = 20
DEBUG_ENV = "GPUJOBCTL_DEBUG"  # set to show a traceback for an unexpected error

Job = Dict[str, Any]  # a job as the client returns it with raw=True (the wire dict)
ClientFactory = Callable[[], Any]


# --- entry point -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory | None = None) -> int:
    """Run gpujobctl with argv (default sys.argv[1:]) and return its exit code.

    `client_factory` makes the client a verb talks to (default: `default_client_factory`); tests pass
    one that returns a fake.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # -h, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else errors.EXIT_USAGE
    try:
        return args.handler(args, (client_factory or default_client_factory)())
    except errors.GpujobdError as error:
        print_error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            import traceback

            traceback.print_exc()
        print_error(f"unexpected error: {type(error).__name__}: {error} (this is a bug: please report it; "
                    f"set {DEBUG_ENV}=1 for details)")
        return errors.EXIT_FAILED


def default_client_factory() -> Any:
    """A gpujobd.client.Client with the timeouts of the client section of gpujobd's configuration."""
    from gpujobd.client import Client

    return Client(**_client_settings())


def _client_settings() -> Dict[str, float]:
    try:
        from gpujobd.config import load_config
    except ModuleNotFoundError as error:
        if error.name != "gpujobd.config":
            raise
        return {}
    try:
        settings = load_config().client
    except (errors.ConfigError, OSError) as error:
        print_error(f"warning: cannot read gpujobd's configuration ({error}); using the default client "
                    "settings")
        return {}
    return {"call_timeout_s": settings.call_timeout_s,
            "follow_poll_interval_s": settings.follow_poll_interval_s}


def print_error(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split(chr(10)))}", file=sys.stderr)


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# --- argument parsing --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `gpujobctl: ...`, and exit 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        print_error(f"{message}; see `{self.prog} -h`")
        raise SystemExit(errors.EXIT_USAGE)


def job_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"a job id is a whole number, not {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, not {text!r}")
    return int(text)


def key_value(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|min|sec|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds from "90", "1.5", "30s", "10min", "2h", "1h30m"; must be > 0."""
    stripped = text.strip()
    pos, total = 0, 0.0
    while pos < len(stripped):
        part = _DURATION_PART.match(stripped, pos)
        if part is None:
            break
        total += float(part.group(1)) * _DURATION_UNITS[(part.group(2) or "s").lower()]
        pos = part.end()
        while pos < len(stripped) and stripped[pos] == " ":
            pos += 1
    if not stripped or pos != len(stripped) or total <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90, 30s, 10min, 2h or 1h30m, "
                                         f"got {text!r}")
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run and inspect jobs on this GPU server. Every job runs in its own systemd scope, "
                    "gpujob-<id>.scope, managed by the gpujobd daemon.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)
    _add_submit(verbs)
    _add_stop(verbs)
    _add_status(verbs)
    _add_list(verbs)
    _add_logs(verbs)
    _add_wait(verbs)
    return parser


def _verb(verbs: Any, name: str, help: str, epilog: str, usage: str | None = None) -> argparse.ArgumentParser:
    return verbs.add_parser(name, help=help, description=help, epilog=epilog, usage=usage,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_submit(verbs: Any) -> None:
    sub = _verb(verbs, "submit", "submit a command as a new job", _SUBMIT_EPILOG,
                usage=f"{PROG} submit [-h] [--name NAME] [--cwd DIR] [--env NAME=VALUE]... "
                      "[--property P=V]... [--timeout DURATION] [--wait] [--json] -- CMD [ARG...]")
    sub.add_argument("--name", default="", help="a name to recognise the job by")
    sub.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one)")
    sub.add_argument("--env", action="append", type=key_value, default=[], metavar="NAME=VALUE",
                     help="set an environment variable for the job (repeatable; the job gets only "
                          "these, plus LANG)")
    sub.add_argument("--property", action="append", type=key_value, default=[], metavar="P=V",
                     help="a resource property of the job's scope, as the daemon allows (repeatable)")
    sub.add_argument("--timeout", type=duration, metavar="DURATION",
                     help="stop the job after this long (90, 30s, 10min, 2h, 1h30m)")
    sub.add_argument("--wait", action="store_true",
                     help="follow the job's log until it ends, and exit with its exit code")
    sub.add_argument("--json", action="store_true", help="print the job as JSON instead of its id")
    sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                     help="the command to run")
    sub.set_defaults(handler=cmd_submit)


def _add_stop(verbs: Any) -> None:
    sub = _verb(verbs, "stop", "stop jobs", _STOP_EPILOG)
    sub.add_argument("ids", nargs="+", type=job_id, metavar="ID")
    sub.set_defaults(handler=cmd_stop)


def _add_status(verbs: Any) -> None:
    sub = _verb(verbs, "status", "show a job's state, processes and the end of its log", _STATUS_EPILOG)
    sub.add_argument("id", type=job_id, metavar="ID")
    sub.add_argument("--json", action="store_true", help="print the job as JSON")
    sub.set_defaults(handler=cmd_status)


def _add_list(verbs: Any) -> None:
    sub = _verb(verbs, "list", "list jobs (active ones and those ended in the last hour)", _LIST_EPILOG)
    sub.add_argument("--all", action="store_true", help="include every ended job")
    sub.add_argument("--user", help="only this user's jobs")
    sub.add_argument("--state", choices=[state.value for state in JobState], help="only jobs in this state")
    sub.add_argument("--limit", type=positive_int, metavar="N", help="at most N jobs (newest first)")
    sub.add_argument("--json", action="store_true", help="print a JSON array")
    sub.set_defaults(handler=cmd_list)


def _add_logs(verbs: Any) -> None:
    sub = _verb(verbs, "logs", "print a job's log (its stdout and stderr)", _LOGS_EPILOG)
    sub.add_argument("id", type=job_id, metavar="ID")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    sub.set_defaults(handler=cmd_logs)


def _add_wait(verbs: Any) -> None:
    sub = _verb(verbs, "wait", "wait until jobs end; exit with the code of the first that failed",
                _WAIT_EPILOG)
    sub.add_argument("ids", nargs="+", type=job_id, metavar="ID")
    sub.add_argument("--timeout", type=duration, metavar="DURATION",
                     help="give up after this long in all (exit 1)")
    sub.add_argument("--json", action="store_true", help="print the ended jobs as a JSON array")
    sub.set_defaults(handler=cmd_wait)


_MAIN_EPILOG = """\
examples:
  gpujobctl submit --name train -- python train.py --epochs 10
  gpujobctl list
  gpujobctl logs -f 42
  gpujobctl stop 42

exit codes: 0 success, 1 failure, 2 usage error; `submit --wait` and `wait` exit with the job's code.
`gpujobctl VERB -h` explains each verb."""

_SUBMIT_EPILOG = """\
examples:
  gpujobctl submit -- python train.py --lr 0.1         # prints the job id
  id=$(gpujobctl submit --name sweep-3 -- ./run.sh 3)
  gpujobctl submit --env CUDA_VISIBLE_DEVICES=0 --timeout 2h -- python train.py
  gpujobctl submit --wait -- make test                 # log to stdout, exit with the job's code
  gpujobctl submit --json -- sleep 60 | jq .unit

Put the command after `--`. The job's environment is what --env gives, plus your LANG.
With --wait, a job killed by signal N exits 128+N and one that failed without an exit code exits 1;
Ctrl-C stops following but leaves the job running."""

_STOP_EPILOG = """\
examples:
  gpujobctl stop 42
  gpujobctl stop 42 43 44

Exits 1 if any job could not be stopped (every id is still tried)."""

_STATUS_EPILOG = """\
examples:
  gpujobctl status 42
  gpujobctl status 42 --json | jq -r .state"""

_LIST_EPILOG = """\
examples:
  gpujobctl list
  gpujobctl list --all --user alice
  gpujobctl list --state running --json | jq '.[].id'"""

_LOGS_EPILOG = """\
examples:
  gpujobctl logs 42
  gpujobctl logs -f 42
  gpujobctl logs 42 | tail -n 100"""

_WAIT_EPILOG = """\
examples:
  gpujobctl wait 42
  gpujobctl wait 42 43 44 && echo all succeeded
  gpujobctl wait --timeout 1h 42

Exits 0 if every job succeeded, else with the code of the first failed job in argument order
(signal N gives 128+N, a failure without an exit code gives 1)."""


# --- verbs -------------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, client: Any) -> int:
    job = client.submit(
        submitted_command(args.command), cwd=args.cwd, env=dict(args.env), name=args.name,
        properties=dict(args.property), timeout_s=args.timeout, raw=True,
    )
    if not args.wait:
        if args.json:
            print_json(api.job_to_json(job))
        else:
            print(job["id"])
        return errors.EXIT_OK
    try:
        if not args.json:
            write_chunks(client.logs(job["id"], follow=True))
        final = client.wait(job["id"], raw=True)
    except KeyboardInterrupt:
        print_error(f"interrupted: job {job['id']} keeps running; `{PROG} stop {job['id']}` stops it")
        return EXIT_INTERRUPTED
    if args.json:
        print_json(api.job_to_json(final))
    return exit_code_for(final)


def submitted_command(command: Sequence[str]) -> List[str]:
    """The command after `--` (argparse keeps the `--` in front of a REMAINDER)."""
    words = list(command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise errors.InvalidArgument(f"no command given: put it after `--`, e.g. "
                                     f"`{PROG} submit -- python train.py`")
    return words


def cmd_stop(args: argparse.Namespace, client: Any) -> int:
    failed = False
    for one_id in args.ids:
        try:
            print(f"job {one_id}: {_stop_one(client, one_id)}")
        except errors.Unavailable:
            raise  # the next ids would fail the same way
        except errors.GpujobdError as error:
            print_error(f"job {one_id}: {error}")
            failed = True
    return errors.EXIT_FAILED if failed else errors.EXIT_OK


def _stop_one(client: Any, one_id: int) -> str:
    result = client.stop(one_id)
    if result == api.STOP_STOPPING:
        return "stopping"
    if result == api.STOP_ALREADY_ENDED:
        return f"already ended ({client.get(one_id, raw=True)['state']})"
    return result


def cmd_status(args: argparse.Namespace, client: Any) -> int:
    job = client.get(args.id, raw=True)
    if args.json:
        print_json(api.job_to_json(job))
        return errors.EXIT_OK
    for line in format_status(job, time.time(), read_processes(job.get("unit", ""))):
        print(line)
    tail = log_tail(client, job, STATUS_LOG_LINES)
    if tail:
        print()
        for line in tail:
            print(line)
    return errors.EXIT_OK


def cmd_list(args: argparse.Namespace, client: Any) -> int:
    jobs = client.list(all=args.all, user=args.user, state=args.state, limit=args.limit, raw=True)
    if args.json:
        print_json([api.job_to_json(job) for job in jobs])
        return errors.EXIT_OK
    if not jobs:
        hint = "" if args.all else " (add --all to include jobs that ended more than an hour ago)"
        print(f"no jobs{hint}", file=sys.stderr)
        return errors.EXIT_OK
    width = _terminal_width() if sys.stdout.isatty() else None
    for line in format_table(jobs, time.time(), width):
        print(line)
    return errors.EXIT_OK


def cmd_logs(args: argparse.Namespace, client: Any) -> int:
    write_chunks(client.logs(args.id, follow=args.follow))
    return errors.EXIT_OK


def cmd_wait(args: argparse.Namespace, client: Any) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    first_failure = None
    ended: List[Job] = []
    for one_id in args.ids:
        code = _wait_one(client, one_id, deadline, ended, quiet=args.json)
        if first_failure is None and code != errors.EXIT_OK:
            first_failure = code
    if args.json:
        print_json([api.job_to_json(job) for job in ended])
    return errors.EXIT_OK if first_failure is None else first_failure


def _wait_one(client: Any, one_id: int, deadline: float | None, ended: List[Job], quiet: bool) -> int:
    timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        job = client.wait(one_id, timeout_s=timeout_s, raw=True)
    except errors.Unavailable:
        raise
    except errors.GpujobdError as error:
        print_error(f"job {one_id}: {error}")
        return errors.EXIT_FAILED
    ended.append(job)
    if not quiet:
        print(f"job {one_id}: {describe_end(job)}")
    return exit_code_for(job)


# --- job facts ---------------------------------------------------------------------------------------


def exit_code_for(job: Mapping[str, Any]) -> int:
    """The exit code a shell would give for the job: 0, its code, 128+signal, or 1 without either."""
    if job.get("state") == JobState.SUCCEEDED.value:
        return errors.EXIT_OK
    signal_number = job.get("signal")
    if signal_number is not None and 0 < signal_number < 128:
        return 128 + signal_number
    exit_code = job.get("exit_code")
    if exit_code is not None and 0 < exit_code < 256:
        return exit_code
    return errors.EXIT_FAILED


_SELF_EVIDENT_REASONS = {"exit-code", "signal", "stopped", "timeout", "lost"}


def describe_end(job: Mapping[str, Any]) -> str:
    """"succeeded", "failed (exit code 3)", "failed (exec-failed: No such file or directory)", ..."""
    state = job.get("state", "?")
    if state == JobState.SUCCEEDED.value:
        return state
    facts = []
    if job.get("exit_code") is not None:
        facts.append(f"exit code {job['exit_code']}")
    if job.get("signal") is not None:
        facts.append(f"signal {signal_text(job['signal'])}")
    reason, detail = job.get("reason") or "", job.get("detail") or ""
    if reason and reason not in _SELF_EVIDENT_REASONS:
        facts.append(f"{reason}: {detail}" if detail else reason)
    elif detail:
        facts.append(detail)
    if job.get("stopped_by"):
        facts.append(f"stopped by {job['stopped_by']}")
    return f"{state} ({', '.join(printable(fact) for fact in facts)})" if facts else state


def signal_text(number: int) -> str:
    import signal

    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


def exit_column(job: Mapping[str, Any]) -> str:
    if job.get("signal") is not None:
        return f"sig {job['signal']}"
    if job.get("exit_code") is not None:
        return str(job["exit_code"])
    return "-"


def runtime_s(job: Mapping[str, Any], now: float) -> float | None:
    if job.get("elapsed_s") is not None:
        return job["elapsed_s"]
    started, ended = job.get("started_at"), job.get("ended_at")
    if started is None:
        return None
    return max(0.0, (ended if ended is not None else now) - started)


def command_text(argv: Iterable[str]) -> str:
    return printable(" ".join(shlex.quote(arg) for arg in argv))


def printable(text: str) -> str:
    """Control characters escaped, so a job's name or command cannot break a table or the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def format_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}min {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def format_moment(timestamp: float, now: float) -> str:
    local = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
    return f"{local}; {format_duration(max(0.0, now - timestamp))} ago"


# --- status ------------------------------------------------------------------------------------------


def format_status(job: Mapping[str, Any], now: float, processes: Sequence[Tuple[int, str]]) -> List[str]:
    """The lines of `gpujobctl status` above the log, like `systemctl status`."""
    name = f" ({printable(job['name'])})" if job.get("name") else ""
    header = f"{_bullet()} job {job['id']}{name} - {describe_end(job)}"
    fields = _status_fields(job, now, processes)
    width = max((len(label) for label, _ in fields), default=0)
    lines = [header]
    for label, value in fields:
        head = f"{label}:".rjust(width + 1)
        value_lines = value.split("\n")
        lines.append(f"{head} {value_lines[0]}")
        lines.extend(" " * (width + 2) + more for more in value_lines[1:])
    return lines


def _status_fields(job: Mapping[str, Any], now: float,
                   processes: Sequence[Tuple[int, str]]) -> List[Tuple[str, str]]:
    fields: List[Tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "":
            fields.append((label, str(value)))

    add("Unit", job.get("unit"))
    add("User", _user_text(job))
    add("Command", command_text(job.get("argv", [])))
    add("Cwd", printable(job.get("cwd", "")))
    add("Environment", _pairs_text(job.get("env")))
    add("Properties", _pairs_text(job.get("properties")))
    if job.get("started_at") is None and job.get("created_at") is not None:
        add("Created", format_moment(job["created_at"], now))
    if job.get("started_at") is not None:
        add("Started", format_moment(job["started_at"], now))
    if job.get("ended_at") is not None:
        add("Ended", format_moment(job["ended_at"], now))
    elapsed = runtime_s(job, now)
    add("Runtime", None if elapsed is None else format_duration(elapsed))
    add("Timeout", None if job.get("timeout_s") is None else format_duration(job["timeout_s"]))
    add("Exit", job.get("exit_code"))
    add("Signal", None if job.get("signal") is None else signal_text(job["signal"]))
    add("Reason", job.get("reason"))
    add("Detail", printable(job.get("detail") or ""))
    add("Stopped by", job.get("stopped_by"))
    if job.get("leftover_processes"):
        add("Leftover processes", job["leftover_processes"])
    add("Processes", _processes_text(processes))
    add("Log", job.get("log_path"))
    return fields


def _user_text(job: Mapping[str, Any]) -> str | None:
    if not job.get("user"):
        return None
    return f"{job['user']} (uid {job['uid']})" if job.get("uid") is not None else job["user"]


def _pairs_text(pairs: Mapping[str, str] | None) -> str | None:
    if not pairs:
        return None
    return printable(" ".join(shlex.quote(f"{key}={value}") for key, value in sorted(pairs.items())))


def _processes_text(processes: Sequence[Tuple[int, str]]) -> str | None:
    if not processes:
        return None
    shown = [f"{pid} {cmdline}" for pid, cmdline in processes[:MAX_SHOWN_PROCESSES]]
    if len(processes) > MAX_SHOWN_PROCESSES:
        shown.append(f"... and {len(processes) - MAX_SHOWN_PROCESSES} more")
    return "\n".join(shown)


def _bullet() -> str:
    return "●" if _can_print("●") else "*"


def _can_print(text: str) -> bool:
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def read_processes(unit: str) -> List[Tuple[int, str]]:
    """(pid, command line) of every process in the job's cgroup; [] if it cannot be read."""
    if not unit or "/" in unit or unit.startswith("."):
        return []
    pids = set()
    for directory, _subdirs, _files in os.walk(os.path.join(CGROUP_SLICE_DIR, unit)):
        try:
            with open(os.path.join(directory, "cgroup.procs")) as procs:
                pids.update(int(line) for line in procs if line.strip().isdigit())
        except OSError:
            continue
    found = ((pid, _cmdline(pid)) for pid in sorted(pids))
    return [(pid, cmdline) for pid, cmdline in found if cmdline is not None]


def _cmdline(pid: int) -> str | None:
    try:
        with open(os.path.join(PROC_DIR, str(pid), "cmdline"), "rb") as source:
            raw = source.read()
        if raw:
            words = raw.rstrip(b"\0").split(b"\0")
            return command_text(word.decode("utf-8", "replace") for word in words)
        with open(os.path.join(PROC_DIR, str(pid), "comm"), "rb") as source:
            return f"[{printable(source.read().decode('utf-8', 'replace').strip())}]"
    except OSError:
        return None  # gone meanwhile, or not ours to read


def log_tail(client: Any, job: Mapping[str, Any], count: int) -> List[str]:
    """The last `count` lines of the job's log, as text to show.

    Reads forward from near the end when the log file can be stat'ed here (ReadLog offsets are byte
    offsets into it), else from the start, keeping only the last lines.
    """
    start = _tail_start(job.get("log_path"))
    chunks: Iterable[bytes] = client.logs(job["id"], follow=False, offset=start)
    if start > 0:
        chunks = _after_first_newline(chunks)
    kept = b""
    for chunk in chunks:
        kept = last_lines(kept + chunk, count)
    lines = kept.split(b"\n")  # not splitlines(): a lone \r (a progress bar) does not end a line
    if lines and not lines[-1]:
        lines.pop()
    return [_log_line_text(line) for line in lines]


def _tail_start(log_path: str | None) -> int:
    if not log_path:
        return 0
    try:
        size = os.stat(log_path).st_size
    except OSError:
        return 0
    # One byte more than the window: the partial first line is dropped, and so is nothing else.
    return max(0, size - TAIL_WINDOW_BYTES - 1)


def _after_first_newline(chunks: Iterable[bytes]) -> Iterator[bytes]:
    found = False
    for chunk in chunks:
        if not found:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            chunk, found = chunk[newline + 1:], True
        yield chunk


def last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of data (an unterminated last line counts as one)."""
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return data
    return data[pos + 1:]


_ANSI_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _log_line_text(line: bytes) -> str:
    text = line.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1]  # what a terminal shows
    return printable(_ANSI_SEQUENCE.sub("", text).replace("\t", "    "))


# --- list --------------------------------------------------------------------------------------------

_COLUMNS = ("ID", "USER", "STATE", "EXIT", "ELAPSED", "NAME", "COMMAND")


def format_table(jobs: Sequence[Mapping[str, Any]], now: float, width: int | None = None) -> List[str]:
    """The `list` table; COMMAND is cut to `width` columns in all (None: not cut)."""
    rows = [_COLUMNS] + [_table_row(job, now) for job in jobs]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].rjust(widths[0])] + [cell.ljust(w) for cell, w in zip(row[1:-1], widths[1:])]
        prefix = "  ".join(cells) + "  "
        lines.append(prefix + _cut(row[-1], None if width is None else width - len(prefix)))
    return lines


def _table_row(job: Mapping[str, Any], now: float) -> Tuple[str, ...]:
    elapsed = runtime_s(job, now)
    return (
        str(job["id"]),
        printable(job.get("user", "") or "-"),
        job.get("state", "?"),
        exit_column(job),
        "-" if elapsed is None else format_duration(elapsed),
        printable(job.get("name") or "-"),
        command_text(job.get("argv", [])),
    )


def _cut(text: str, room: int | None) -> str:
    if room is None or len(text) <= room:
        return text
    room = max(room, 10)
    ellipsis = "…" if _can_print("…") else "~"
    return text[: room - 1] + ellipsis


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


# --- output ------------------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def write_chunks(chunks: Iterable[bytes]) -> None:
    """Raw bytes to stdout, flushed as they come (a followed log shows up at once)."""
    sys.stdout.flush()
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
