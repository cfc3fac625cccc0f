"""gpujobctl status: a job's state, its processes (read from its cgroup) and the end of its log."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, List, Set, Tuple

from gpujobd.cli import common
from gpujobd.cli.render import command_text, format_status, log_tail, printable
from gpujobd.shared import api, errors, text

STATUS_LOG_LINES = 10
STATUS_RUNS = 5  # status shows this many of a background loop's last runs
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_SLICE_DIR = CGROUP_ROOT + "/gpujob.slice"  # where a job's scope is when its cgroup is not known
PROC_DIR = "/proc"

_EPILOG = """\
examples:
  gpujobctl status 42
  gpujobctl status 42 --json | jq -r .state
  gpujobctl status 43 --json | jq '.last_runs[] | [.run, .exit_code]'

For a background loop it shows `Runs: 3 of 5` and its last 5 runs (number, duration, how each
ended); with --json, the job object gets a `last_runs` array. A job with a timeout shows how much of
it was used, `Timeout: 1min 0s (reached 97%)`."""


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "status", "show a job's state, processes and the end of its log", _EPILOG)
    sub.add_argument("id", type=common.typed(text.job_id), metavar="ID")
    sub.add_argument("--json", action="store_true", help="print the job as JSON")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, client: Any) -> int:
    job = client.get(args.id, raw=True)
    runs = client.runs(args.id, STATUS_RUNS, raw=True) if job.get("background") else None
    _warn_of_strays(client)
    if args.json:
        shown = api.job_to_json(job)
        if runs is not None:
            shown["last_runs"] = [api.run_to_json(run) for run in runs]
        common.print_json(shown)
        return errors.EXIT_OK
    processes = read_processes(job.get("unit", ""), job.get("pid"))
    for line in format_status(job, time.time(), processes, runs):
        print(line)
    from gpujobd.cli.gpus import gpu_memory_line

    if gpu_memory_line(job):
        print(gpu_memory_line(job))
    tail = log_tail(client, job, STATUS_LOG_LINES)
    if tail:
        print()
        for line in tail:
            print(line)
    return errors.EXIT_OK


def _warn_of_strays(client: Any) -> None:
    """`status` mentions stray GPU processes (on stderr); a daemon that cannot tell says nothing."""
    from gpujobd.cli.gpus import stray_warning

    gpus = getattr(client, "gpus", None)
    if gpus is None:
        return
    try:
        warning = stray_warning(gpus(raw=True))
    except errors.GpujobdError:
        return
    if warning:
        common.print_error(warning)


def read_processes(unit: str, supervisor_pid: int | None = None) -> List[Tuple[int, str]]:
    """(pid, command line) of every process in the job's cgroup; [] if it cannot be read."""
    if not unit or "/" in unit or unit.startswith("."):
        return []
    pids: Set[int] = set()
    for directory, _subdirs, _files in os.walk(_scope_dir(unit, supervisor_pid)):
        try:
            with open(os.path.join(directory, "cgroup.procs")) as procs:
                pids.update(int(line) for line in procs if line.strip().isdigit())
        except OSError:
            continue
    found = ((pid, _cmdline(pid)) for pid in sorted(pids))
    return [(pid, cmdline) for pid, cmdline in found if cmdline is not None]


def _scope_dir(unit: str, supervisor_pid: int | None) -> str:
    """The job's cgroup directory: from its supervisor's /proc/PID/cgroup (any slice the daemon is
    configured with), else under the default gpujob.slice."""
    if supervisor_pid:
        try:
            with open(os.path.join(PROC_DIR, str(supervisor_pid), "cgroup")) as source:
                for line in source:
                    path = line.rstrip("\n").partition("::")[2]  # the cgroup v2 line: "0::/a.slice/b.scope"
                    if path.endswith("/" + unit) and ".." not in path:
                        return CGROUP_ROOT + path
        except OSError:
            pass
    return os.path.join(CGROUP_SLICE_DIR, unit)


def _cmdline(pid: int) -> str | None:
    try:
        with open(os.path.join(PROC_DIR, str(pid), "cmdline"), "rb") as source:
            raw = source.read()
        if raw:
            words = raw.rstrip(b"\0").split(b"\0")
            return command_text(word.decode("utf-8", "replace") for word in words)
        with open(os.path.join(PROC_DIR, str(pid), "comm"), "rb") as source:
            return f"[{printable(source.read().decode('utf-8', 'replace').strip())}]"
    except OSError:
        return None  # gone meanwhile, or not ours to read
