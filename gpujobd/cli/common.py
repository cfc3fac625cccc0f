"""What every verb of gpujobctl shares: adding its parser, typed arguments, errors, JSON, raw output
and the exit code a job gives."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from typing import Any, Callable, Dict, Iterable, Mapping

from gpujobd.shared import errors
from gpujobd.shared.states import JobState

PROG = "gpujobctl"
EXIT_INTERRUPTED = errors.EXIT_INTERRUPTED

Job = Dict[str, Any]  # a job as the client returns it with raw=True (the wire dict)


def add_verb(verbs: Any, name: str, help: str, epilog: str,
             usage: str | None = None) -> argparse.ArgumentParser:
    """A verb's subparser, its help shown with the examples of `epilog` as written."""
    return verbs.add_parser(name, help=help, description=help, epilog=epilog, usage=usage,
                            formatter_class=argparse.RawDescriptionHelpFormatter)


def typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a parser of gpujobd.shared.text: its ValueError becomes the usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__
    return convert


def print_error(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()  # what was printed before comes first when both go to one place
    print(f"{PROG}: {' '.join(message.splitlines())}", file=sys.stderr)


def about_job(job_id: int, message: str) -> str:
    """A message prefixed with "job N: " unless it already names job N ("there is no job 999", not
    "job 999: there is no job 999")."""
    return message if re.search(rf"\bjob {job_id}\b", message) else f"job {job_id}: {message}"


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def write_chunks(chunks: Iterable[bytes]) -> None:
    """Raw bytes to stdout, flushed as they come (a followed log shows up at once)."""
    sys.stdout.flush()
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


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
