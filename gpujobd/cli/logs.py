"""gpujobctl logs: print a job's log, or its last N lines, or follow it until the job ends."""

from __future__ import annotations

import argparse
import os
from typing import Any, Iterator, Tuple

from gpujobd.cli import common
from gpujobd.cli.render import TAIL_WINDOW_BYTES, last_lines
from gpujobd.shared import errors, text

_EPILOG = """\
examples:
  gpujobctl logs 42
  gpujobctl logs -n 20 42
  gpujobctl logs -f 42
  gpujobctl logs -f -n 0 42      (only what comes from now on)"""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "logs", "print a job's log (its stdout and stderr)", _EPILOG)
    sub.add_argument("id", type=common.typed(text.job_id), metavar="ID")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    sub.add_argument("-n", "--lines", type=common.typed(text.line_count), metavar="N",
                     help="only the last N lines (with -f: then follow from there)")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
    if args.lines is None:
        common.write_chunks(client.logs(args.id, follow=args.follow))
        return errors.EXIT_OK
    tail, offset = last_lines_and_end(client, args.id, args.lines)
    common.write_chunks(_then(tail, client.logs(args.id, follow=True, offset=offset) if args.follow
                              else iter(())))
    return errors.EXIT_OK


def _then(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def last_lines_and_end(client: Any, job_id: int, count: int) -> Tuple[bytes, int]:
    """The last `count` lines of the log as it is now, and the offset where they end (where a
    follow goes on: nothing is shown twice or skipped). Reads from near the end when the log file
    can be stat'ed here and that window holds the lines, else from the start."""
    start = _window_start(client.get(job_id, raw=True).get("log_path"), count)
    kept, offset, complete = _read_tail(client, job_id, start, count)
    if start > 0 and not complete:
        kept, offset, _ = _read_tail(client, job_id, 0, count)
    return kept, offset


def _read_tail(client: Any, job_id: int, start: int, count: int) -> Tuple[bytes, int, bool]:
    kept, offset, lines_seen = b"", start, 0
    while True:
        data, offset, _ended = client.read_log(job_id, offset)
        if not data:
            break
        lines_seen += data.count(b"\n")
        kept = last_lines(kept + data, count + 1)  # one more: the window's first line may be partial
    complete = start == 0 or lines_seen > count
    return (last_lines(kept, count) if count else b""), offset, complete


def _window_start(log_path: str | None, count: int) -> int:
    if not log_path:
        return 0
    try:
        size = os.stat(log_path).st_size
    except OSError:
        return 0
    return max(0, size - max(TAIL_WINDOW_BYTES, 256 * count))
