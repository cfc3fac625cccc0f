"""gpujobctl stop: stop jobs, each id tried even when one fails."""

from __future__ import annotations

import argparse
from typing import Any

from gpujobd.cli import common
from gpujobd.shared import api, errors, text

_EPILOG = """\
examples:
  gpujobctl stop 42
  gpujobctl stop 42 43 44
  gpujobctl stop 50          # an array's id (its first task's): every task, as with scancel

Every id is tried; exits with the code of the first that could not be stopped (3 no such job,
4 not yours, ...)."""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "stop", "stop jobs", _EPILOG)
    sub.add_argument("ids", nargs="+", type=common.typed(text.job_id), metavar="ID")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
    first_error = errors.EXIT_OK
    for one_id in args.ids:
        try:
            print(f"job {one_id}: {_stop_one(client, one_id)}")
        except errors.Unavailable:
            raise  # the next ids would fail the same way
        except errors.GpujobdError as error:
            common.print_error(common.about_job(one_id, str(error)))
            first_error = first_error or error.exit_code
    return first_error


def _stop_one(client: Any, one_id: int) -> str:
    result = client.stop(one_id)
    if result == api.STOP_STOPPING:
        return "stopping"
    if result == api.STOP_ALREADY_ENDED:
        return f"already ended ({client.get(one_id, raw=True)['state']})"
    return result
