"""Timing commands the way a user feels them: from just before fork to the child's exit.

No shell and no runuser/PAM in between: a command "as the user" is forked by this process and
changes to the user's ids before exec (subprocess's user=/group=), so every peer pays the same
process-start cost. The child is reaped with wait4, which also gives its CPU time.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks.stats import Dist, check
from benchmarks.testbed import User


@dataclass
class Ran:
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float  # user + system CPU time of the child and its waited-for descendants


def run_timed(argv: Sequence[str], user: Optional[User] = None, ok: Sequence[int] = (0,)) -> Ran:
    """Run argv (as `user`, or as root from /), wait for it, and time it."""
    kw: Any = user.popen_kw() if user is not None else {"cwd": "/"}
    with tempfile.TemporaryFile() as err_file:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err_file, **kw)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    ran = Ran(seconds, proc.returncode, out.decode(errors="replace"), err, usage.ru_utime + usage.ru_stime)
    check(ran.returncode in ok, f"{' '.join(argv)} exited {ran.returncode}: {ran.stdout[-500:]}{err[-500:]}")
    return ran


def repeat(label: str, measure: Callable[[], float], runs: int, warmup: int, unit: str = "s",
           between: Optional[Callable[[], None]] = None) -> Dist:
    """`warmup` discarded calls of `measure`, then `runs` kept ones; `between` runs untimed after each."""
    samples: List[float] = []
    for index in range(warmup + runs):
        value = measure()
        if index >= warmup:
            samples.append(value)
        if between is not None:
            between()
    return Dist(label, unit, samples, warmup)


def interleaved(measures: Sequence[Tuple[str, Callable[[], float]]], runs: int, warmup: int,
                unit: str = "s") -> List[Dist]:
    """Each measure once a round, in a rotating order, for `warmup` discarded and `runs` kept rounds:
    a machine that speeds up or slows down during the section moves every figure alike, so their
    ratios hold (measured one block after another, a 2-vCPU VM's drift moved a ratio by 15 %)."""
    samples: Dict[str, List[float]] = {label: [] for label, _ in measures}
    for index in range(warmup + runs):
        shift = index % len(measures)
        for label, measure in [*measures[shift:], *measures[:shift]]:
            value = measure()
            if index >= warmup:
                samples[label].append(value)
    return [Dist(label, unit, samples[label], warmup) for label, _ in measures]


def command_dist(label: str, argv: Sequence[str], runs: int, warmup: int, user: Optional[User] = None,
                 between: Optional[Callable[[], None]] = None) -> Dist:
    """Wall time of a command, repeated."""
    return repeat(label, lambda: run_timed(argv, user).seconds, runs, warmup, between=between)
