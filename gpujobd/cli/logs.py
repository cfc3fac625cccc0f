"""gpujobctl logs: print a job's log, or follow it until the job ends."""

from __future__ import annotations

import argparse
from typing import Any

from gpujobd.cli import common
from gpujobd.shared import errors, text

_EPILOG = """\
examples:
  gpujobctl logs 42
  gpujobctl logs -f 42
  gpujobctl logs 42 | tail -n 100"""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "logs", "print a job's log (its stdout and stderr)", _EPILOG)
    sub.add_argument("id", type=common.typed(text.job_id), metavar="ID")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
    common.write_chunks(client.logs(args.id, follow=args.follow))
    return errors.EXIT_OK
