"""gpujobctl: submit, inspect, follow and stop gpujobd jobs from a shell.

The entry point: the parser assembled from one module per verb (submit, stop, status, listing, logs,
wait, gpus: each adds its parser and has one handler), and errors turned into exit codes. What is
shown is formatted by gpujobd.cli.render.

Exit codes: one per error kind, from gpujobd.shared.errors (EXIT_CODES); `submit --wait` and `wait`
exit with the job's own code once it ended (a signal N gives 128+N, a failure without an exit code
gives 1). Errors are one line on stderr, `gpujobctl: <what was wrong>`, never a traceback. The D-Bus
client is imported only when a verb runs, so `-h` and usage errors answer fast.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Any, Callable, Dict, NoReturn, Sequence

from gpujobd import __version__
from gpujobd.cli import completion, gpus, listing, logs, prune, queue, status, stop, submit, wait
from gpujobd.cli.common import EXIT_INTERRUPTED, PROG, print_error
from gpujobd.shared import errors

DEBUG_ENV = "GPUJOBCTL_DEBUG"  # set to show a traceback for an unexpected error
# Each has add_parser(verbs).
VERBS = (submit, stop, status, listing, logs, wait, gpus, queue, prune, completion)

ClientFactory = Callable[[], Any]


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
        return errors.EXIT_BROKEN_PIPE
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
        if error.name != "gpujobd.shared.config_toml":
            raise
        return {}
    try:
        settings = load_config().client
    except (errors.ConfigError, OSError) as error:
        print_error(f"warning: cannot read gpujobd's configuration ({error}); using the default client "
                    "settings")
        return {}
    return {"call_timeout_s": settings.call_timeout_s,
            "follow_poll_interval_s": settings.follow_poll_interval_s,
            "restart_grace_s": settings.restart_grace_s}


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `gpujobctl: ...`, and exit 2."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{_unknown_verb(message) or message}; see `{self.prog} -h`")
        raise SystemExit(errors.EXIT_USAGE)


# Verbs of other tools (Slurm, pueue, task-spooler, docker) that users type, and ours for them.
_OTHER_TOOLS_VERBS = {"cancel": "stop", "kill": "stop", "scancel": "stop", "rm": "stop", "remove": "stop",
                      "ls": "list", "ps": "list", "queue": "list", "squeue": "list", "show": "status",
                      "info": "status", "log": "logs", "tail": "logs", "run": "submit", "add": "submit",
                      "sbatch": "submit", "start": "submit"}
_INVALID_VERB = re.compile(r"argument VERB: invalid choice: '([^']*)' \(choose from (.*)\)")


def _unknown_verb(message: str) -> str:
    """argparse's "invalid choice" for a verb, said plainly with a guess from typos and other tools'
    verbs: "unknown verb 'sumbit': did you mean `submit`? (verbs: submit, stop, ...)"; "" otherwise."""
    found = _INVALID_VERB.search(message)
    if found is None:
        return ""
    typed, verbs = found.group(1), [verb.strip(" '") for verb in found.group(2).split(",")]
    guess = _OTHER_TOOLS_VERBS.get(typed) or next(iter(difflib.get_close_matches(typed, verbs, n=1)), None)
    hint = f": did you mean `{guess}`?" if guess else ""
    return f"unknown verb {typed!r}{hint} (verbs: {', '.join(verbs)})"


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
    for verb in VERBS:
        verb.add_parser(verbs)
    return parser


_MAIN_EPILOG = """\
examples:
  gpujobctl submit --name train -- python3 train.py --epochs 10
  gpujobctl list
  gpujobctl logs -f 42
  gpujobctl stop 42

exit codes:
""" + "\n".join(f"  {code:<3}  {meaning}" for code, meaning in errors.EXIT_CODES) + """
`submit --wait` and `wait` exit with the job's own code once it ended (128+N for signal N); their errors
still exit as above, so read stderr (or --json) to tell a job's code 3 from "no such job".
`gpujobctl VERB -h` explains each verb."""


if __name__ == "__main__":
    sys.exit(main())
