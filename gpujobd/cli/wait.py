"""gpujobctl wait: wait until jobs end; exit with the code of the first that failed."""

from __future__ import annotations

import argparse
import time
from typing import Any, List

from gpujobd.cli import common
from gpujobd.cli.common import Job
from gpujobd.cli.render import describe_end
from gpujobd.shared import api, errors, text

_EPILOG = """\
examples:
  gpujobctl wait 42
  gpujobctl wait 42 43 44 && echo all succeeded
  gpujobctl wait --timeout 1h 42
  gpujobctl wait 50          # an array's id (its first task's): every task

Exits 0 if every job succeeded, else with the code of the first failed job in argument order
(signal N gives 128+N, a failure without an exit code gives 1); an id that cannot be waited for counts
with its error's code (3 no such job, 4 not yours; `gpujobctl -h` lists them), a timeout with 1."""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "wait", "wait until jobs end; exit with the code of the first that failed",
                          _EPILOG)
    sub.add_argument("ids", nargs="+", type=common.typed(text.job_id), metavar="ID")
    sub.add_argument("--timeout", type=common.typed(text.duration), metavar="DURATION",
                     help="give up after this long in all (exit 1)")
    sub.add_argument("--json", action="store_true", help="print the ended jobs as a JSON array")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    first_failure = None
    ended: List[Job] = []
    for one_id in _expanded(client, args.ids):
        code = _wait_one(client, one_id, deadline, ended, quiet=args.json)
        if first_failure is None and code != errors.EXIT_OK:
            first_failure = code
    if args.json:
        common.print_json([api.job_to_json(job) for job in ended])
    return errors.EXIT_OK if first_failure is None else first_failure


def _expanded(client: Any, ids: List[int]) -> List[int]:
    """Each id, an array's id as its tasks' ids; an id that cannot be read stays (its error shows)."""
    out: List[int] = []
    for one_id in ids:
        try:
            out += [int(task["id"]) for task in client.tasks(one_id, raw=True)]
        except errors.Unavailable:
            raise
        except errors.GpujobdError:
            out.append(one_id)
    return out


def _wait_one(client: Any, one_id: int, deadline: float | None, ended: List[Job], quiet: bool) -> int:
    timeout_s = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        job = client.wait(one_id, timeout_s=timeout_s, raw=True)
    except errors.Unavailable:
        raise
    except errors.GpujobdError as error:
        common.print_error(common.about_job(one_id, str(error)))
        return error.exit_code
    ended.append(job)
    if not quiet:
        print(f"job {one_id}: {describe_end(job)}")
    return common.exit_code_for(job)
