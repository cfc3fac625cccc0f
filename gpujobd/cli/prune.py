"""gpujobctl prune: delete the history of ended jobs (admins)."""

from __future__ import annotations

import argparse
from typing import Any

from gpujobd.cli import common

_EPILOG = """\
examples:
  gpujobctl prune --older-than 30     delete jobs that ended more than 30 days ago, and their logs

Only root and members of the admin group may prune. Jobs that have not ended are never pruned.
The daemon prunes by itself when retention.keep_days is set (docs/configuration.md)."""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "prune", "delete ended jobs and their logs (admins)", _EPILOG)
    sub.add_argument("--older-than", dest="days", required=True, type=common.typed(_days), metavar="DAYS",
                     help="prune jobs that ended more than DAYS days ago (0: every ended job)")
    sub.set_defaults(handler=run)


def _days(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"expected a whole number of days, not {value!r}")
    return int(value)


def run(args: argparse.Namespace, client: Any) -> int:
    print(f"pruned {client.prune(args.days)} jobs")
    return 0


