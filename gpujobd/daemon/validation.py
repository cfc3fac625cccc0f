"""Validation of a job spec: pure, all problems reported at once, no side effects.

The options and their rules are declared in gpujobd.shared.spec and run by gpujobd.shared.jobspec;
here together with what only the daemon can check (the resource properties against the admin's
allowlist).
"""

from __future__ import annotations

from typing import List

from gpujobd.daemon.properties import Encoded, parse_properties, with_admin_limits
from gpujobd.shared import jobspec
from gpujobd.shared.config import JobsConfig
from gpujobd.shared.errors import InvalidArgument
from gpujobd.shared.jobspec import JobSpec


def validate(spec: JobSpec, jobs: JobsConfig) -> List[Encoded]:
    """Every problem of a spec at once, as one InvalidArgument; else its encoded properties."""
    problems = jobspec.problems(spec, jobs)
    try:
        properties = with_admin_limits(spec.properties, parse_properties(spec.properties,
                                                                         jobs.allowed_properties),
                                       jobs.default_properties, jobs.max_properties)
    except InvalidArgument as err:
        problems.append(str(err))
        properties = []
    if problems:
        raise InvalidArgument("; ".join(problems))
    return properties
