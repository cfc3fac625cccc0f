"""Validation of a job spec: pure, all problems reported at once, no side effects."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional

from gpujobd.daemon.properties import Encoded, parse_properties
from gpujobd.shared import api
from gpujobd.shared.config import JobsConfig
from gpujobd.shared.errors import InvalidArgument
from gpujobd.shared.model import JobSpec

MAX_TIMEOUT_S = 100 * 365 * 24 * 3600.0  # RuntimeMaxSec= is in microseconds, a uint64


def validate(spec: JobSpec, jobs: JobsConfig) -> List[Encoded]:
    """Every problem of a spec at once, as one InvalidArgument; else its encoded properties."""
    problems = []
    if not spec.argv or not spec.argv[0]:
        problems.append("the command is empty: give it after '--', "
                        "e.g. gpujobctl submit -- python train.py")
    if sum(len(a.encode()) + 1 for a in spec.argv) > api.MAX_ARG_BYTES:
        problems.append(f"the command line is longer than {api.MAX_ARG_BYTES} bytes")
    if any("\0" in a for a in spec.argv):
        problems.append("the command contains a NUL byte")
    if not os.path.isabs(spec.cwd) or "\0" in spec.cwd:
        problems.append(f"cwd {spec.cwd!r} must be an absolute path")
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            problems.append(f"--env {key!r}: a name must be non-empty, without '=' or NUL")
    if len(spec.env) > api.MAX_ENV_ITEMS:
        problems.append(f"more than {api.MAX_ENV_ITEMS} --env entries")
    if len(spec.name) > api.MAX_NAME_LENGTH:
        problems.append(f"--name is longer than {api.MAX_NAME_LENGTH} characters")
    problems += _timeout_problems(spec.timeout_s, jobs)
    problems += _loop_problems(spec, jobs)
    try:
        properties = parse_properties(spec.properties, jobs.allowed_properties)
    except InvalidArgument as err:
        problems.append(str(err))
        properties = []
    if problems:
        raise InvalidArgument("; ".join(problems))
    return properties


def with_loop_defaults(spec: JobSpec, jobs: JobsConfig) -> JobSpec:
    """A background loop's unset cap and delay become the server's defaults."""
    if not spec.background:
        return spec
    return dataclasses.replace(
        spec,
        max_runs=jobs.default_max_runs if spec.max_runs is None else spec.max_runs,
        restart_delay_s=jobs.restart_delay_s if spec.restart_delay_s is None else spec.restart_delay_s,
    )


def _loop_problems(spec: JobSpec, jobs: JobsConfig) -> List[str]:
    if not spec.background:
        given = [flag for flag, value in (("--max-runs", spec.max_runs not in (None, 1)),
                                          ("--restart-delay", spec.restart_delay_s is not None),
                                          ("--stop-on-failure", spec.stop_on_failure)) if value]
        return [f"{', '.join(given)} only apply to background loops: add --background"] if given else []
    limit = jobs.max_runs_limit
    problems = []
    if not 1 <= (spec.max_runs or 0) <= limit:
        problems.append(f"--max-runs {spec.max_runs}: must be from 1 to this server's limit of "
                        f"{limit} (jobs.max_runs_limit)")
    if spec.restart_delay_s is None or not spec.restart_delay_s >= 0:
        problems.append(f"--restart-delay {spec.restart_delay_s}: must be 0 or more seconds")
    return problems


def _timeout_problems(timeout_s: Optional[float], jobs: JobsConfig) -> List[str]:
    if timeout_s is None:
        return []
    limit = jobs.max_timeout_s
    if not (timeout_s > 0 and math.isfinite(timeout_s)) or timeout_s > MAX_TIMEOUT_S:
        return [f"--timeout {timeout_s}: must be a positive number of seconds, at most "
                f"{MAX_TIMEOUT_S:.0f}"]
    if limit and timeout_s > limit:
        return [f"--timeout {timeout_s}: above this server's limit of {limit} s (jobs.max_timeout_s)"]
    return []
