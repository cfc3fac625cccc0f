"""gpujobctl resubmit, drain and undrain: the queue's verbs."""

from __future__ import annotations

import argparse
from typing import Any

from gpujobd.cli import common
from gpujobd.shared import api, errors, text

_RESUBMIT_EPILOG = """\
examples:
  gpujobctl resubmit 42                     # the same spec as a new job; prints its id
  gpujobctl resubmit --with-dependents 41   # 41 and the jobs after it that did not succeed

With --with-dependents, the jobs that depended on it (--after, --after-any) and ended without
succeeding come back too, wired to the new ids; dependencies that succeeded count as met, so a
pipeline resumes without running its finished stages again. Prints the new ids, one per line."""

_DRAIN_EPILOG = """\
examples:
  gpujobctl drain      # before maintenance: running jobs go on, nothing new starts
  gpujobctl undrain

Admins only (root or the admin group). Queued jobs wait, saying so, and submits are still taken."""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "resubmit", "submit an ended job again (and its failed dependents)",
                          _RESUBMIT_EPILOG)
    sub.add_argument("id", type=common.typed(text.job_id), metavar="ID")
    sub.add_argument("--with-dependents", action="store_true",
                     help="also the jobs that depended on it and did not succeed")
    sub.add_argument("--json", action="store_true", help="print the new jobs as a JSON array")
    sub.set_defaults(handler=resubmit)
    drain = common.add_verb(verbs, "drain", "start no new job (admins; for maintenance)", _DRAIN_EPILOG)
    drain.set_defaults(handler=lambda args, client: _drain(client, True))
    undrain = common.add_verb(verbs, "undrain", "start jobs again after a drain (admins)", _DRAIN_EPILOG)
    undrain.set_defaults(handler=lambda args, client: _drain(client, False))


def resubmit(args: argparse.Namespace, client: Any) -> int:
    jobs = client.resubmit(args.id, with_dependents=args.with_dependents, raw=True)
    if args.json:
        common.print_json([api.job_to_json(job) for job in jobs])
    else:
        for job in jobs:
            print(job["id"])
    return errors.EXIT_OK


def _drain(client: Any, draining: bool) -> int:
    if draining:
        client.drain()
        print("drained: no new job starts until `gpujobctl undrain`")
    else:
        client.undrain()
        print("undrained: queued jobs start as resources allow")
    return errors.EXIT_OK
