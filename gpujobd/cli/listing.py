"""gpujobctl list: the jobs as a table or a JSON array, printed page by page."""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import sys
import time
from typing import Any, Iterable, List

from gpujobd.cli import common
from gpujobd.cli.common import Job
from gpujobd.cli.render import format_table
from gpujobd.shared import api, errors, text
from gpujobd.shared.states import JobState

_EPILOG = """\
examples:
  gpujobctl list
  gpujobctl list --me --limit 5
  gpujobctl list --all --user alice
  gpujobctl list --state running --json | jq '.[].id'"""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "list", "list jobs (active ones and those ended in the last hour)", _EPILOG)
    sub.add_argument("--all", action="store_true", help="include every ended job")
    who = sub.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="NAME", help="only this user's jobs")
    who.add_argument("--me", action="store_true", help="only your own jobs")
    sub.add_argument("--state", choices=[state.value for state in JobState], help="only jobs in this state")
    sub.add_argument("--limit", type=common.typed(text.count), metavar="N",
                     help="the newest N jobs, newest first")
    sub.add_argument("--json", action="store_true", help="print a JSON array")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
    """Prints page by page (oldest first): the daemon is asked for the next page only when this one
    is out. With --limit, the newest N, newest first."""
    user = _own_name() if args.me else args.user
    if args.limit is None:
        pages = client.pages(all=args.all, user=user, state=args.state, raw=True)
    else:
        newest = client.list(all=args.all, user=user, state=args.state, limit=args.limit, raw=True)
        pages = iter([list(reversed(newest))])
    printed = _print_json_pages(pages) if args.json else _print_table_pages(pages)
    if not printed and not args.json:
        hint = "" if args.all else " (add --all to include jobs that ended more than an hour ago)"
        print(f"no jobs{hint}", file=sys.stderr)
    return errors.EXIT_OK


def _own_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise errors.NotFound(f"your uid {os.getuid()} has no user name: give --user NAME") from None


def use_colour() -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


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
    colour = use_colour()
    count = 0
    for page in pages:
        lines = format_table(page, time.time(), width, colour)
        for line in lines if not count else lines[1:]:  # the header once
            print(line)
        count += len(page)
        sys.stdout.flush()
    return count
