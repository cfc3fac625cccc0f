"""gpujobctl list: the jobs as a table or a JSON array, printed page by page."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import Any, Iterable, List

from gpujobd.cli import common
from gpujobd.cli.common import Job
from gpujobd.cli.render import format_table
from gpujobd.shared import api, errors, text
from gpujobd.shared.model import JobState

_EPILOG = """\
examples:
  gpujobctl list
  gpujobctl list --all --user alice
  gpujobctl list --state running --json | jq '.[].id'"""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "list", "list jobs (active ones and those ended in the last hour)", _EPILOG)
    sub.add_argument("--all", action="store_true", help="include every ended job")
    sub.add_argument("--user", help="only this user's jobs")
    sub.add_argument("--state", choices=[state.value for state in JobState], help="only jobs in this state")
    sub.add_argument("--limit", type=common.typed(text.count), metavar="N",
                     help="at most N jobs (newest first)")
    sub.add_argument("--json", action="store_true", help="print a JSON array")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
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
    width = shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else None
    count = 0
    for page in pages:
        lines = format_table(page, time.time(), width)
        for line in lines if not count else lines[1:]:  # the header once
            print(line)
        count += len(page)
        sys.stdout.flush()
    return count
