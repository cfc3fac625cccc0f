"""gpujobctl: submit, inspect, follow and stop gpujobd jobs from a shell.

Argument parsing and one handler per verb; what is shown is formatted by gpujobd.cli.render.

Exit codes: one per error kind, from gpujobd.shared.errors (EXIT_CODES); `submit --wait` and `wait`
exit with the job's own code once it ended (a signal N gives 128+N, a failure without an exit code
gives 1). Errors are one line on stderr, `gpujobctl: <what was wrong>`, never a traceback. The D-Bus
client is imported only when a verb runs, so `-h` and usage errors answer fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, NoReturn, Sequence, Set, Tuple

from gpujobd import __version__
from gpujobd.cli.render import (
    command_text,
    describe_end,
    format_status,
    format_table,
    log_tail,
    printable,
)
from gpujobd.shared import api, errors
from gpujobd.shared.model import JobState

PROG = "gpujobctl"
EXIT_INTERRUPTED = errors.EXIT_INTERRUPTED
EXIT_BROKEN_PIPE = errors.EXIT_BROKEN_PIPE
STATUS_LOG_LINES = 10
STATUS_RUNS = 5  # status shows this many of a background loop's last runs
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_SLICE_DIR = CGROUP_ROOT + "/gpujob.slice"  # where a job's scope is when its cgroup is not known
PROC_DIR = "/proc"
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
        if getattr(args, "check", None) is not None:
            args.check(args)
    except SystemExit as done:  # -h, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else errors.EXIT_USAGE
    try:
        code = args.handler(args, (client_factory or default_client_factory)())
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
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
        from gpujobd.shared.config_toml import load_config
    except ModuleNotFoundError as error:
        if error.name != "gpujobd.shared.config":
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
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()  # what was printed before comes first when both go to one place
    print(f"{PROG}: {' '.join(message.splitlines())}", file=sys.stderr)


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

    def error(self, message: str) -> NoReturn:
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


def command_string(text: str) -> List[str]:
    """A command given as one shell-quoted string, split like a shell would (no expansion)."""
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"cannot split {text!r} into words: {error}") from None
    if not words:
        raise argparse.ArgumentTypeError("the command is empty: give it as one quoted string, e.g. "
                                         "'python eval.py --every 60'")
    return words


def key_value(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|min|sec|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds from "90", "1.5", "30s", "10min", "2h", "1h30m"; must be > 0."""
    return _duration(text, allow_zero=False)


def delay(text: str) -> float:
    """A duration like `duration`, where 0 is allowed."""
    return _duration(text, allow_zero=True)


def _duration(text: str, allow_zero: bool) -> float:
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
    if not stripped or pos != len(stripped) or total < 0 or (total == 0 and not allow_zero):
        examples = "0, 500ms, 2s or 1min" if allow_zero else "90, 30s, 10min, 2h or 1h30m"
        raise argparse.ArgumentTypeError(f"expected a duration such as {examples}, got {text!r}")
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
    _add_gpus(verbs)
    return parser


def _verb(verbs: Any, name: str, help: str, epilog: str, usage: str | None = None) -> argparse.ArgumentParser:
    return verbs.add_parser(name, help=help, description=help, epilog=epilog, usage=usage,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_submit(verbs: Any) -> None:
    sub = _verb(verbs, "submit", "submit a command as a new job", _SUBMIT_EPILOG,
                usage=f"{PROG} submit [-h] [--name NAME] [--cwd DIR] [--env NAME=VALUE]... "
                      "[--property P=V]... [--timeout DURATION] [--background] [--max-runs N] "
                      "[--restart-delay DURATION] [--stop-on-failure] [--bind-to ID] "
                      "[--with-background 'CMD [ARG...]'] [--wait] [--json] -- CMD [ARG...]")
    sub.add_argument("--name", default="", help="a name to recognise the job by")
    sub.add_argument("--cwd", metavar="DIR", help="working directory (default: the current one)")
    sub.add_argument("--env", action="append", type=key_value, default=[], metavar="NAME=VALUE",
                     help="set an environment variable for the job (repeatable; the job gets only "
                          "these, plus LANG)")
    sub.add_argument("--property", action="append", type=key_value, default=[], metavar="P=V",
                     help="a resource property of the job's scope, as the daemon allows (repeatable)")
    sub.add_argument("--timeout", type=duration, metavar="DURATION",
                     help="stop the job after this long (90, 30s, 10min, 2h, 1h30m)")
    loop = sub.add_argument_group("background loops")
    loop.add_argument("--background", action="store_true",
                      help="run the command again each time it ends, up to --max-runs times")
    loop.add_argument("--max-runs", type=positive_int, metavar="N",
                      help="at most N runs of a background loop (default: the server's)")
    loop.add_argument("--restart-delay", type=delay, metavar="DURATION",
                      help="pause between two runs of a background loop (default: the server's)")
    loop.add_argument("--stop-on-failure", action="store_true",
                      help="end a background loop after its first failed run")
    loop.add_argument("--bind-to", type=job_id, metavar="ID",
                      help="stop this job when job ID (a running job of yours) ends")
    loop.add_argument("--with-background", type=command_string, metavar="'CMD [ARG...]'",
                      help="also start this command (one quoted string) as a background loop bound to "
                           "the job; prints both ids, \"FOREGROUND BACKGROUND\"")
    sub.add_argument("--gpu-check", choices=api.GPU_CHECKS,
                     help="when a stray process holds one of the job's GPUs: start anyway (off), refuse "
                          "(refuse) or wait queued (wait); default: the server's gpu.prestart_check")
    sub.add_argument("--wait", action="store_true",
                     help="follow the job's log until it ends, and exit with its exit code")
    sub.add_argument("--json", action="store_true", help="print the job as JSON instead of its id")
    sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                     help="the command to run")
    sub.set_defaults(handler=cmd_submit, check=_check_submit(sub))


def _check_submit(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Combinations of submit options that cannot work: usage errors, before any call."""

    def check(args: argparse.Namespace) -> None:
        loop_options = [flag for flag, given in (("--max-runs", args.max_runs is not None),
                                                 ("--restart-delay", args.restart_delay is not None),
                                                 ("--stop-on-failure", args.stop_on_failure)) if given]
        if args.with_background is not None:
            clashing = [flag for flag, given in (("--background", args.background),
                                                 ("--bind-to", args.bind_to is not None)) if given]
            if clashing:
                parser.error(f"{' and '.join(clashing)} cannot be combined with --with-background (its "
                             "loop is bound to the job after `--`)")
        elif loop_options and not args.background:
            parser.error(f"{', '.join(loop_options)} only apply to background loops: add --background "
                         "or --with-background")

    return check


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


def _add_gpus(verbs: Any) -> None:
    sub = _verb(verbs, "gpus", "show the GPUs, the processes on them and who owns each (job, unit, STRAY)",
                "Stray processes hold GPU memory outside every job; see gpujobd's docs/gpu.md.")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.set_defaults(handler=cmd_gpus)


def cmd_gpus(args: argparse.Namespace, client: Any) -> int:
    from gpujobd.cli.gpus import format_gpus

    report = client.gpus(raw=True)
    if args.json:
        print_json(api.gpu_report_to_json(report))
    else:
        for line in format_gpus(report):
            print(line)
    return errors.EXIT_OK


def _warn_of_strays(client: Any) -> None:
    """`status` mentions stray GPU processes (on stderr); a daemon that cannot tell says nothing."""
    from gpujobd.cli.gpus import stray_warning

    gpus = getattr(client, "gpus", None)
    if gpus is None:
        return
    try:
        warning = stray_warning(gpus(raw=True))
    except errors.GpujobdError:
        return
    if warning:
        print_error(warning)


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

exit codes:
""" + "\n".join(f"  {code:<3}  {meaning}" for code, meaning in errors.EXIT_CODES) + """
`submit --wait` and `wait` exit with the job's own code once it ended (128+N for signal N); their errors
still exit as above, so read stderr (or --json) to tell a job's code 3 from "no such job".
`gpujobctl VERB -h` explains each verb."""

_SUBMIT_EPILOG = """\
examples:
  gpujobctl submit -- python train.py --lr 0.1         # prints the job id
  id=$(gpujobctl submit --name sweep-3 -- ./run.sh 3)
  gpujobctl submit --env CUDA_VISIBLE_DEVICES=0 --timeout 2h -- python train.py
  gpujobctl submit --wait -- make test                 # log to stdout, exit with the job's code
  gpujobctl submit --json -- sleep 60 | jq .unit
  gpujobctl submit --background --max-runs 5 --restart-delay 30s -- python eval.py
  gpujobctl submit --background --bind-to 42 -- ./watch_gpu.sh   # stopped when job 42 ends
  gpujobctl submit --name exp1 --with-background 'python eval.py --latest' -- python train.py
      # prints "FOREGROUND BACKGROUND": the eval loop runs until train.py ends

Put the command after `--`. The job's environment is what --env gives, plus your LANG.
A background loop runs its command again after each run ends (GPUJOB_RUN says which run), up to
--max-runs times; --max-runs, --restart-delay and --stop-on-failure need --background (or, with
--with-background, apply to that loop). With --with-background, --timeout applies to the foreground
job; --name NAME names the loop NAME-bg; if the loop cannot be submitted, the foreground job is
stopped again.
With --wait, a job killed by signal N exits 128+N and one that failed without an exit code exits 1;
with --with-background it follows and waits for the foreground job (systemd stops the loop when it
ends). Ctrl-C stops following but leaves the job running."""

_STOP_EPILOG = """\
examples:
  gpujobctl stop 42
  gpujobctl stop 42 43 44

Every id is tried; exits with the code of the first that could not be stopped (3 no such job,
4 not yours, ...)."""

_STATUS_EPILOG = """\
examples:
  gpujobctl status 42
  gpujobctl status 42 --json | jq -r .state
  gpujobctl status 43 --json | jq '.last_runs[] | [.run, .exit_code]'

For a background loop it shows `Runs: 3 of 5` and its last 5 runs (number, duration, how each
ended); with --json, the job object gets a `last_runs` array. A job with a timeout shows how much of
it was used, `Timeout: 1min 0s (reached 97%)`."""

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
(signal N gives 128+N, a failure without an exit code gives 1); an id that cannot be waited for counts
with its error's code (3 no such job, 4 not yours; `gpujobctl -h` lists them), a timeout with 1."""


# --- verbs -------------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, client: Any) -> int:
    command = submitted_command(args.command)
    common = {"cwd": args.cwd, "env": dict(args.env), "name": args.name,
              "properties": dict(args.property), "timeout_s": args.timeout}
    if args.with_background is not None:
        return _submit_pair(args, client, command, common)
    gpu_check = {"gpu_check": args.gpu_check} if getattr(args, "gpu_check", None) else {}
    job = client.submit(command, **common, **_loop_options(args), **gpu_check, raw=True)
    if not args.wait:
        if args.json:
            print_json(api.job_to_json(job))
        else:
            print(job["id"])
        return errors.EXIT_OK
    final = _follow_to_the_end(
        client, job, args.json, f"job {job['id']} keeps running; `{PROG} stop {job['id']}` stops it")
    if final is None:
        return EXIT_INTERRUPTED
    if args.json:
        print_json(api.job_to_json(final))
    return exit_code_for(final)


def _loop_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The background-loop options that were given (only those are sent)."""
    options: Dict[str, Any] = {}
    if args.background:
        options["background"] = True
    if args.max_runs is not None:
        options["max_runs"] = args.max_runs
    if args.restart_delay is not None:
        options["restart_delay_s"] = args.restart_delay
    if args.stop_on_failure:
        options["stop_on_failure"] = True
    if args.bind_to is not None:
        options["bind_to"] = args.bind_to
    return options


def _submit_pair(args: argparse.Namespace, client: Any, command: List[str], common: Dict[str, Any]) -> int:
    """submit --with-background: the job after `--` and a loop bound to it, in one call."""
    loop = {key: value for key, value in _loop_options(args).items()
            if key in ("max_runs", "restart_delay_s", "stop_on_failure")}
    foreground, background = client.submit_with_background(
        command, args.with_background, **common, **loop, raw=True)
    if not args.wait:
        if args.json:
            print_json({"foreground": api.job_to_json(foreground),
                        "background": api.job_to_json(background)})
        else:
            print(f"{foreground['id']} {background['id']}")
        return errors.EXIT_OK
    final = _follow_to_the_end(
        client, foreground, args.json,
        f"jobs {foreground['id']} and {background['id']} keep running; `{PROG} stop {foreground['id']}` "
        "stops both")
    if final is None:
        return EXIT_INTERRUPTED
    if args.json:
        print_json({"foreground": api.job_to_json(final),
                    "background": api.job_to_json(client.get(background["id"], raw=True))})
    return exit_code_for(final)


def _follow_to_the_end(client: Any, job: Job, quiet: bool, still_running: str) -> Job | None:
    """Follow the job's log (unless quiet) and wait for its end; None after Ctrl-C, which says
    `still_running` on stderr."""
    try:
        if not quiet:
            write_chunks(client.logs(job["id"], follow=True))
        return client.wait(job["id"], raw=True)
    except KeyboardInterrupt:
        print_error(f"interrupted: {still_running}")
        return None


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
    first_error = errors.EXIT_OK
    for one_id in args.ids:
        try:
            print(f"job {one_id}: {_stop_one(client, one_id)}")
        except errors.Unavailable:
            raise  # the next ids would fail the same way
        except errors.GpujobdError as error:
            print_error(f"job {one_id}: {error}")
            first_error = first_error or error.exit_code
    return first_error


def _stop_one(client: Any, one_id: int) -> str:
    result = client.stop(one_id)
    if result == api.STOP_STOPPING:
        return "stopping"
    if result == api.STOP_ALREADY_ENDED:
        return f"already ended ({client.get(one_id, raw=True)['state']})"
    return result


def cmd_status(args: argparse.Namespace, client: Any) -> int:
    job = client.get(args.id, raw=True)
    runs = client.runs(args.id, STATUS_RUNS, raw=True) if job.get("background") else None
    _warn_of_strays(client)
    if args.json:
        shown = api.job_to_json(job)
        if runs is not None:
            shown["last_runs"] = [api.run_to_json(run) for run in runs]
        print_json(shown)
        return errors.EXIT_OK
    processes = read_processes(job.get("unit", ""), job.get("pid"))
    for line in format_status(job, time.time(), processes, runs):
        print(line)
    from gpujobd.cli.gpus import gpu_memory_line

    if gpu_memory_line(job):
        print(gpu_memory_line(job))
    tail = log_tail(client, job, STATUS_LOG_LINES)
    if tail:
        print()
        for line in tail:
            print(line)
    return errors.EXIT_OK


def cmd_list(args: argparse.Namespace, client: Any) -> int:
    """Prints page by page: the daemon is asked for the next page only when this one is out."""
    if args.limit is None:
        pages = client.pages(all=args.all, user=args.user, state=args.state, raw=True)
    else:
        pages = iter([client.list(all=args.all, user=args.user, state=args.state, limit=args.limit,
                                  raw=True)])
    printed = _print_json_pages(pages) if args.json else _print_table_pages(pages)
    if not printed and not args.json:
        hint = "" if args.all else " (add --all to include jobs that ended more than an hour ago)"
        print(f"no jobs{hint}", file=sys.stderr)
    return errors.EXIT_OK


def _print_json_pages(pages: Iterable[List[Job]]) -> int:
    count = 0
    sys.stdout.write("[")
    for page in pages:
        for job in page:
            sys.stdout.write(("," if count else "") + "\n  " + json.dumps(api.job_to_json(job)))
            count += 1
        sys.stdout.flush()
    sys.stdout.write("\n]\n" if count else "]\n")
    return count


def _print_table_pages(pages: Iterable[List[Job]]) -> int:
    width = _terminal_width() if sys.stdout.isatty() else None
    count = 0
    for page in pages:
        lines = format_table(page, time.time(), width)
        for line in lines if not count else lines[1:]:  # the header once
            print(line)
        count += len(page)
        sys.stdout.flush()
    return count


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
        return error.exit_code
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


# --- processes ---------------------------------------------------------------------------------------


def read_processes(unit: str, supervisor_pid: int | None = None) -> List[Tuple[int, str]]:
    """(pid, command line) of every process in the job's cgroup; [] if it cannot be read."""
    if not unit or "/" in unit or unit.startswith("."):
        return []
    pids: Set[int] = set()
    for directory, _subdirs, _files in os.walk(_scope_dir(unit, supervisor_pid)):
        try:
            with open(os.path.join(directory, "cgroup.procs")) as procs:
                pids.update(int(line) for line in procs if line.strip().isdigit())
        except OSError:
            continue
    found = ((pid, _cmdline(pid)) for pid in sorted(pids))
    return [(pid, cmdline) for pid, cmdline in found if cmdline is not None]


def _scope_dir(unit: str, supervisor_pid: int | None) -> str:
    """The job's cgroup directory: from its supervisor's /proc/PID/cgroup (any slice the daemon is
    configured with), else under the default gpujob.slice."""
    if supervisor_pid:
        try:
            with open(os.path.join(PROC_DIR, str(supervisor_pid), "cgroup")) as source:
                for line in source:
                    path = line.rstrip("\n").partition("::")[2]  # the cgroup v2 line: "0::/a.slice/b.scope"
                    if path.endswith("/" + unit) and ".." not in path:
                        return CGROUP_ROOT + path
        except OSError:
            pass
    return os.path.join(CGROUP_SLICE_DIR, unit)


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
