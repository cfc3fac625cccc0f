"""What a user asked for, as the daemon holds it: `JobSpec`, one field per submit option of
gpujobd.shared.spec, and the daemon's side of a submission: decoding the wire into a JobSpec, the
server's defaults, and validation (`problems`), which reports every problem at once, each naming the
option and what to do.

Validation happens once, in the daemon (gpujobd.daemon.validation runs `problems`). The client and
gpujobctl never import this module: they send the options as spec.encode builds them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from gpujobd.shared import environment
from gpujobd.shared.errors import InvalidArgument
from gpujobd.shared.spec import BY_KEY, OPTIONS, Option, plain, unknown_problem, utf8_bytes, wire_problem

if TYPE_CHECKING:
    from gpujobd.shared.config import Config, JobsConfig


@dataclass(frozen=True)
class JobSpec:
    """What a user asked for: one field per option of OPTIONS, in its order, with its default (a test
    keeps the two in step). Validated (`problems`) before a job row exists."""

    argv: Tuple[str, ...]
    cwd: str
    env: Mapping[str, str] = field(default_factory=dict)
    env_clear: bool = False
    name: str = ""
    properties: Mapping[str, str] = field(default_factory=dict)
    timeout_s: Optional[float] = None
    # Background loops: the command runs up to max_runs times, restart_delay_s apart. None means
    # "the server's default" until the manager has validated the spec; stored specs are concrete.
    background: bool = False
    max_runs: Optional[int] = None
    restart_delay_s: Optional[float] = None
    stop_on_failure: bool = False
    bind_to: Optional[int] = None  # a foreground job whose end stops this one (BindsTo=)
    # When a stray process holds one of the job's GPUs: off, refuse or wait; None until the manager
    # fills in the server's gpu.prestart_check. Stored: a job queued across a restart waits again.
    gpu_check: Optional[str] = None
    # Scheduling (gpujobd.daemon.scheduler): whole GPUs, priority, dependencies, an array and its stagger.
    gpus: int = 0
    priority: int = 0
    after: Tuple[int, ...] = ()
    after_any: Tuple[int, ...] = ()
    array: str = ""  # Slurm's syntax; each task of an array stores it (its %K is the array's limit)
    stagger_s: Optional[float] = None


def decode(wire: Mapping[str, Any]) -> JobSpec:
    """The Submit spec's plain values -> a JobSpec (not yet validated).

    Refuses unknown keys, missing required ones, values of the wrong type and lists or maps longer
    than one call may carry (`max_items`), every one at once, before any other work.
    """
    problems = list(filter(None, [unknown_problem(wire, "spec field")]))
    values: Dict[str, Any] = {}
    for option in OPTIONS:
        if option.key not in wire:
            if option.required:
                problems.append(f"{option.label} is missing: every job needs it")
            values[option.key] = None if option.default is None else plain(option.signature, option.default)
            continue
        problem = wire_problem(option.signature, wire[option.key])
        if problem is not None:
            problems.append(f"spec field {option.key!r}: {problem}")
        elif option.max_items is not None and len(wire[option.key]) > option.max_items:
            problems.append(f"{option.label} has {len(wire[option.key])} items; at most {option.max_items} "
                            "are allowed in one call")
        else:
            values[option.key] = plain(option.signature, wire[option.key])
    if problems:
        raise InvalidArgument("; ".join(problems))
    values["argv"] = tuple(values["argv"])
    return JobSpec(**values)


# --- defaults and validation ----------------------------------------------------------------------------


def applies(option: Option, spec: JobSpec) -> bool:
    """Whether an option has a meaning for this spec (a loop-only one needs background)."""
    return spec.background or not option.loop_only


def with_server_defaults(spec: JobSpec, config: Config) -> JobSpec:
    """Unset options with a server default (`server_default`) get the server's value."""
    filled = {option.key: _config_value(config, option.server_default) for option in OPTIONS
              if option.server_default and getattr(spec, option.key) is None and applies(option, spec)}
    return dataclasses.replace(spec, **filled) if filled else spec


def _config_value(config: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def problems(spec: JobSpec, jobs: JobsConfig) -> List[str]:
    """Every problem of a spec, each naming the option and what to do; [] if none."""
    found: List[str] = []
    for option in OPTIONS:
        value = getattr(spec, option.key)
        if value is None:
            continue
        found += [f"{option.label} {problem}" for rule in option.rules
                  for problem in [rule(value, jobs)] if problem is not None]
    return _loop_problems(spec) + found + _size_problems(spec, jobs)


def spec_bytes(spec: JobSpec) -> int:
    """What a spec weighs: the bytes of its strings (the fixed-size numbers aside)."""
    strings = sum(utf8_bytes(word) + 1 for word in spec.argv) + utf8_bytes(spec.cwd) + utf8_bytes(spec.name)
    return strings + environment.size_bytes(spec.env) + environment.size_bytes(spec.properties)


def _size_problems(spec: JobSpec, jobs: JobsConfig) -> List[str]:
    size = spec_bytes(spec)
    if size <= jobs.max_spec_bytes:
        return []
    return [f"the job's spec is {size} bytes in all; at most {jobs.max_spec_bytes} are allowed "
            "(jobs.max_spec_bytes): pass large inputs in files"]


def _loop_problems(spec: JobSpec) -> List[str]:
    found = []
    if spec.stagger_s and not spec.array:
        found.append(f"{BY_KEY['stagger_s'].label} spaces the starts of an array's tasks: give "
                     f"{BY_KEY['array'].label} too")
    return found + _background_problems(spec)


def _background_problems(spec: JobSpec) -> List[str]:
    if spec.background:
        return []
    given = [option.label for option in OPTIONS if option.loop_only
             and option.given(getattr(spec, option.key)) and getattr(spec, option.key) != option.neutral]
    if not given:
        return []
    verb = "apply" if len(given) > 1 else "applies"
    return [f"{', '.join(given)} only {verb} to background loops: set {BY_KEY['background'].label} too"]
