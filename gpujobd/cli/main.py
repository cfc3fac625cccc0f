"""gpujobctl: submit, inspect, follow and stop gpujobd jobs from a shell.

The entry point: the parser assembled from one module per verb (submit, stop, status, listing,
logs, wait, gpus, queue, prune, completion: each adds its parser and has handlers), and errors turned
into exit codes. What is shown is formatted by gpujobd.cli.render.

Exit codes: one per error kind, from gpujobd.shared.errors (EXIT_CODES); `submit --wait` and `wait`
exit with the job's own code once it ended (a signal N gives 128+N, a failure without an exit code
gives 1). Errors are one line on stderr, `gpujobctl: <what was wrong>`, never a traceback. The D-Bus
client is imported only when a verb runs, so `-h` and usage errors answer fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import re
import sys
from types import ModuleType
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from gpujobd import __version__
from gpujobd.cli.common import EXIT_INTERRUPTED, PROG, print_error
from gpujobd.shared import errors

DEBUG_ENV = "GPUJOBCTL_DEBUG"  # set to show a traceback for an unexpected error
# Each verb's module (it has add_parser(verbs)), imported only when that verb runs: `gpujobctl submit`
# never imports the GPU table, the list renderer or what status shows. Help and usage errors import all.
VERB_MODULES = {"submit": "submit", "stop": "stop", "status": "status", "list": "listing", "logs": "logs",
                "wait": "wait", "gpus": "gpus", "resubmit": "queue", "drain": "queue", "undrain": "queue",
                "prune": "prune", "completion": "completion"}

ClientFactory = Callable[[], Any]


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory | None = None) -> int:
    """Run gpujobctl with argv (default sys.argv[1:]) and return its exit code.

    `client_factory` makes the client a verb talks to (default: `default_client_factory`); tests pass
    one that returns a fake.
    """
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser(verb_of(argv)).parse_args(argv)
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


def run() -> int:
    """The `gpujobctl` command: `main` on sys.argv; its exit code.

    What gpujobctl built stays alive until the process exits, so it is first moved out of the
    cyclic collector's reach (`gc.freeze`): the interpreter's last full collection walked every one
    of those objects, 7 ms of a 53 ms `gpujobctl submit` (measured in the sandbox). The rest of the
    shutdown (atexit, flushing, closing) runs as ever."""
    code = main()
    gc.freeze()
    return code


def default_client_factory() -> Any:
    """A gpujobd.client.Client with the timeouts of the client section of gpujobd's configuration."""
    from gpujobd.client import Client

    return Client(**_client_settings())


def _client_settings() -> Dict[str, float]:
    """The [client] table of gpujobd's configuration, checked as the daemon checks the whole file. A
    file without client settings (the shipped one has none set) costs only its TOML read: the
    definitions of every section are imported only to check settings that are there."""
    try:
        from gpujobd.shared.config_file import read_config_files, resolve_config_path
    except ModuleNotFoundError as error:
        if error.name != "gpujobd.shared.config_file":
            raise
        return {}
    try:
        path, explicit = resolve_config_path(None)
        data, source = read_config_files(path, explicit)
        if not data or not data.get("client"):
            return {}
        from gpujobd.shared.config_toml import config_from_mapping

        settings = config_from_mapping(data, source=source).client
    except (errors.ConfigError, OSError) as error:
        print_error(f"warning: cannot read gpujobd's configuration ({error}); using the default client "
                    "settings")
        return {}
    return {"call_timeout_s": settings.call_timeout_s,
            "follow_poll_interval_s": settings.follow_poll_interval_s,
            "restart_grace_s": settings.restart_grace_s,
            "wait_resync_interval_s": settings.wait_resync_interval_s}


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
    import difflib  # only on this error path

    typed, verbs = found.group(1), [verb.strip(" '") for verb in found.group(2).split(",")]
    guess = _OTHER_TOOLS_VERBS.get(typed) or next(iter(difflib.get_close_matches(typed, verbs, n=1)), None)
    hint = f": did you mean `{guess}`?" if guess else ""
    return f"unknown verb {typed!r}{hint} (verbs: {', '.join(verbs)})"


def verb_of(argv: Sequence[str]) -> Optional[str]:
    """The verb argv names, if it starts with one; None for -h, --version and anything else."""
    return argv[0] if argv and argv[0] in VERB_MODULES else None


def verb_modules(verb: Optional[str] = None) -> List[ModuleType]:
    names = [VERB_MODULES[verb]] if verb is not None else list(dict.fromkeys(VERB_MODULES.values()))
    return [importlib.import_module(f"gpujobd.cli.{name}") for name in names]


def build_parser(verb: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every verb, or of `verb` only (what parsing that verb's command line needs)."""
    parser = _Parser(
        prog=PROG,
        description="Run and inspect jobs on this GPU server. Every job runs in its own systemd scope, "
                    "gpujob-<id>.scope, managed by the gpujobd daemon.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=_Parser)
    for module in verb_modules(verb):
        module.add_parser(verbs)
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
    sys.exit(run())
