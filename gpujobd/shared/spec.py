"""Every option of a job submission, declared once.

An `Option` says all there is to say about one option: its key (the Python client's keyword, the
key in the Submit spec's a{sv} and the `JobSpec` field), its D-Bus signature, its default, its rules,
its CLI flag and help, and its conditions (`loop_only`: only for background loops; `server_default`:
the config key that fills it when unset; `pair`: where `submit_with_background` sends it; `max_items`:
how many items one call may carry). Everything else is derived from `OPTIONS`:

- `gpujobctl submit`'s flags (gpujobd.cli.submit builds them from `Option.cli`);
- the client's keyword check and a{sv} encoding (`encode`);
- the daemon's side, in gpujobd.shared.jobspec: `JobSpec` (one field per option), the decoding of
  the wire into it, its server defaults and its validation (`problems`, run by
  gpujobd.daemon.validation), with the rules declared here.

Both ends check the wire types (`wire_problem`): the client because a value that does not fit its
signature cannot be sent, the daemon because any program can call it.

Pure data and functions: no D-Bus library here (the client and the service wrap (signature, value)
pairs into their library's variants), nothing of gpujobd but other shared modules. gpujobctl imports
this module on every submit, so its records are NamedTuples, not dataclasses: a frozen dataclass
costs about a millisecond at import (it compiles its methods), a NamedTuple a tenth of that.
"""

from __future__ import annotations

import difflib
import math
import os
import types
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

from gpujobd.shared import environment, text
from gpujobd.shared.errors import InvalidArgument

if TYPE_CHECKING:
    from gpujobd.shared.config import JobsConfig

# Limits on what one submission may carry.
MAX_ARGV_ITEMS = 4096
MAX_ARG_BYTES = 128 * 1024
MAX_ENV_ITEMS = 4096
MAX_PROPERTY_ITEMS = 64
MAX_NAME_LENGTH = 128
MAX_TIMEOUT_S = 100 * 365 * 24 * 3600.0  # RuntimeMaxSec= is in microseconds, a uint64
# What a job may ask for when a stray GPU process holds one of its GPUs at submit (see docs/gpu.md).
GPU_CHECKS = ("off", "refuse", "wait")

Rule = Callable[[Any, "JobsConfig"], Optional[str]]  # (value, the server's jobs section) -> problem
_NO_PAIRS: Mapping[str, str] = types.MappingProxyType({})


class Cli(NamedTuple):
    """How `gpujobctl submit` takes an option."""

    flags: Tuple[str, ...]  # () for the positional command after `--`
    help: str
    metavar: Optional[str] = None
    parse: Optional[Callable[[str], Any]] = None  # text -> value (ValueError says what was expected)
    repeat: bool = False  # a repeatable NAME=VALUE flag that builds a map
    group: str = ""  # a heading of `gpujobctl submit -h`


class Option(NamedTuple):
    key: str  # the client's keyword, the wire key and the JobSpec field
    signature: str  # its D-Bus type on the wire
    cli: Cli
    default: Any = None  # when not given; the client sends nothing for it
    rules: Tuple[Rule, ...] = ()  # run by the daemon on a value that is not None
    required: bool = False  # on the wire (the client fills cwd in)
    loop_only: bool = False  # only for background loops ...
    neutral: Any = None  # ... except this value, which means what no loop does anyway
    server_default: str = ""  # the config key (section.key) that fills an unset value
    choices: Tuple[str, ...] = ()
    max_items: Optional[int] = None  # most items one call may carry (a list or map), refused at decoding
    pair: str = "both"  # Client.submit_with_background: both, foreground, loop, or fixed (set by it)

    @property
    def label(self) -> str:
        """How a message names the option: its keyword and its flag."""
        return f"{self.key} ({self.cli.flags[0] if self.cli.flags else 'the command'})"

    def given(self, value: Any) -> bool:
        """Whether a value is worth sending: not None, and not the default of a flag, name or map."""
        return value is not None and (self.default is None or value != self.default)


# --- rules: each returns what is wrong with a value and what to do, or None ---------------------------


def utf8_bytes(text_value: str) -> int:
    return len(text_value.encode("utf-8", "surrogateescape"))


def _command(argv: Tuple[str, ...], jobs: JobsConfig) -> Optional[str]:
    if not argv or not argv[0]:
        return ("is empty: give the program to run and its arguments, e.g. "
                "gpujobctl submit -- python3 train.py")
    if any("\0" in word for word in argv):
        return "contains a NUL byte: remove it"
    size = sum(utf8_bytes(word) + 1 for word in argv)
    if size > jobs.max_argv_bytes:
        return (f"is {size} bytes long; at most {jobs.max_argv_bytes} are allowed (jobs.max_argv_bytes): "
                "pass long lists in a file")
    return None


def _absolute(path: str, jobs: JobsConfig) -> Optional[str]:
    if utf8_bytes(path) > jobs.max_cwd_bytes:
        return (f"is {utf8_bytes(path)} bytes long; at most {jobs.max_cwd_bytes} are allowed "
                "(jobs.max_cwd_bytes): use a shorter path")
    if os.path.isabs(path) and "\0" not in path:
        return None
    return f"is {_shown(path)}: give an absolute path"


def _env_names(env: Mapping[str, str], jobs: JobsConfig) -> Optional[str]:
    bad = [key for key, value in env.items() if not key or "=" in key or "\0" in key + value]
    if bad:
        return (f"has {', '.join(_shown(key, 40) for key in bad[:5])}: a name must be non-empty, without "
                "'=' or NUL, and a value without NUL")
    size = environment.size_bytes(env)
    if size > jobs.max_env_bytes:
        biggest = sorted(env, key=lambda key: -len(env[key]))[:3]
        return (f"is {size} bytes in all; at most {jobs.max_env_bytes} are allowed (jobs.max_env_bytes; "
                f"largest: {', '.join(_shown(key, 40) for key in biggest)}): unset what the job does not "
                "need, or submit with --env-clear and the --env it needs; pass large values in a file")
    return None


def _property_values(properties: Mapping[str, str], jobs: JobsConfig) -> Optional[str]:
    long = [name for name, value in properties.items()
            if utf8_bytes(name) > 64 or utf8_bytes(value) > jobs.max_property_bytes]
    if not long:
        return None
    return (f"has {', '.join(_shown(name, 40) for name in long[:5])} longer than a property name (64 bytes) "
            f"or value ({jobs.max_property_bytes} bytes, jobs.max_property_bytes) may be")


def _name(name: str, _jobs: JobsConfig) -> Optional[str]:
    if len(name) <= MAX_NAME_LENGTH:
        return None
    return f"is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed: shorten it"


def _timeout(seconds: float, jobs: JobsConfig) -> Optional[str]:
    if not (seconds > 0 and math.isfinite(seconds)) or seconds > MAX_TIMEOUT_S:
        return f"is {seconds}: give a positive number of seconds, at most {MAX_TIMEOUT_S:.0f}"
    if jobs.max_timeout_s and seconds > jobs.max_timeout_s:
        return (f"is {seconds}: above this server's limit of {jobs.max_timeout_s} s (jobs.max_timeout_s); "
                "ask for less")
    return None


def _max_runs(runs: int, jobs: JobsConfig) -> Optional[str]:
    if 1 <= runs <= jobs.max_runs_limit:
        return None
    return f"is {runs}: give 1 to this server's limit of {jobs.max_runs_limit} (jobs.max_runs_limit)"


def _not_negative(seconds: float, _jobs: JobsConfig) -> Optional[str]:
    if 0 <= seconds <= MAX_TIMEOUT_S:
        return None
    return f"is {seconds}: give 0 or more seconds, at most {MAX_TIMEOUT_S:.0f}"


MAX_GPUS_PER_JOB = 64
MAX_PRIORITY = 1_000_000


def _gpus(count: int, _jobs: JobsConfig) -> Optional[str]:
    return None if count <= MAX_GPUS_PER_JOB else f"is {count}: at most {MAX_GPUS_PER_JOB} GPUs per job"


def _priority(value: int, _jobs: JobsConfig) -> Optional[str]:
    if -MAX_PRIORITY <= value <= MAX_PRIORITY:
        return None
    return f"is {value}: give a number from {-MAX_PRIORITY} to {MAX_PRIORITY}"


def _dependencies(ids: Tuple[int, ...], _jobs: JobsConfig) -> Optional[str]:
    return None if all(ids) else "contains 0, which is no job id: give the ids `gpujobctl list` shows"


def _array(value: str, _jobs: JobsConfig) -> Optional[str]:
    if not value:
        return None
    try:
        text.array(value)
    except ValueError as err:
        return f"is not an array: {err}"
    return None


def _one_of(choices: Tuple[str, ...]) -> Rule:
    def rule(value: str, _jobs: JobsConfig) -> Optional[str]:
        return None if value in choices else f"is {value!r}: give one of {', '.join(choices)}"
    return rule


# --- the options ---------------------------------------------------------------------------------------

LOOPS = "background loops"
SCHEDULING = "scheduling"
MAX_DEPENDENCIES = 1000
_NO_IDS: Tuple[int, ...] = ()

OPTIONS: Tuple[Option, ...] = (
    Option("argv", "as", Cli((), "the command to run", metavar="-- CMD [ARG...]"), required=True,
           rules=(_command,), max_items=MAX_ARGV_ITEMS, pair="fixed"),
    Option("cwd", "s", Cli(("--cwd",), "working directory (default: the current one)", metavar="DIR"),
           required=True, rules=(_absolute,)),
    Option("env", "a{ss}", Cli(("--env",), "set an environment variable for the job (repeatable; the job "
                                           "gets the submitter's environment, less session variables, "
                                           "plus these)", metavar="NAME=VALUE",
                               parse=text.key_value, repeat=True),
           default=_NO_PAIRS, rules=(_env_names,), max_items=MAX_ENV_ITEMS),
    # The client's to act on: with it, `env` holds only the explicit --env (and LANG), not the
    # submitter's environment. Sent so that a job's record says which it was.
    Option("env_clear", "b", Cli(("--env-clear",), "do not pass the submitter's environment: the job gets "
                                                   "only a safe base (PATH, HOME, SHELL, ...) plus --env"),
           default=False),
    Option("name", "s", Cli(("--name",), "a name to recognise the job by", metavar="NAME"), default="",
           rules=(_name,)),
    Option("properties", "a{ss}", Cli(("--property",), "a resource property of the job's scope, as the "
                                                       "daemon allows (repeatable)", metavar="P=V",
                                      parse=text.key_value, repeat=True),
           default=_NO_PAIRS, rules=(_property_values,), max_items=MAX_PROPERTY_ITEMS),
    # checked against jobs.allowed_properties and jobs.max_properties by gpujobd.daemon.properties
    Option("timeout_s", "d", Cli(("--timeout",), "stop the job after this long (90, 30s, 10min, 2h, 1h30m)",
                                 metavar="DURATION", parse=text.duration),
           rules=(_timeout,), pair="foreground"),
    Option("background", "b", Cli(("--background",), "run the command again each time it ends, up to "
                                                      "--max-runs times", group=LOOPS),
           default=False, pair="fixed"),
    Option("max_runs", "u", Cli(("--max-runs",), "at most N runs of a background loop", metavar="N",
                                parse=text.count, group=LOOPS),
           rules=(_max_runs,), loop_only=True, neutral=1, server_default="jobs.default_max_runs",
           pair="loop"),
    Option("restart_delay_s", "d", Cli(("--restart-delay",), "pause between two runs of a background loop",
                                       metavar="DURATION", parse=text.delay, group=LOOPS),
           rules=(_not_negative,), loop_only=True, server_default="jobs.restart_delay_s", pair="loop"),
    Option("stop_on_failure", "b", Cli(("--stop-on-failure",), "end a background loop after its first "
                                                               "failed run", group=LOOPS),
           default=False, loop_only=True, pair="loop"),
    Option("bind_to", "t", Cli(("--bind-to",), "stop this job when job ID (a running job of yours) ends",
                               metavar="ID", parse=text.job_id, group=LOOPS),
           pair="fixed"),  # that the job is the caller's and still running: the manager checks
    Option("gpu_check", "s", Cli(("--gpu-check",), "when a stray process holds one of the job's GPUs: start "
                                                   "anyway (off), refuse (refuse) or wait queued (wait)"),
           rules=(_one_of(GPU_CHECKS),), choices=GPU_CHECKS, server_default="gpu.prestart_check"),
    Option("gpus", "u", Cli(("--gpus",), "N whole GPUs for the job alone (it waits queued until they are "
                                         "free; CUDA_VISIBLE_DEVICES and the device cgroup show it only "
                                         "those)", metavar="N", parse=text.whole, group=SCHEDULING),
           default=0, rules=(_gpus,)),
    Option("priority", "i", Cli(("--priority",), "higher starts first (default 0; only an admin may go "
                                                 "above 0)", metavar="INT", parse=text.integer,
                                group=SCHEDULING),
           default=0, rules=(_priority,)),
    Option("after", "at", Cli(("--after",), "start once all these jobs succeeded; if one ends otherwise, "
                                            "this one fails (dependency-failed) without running",
                              metavar="ID[,ID...]", parse=text.job_ids, group=SCHEDULING),
           default=(), rules=(_dependencies,), max_items=MAX_DEPENDENCIES, pair="fixed"),
    Option("after_any", "at", Cli(("--after-any",), "start once all these jobs ended, however they ended",
                                  metavar="ID[,ID...]", parse=text.job_ids, group=SCHEDULING),
           default=(), rules=(_dependencies,), max_items=MAX_DEPENDENCIES, pair="fixed"),
    Option("array", "s", Cli(("--array",), "one job per index, Slurm's syntax: 0-19, 1,3,5 or 0-15:4, "
                                           "with %%K for at most K at once (0-19%%4)", metavar="SPEC",
                             group=SCHEDULING),
           default="", rules=(_array,), pair="fixed"),
    Option("stagger_s", "d", Cli(("--stagger",), "at least this long between two starts of an array's "
                                                 "tasks", metavar="DURATION", parse=text.delay,
                                 group=SCHEDULING),
           rules=(_not_negative,), pair="fixed"),
)

BY_KEY: Mapping[str, Option] = {option.key: option for option in OPTIONS}
SIGNATURES: Mapping[str, str] = {option.key: option.signature for option in OPTIONS}


# --- the wire: both ends ----------------------------------------------------------------------------------

_UINT_MAX = {"u": (1 << 32) - 1, "t": (1 << 64) - 1}
_INT32 = (-(1 << 31), (1 << 31) - 1)


def wire_problem(signature: str, value: Any) -> Optional[str]:
    """What keeps a value from being sent as `signature` (one of the spec's), or None."""
    if signature == "b":
        return None if isinstance(value, bool) else f"expected True or False (b), not {_shown(value)}"
    if signature in _UINT_MAX:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT_MAX[signature]:
            return None
        return f"expected a whole number from 0 to {_UINT_MAX[signature]} ({signature}), not {_shown(value)}"
    if signature == "i":
        if isinstance(value, int) and not isinstance(value, bool) and _INT32[0] <= value <= _INT32[1]:
            return None
        return f"expected a whole number from {_INT32[0]} to {_INT32[1]} (i), not {_shown(value)}"
    if signature == "at":
        if not isinstance(value, (list, tuple)):
            return f"expected a list of job ids (at), not {_shown(value)}"
        return next(filter(None, (wire_problem("t", item) for item in value)), None)
    if signature == "d":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        return f"expected a number of seconds (d), not {_shown(value)}"
    if signature == "s":
        return _string_problem(value)
    if signature == "as":
        if isinstance(value, str):
            return f"expected a list of strings (as), not a single string ({_shown(value)})"
        if not isinstance(value, (list, tuple)):
            return f"expected a list of strings (as), not {_shown(value)}"
        return next(filter(None, (_string_problem(item) for item in value)), None)
    if signature == "a{ss}":
        if not isinstance(value, Mapping):
            return f"expected a map of strings to strings (a{{ss}}), not {_shown(value)}"
        items = (_string_problem(item) for pair in value.items() for item in pair)
        return next(filter(None, items), None)
    raise ValueError(f"no wire check for signature {signature!r}")


def _string_problem(value: Any) -> Optional[str]:
    if not isinstance(value, str):
        return f"expected a string (s), not {_shown(value)}"
    if "\0" in value:
        return f"{_shown(value)} contains a NUL character, which D-Bus cannot carry"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{_shown(value)} is not valid UTF-8: D-Bus carries only UTF-8 strings"
    return None


def _shown(value: Any, room: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= room else text[:room - 3] + "..."


def unknown_problem(keys: Iterable[str], what: str = "option") -> Optional[str]:
    """Names the keys that are no option (with a guess at what was meant), or None."""
    unknown = sorted(set(keys) - set(BY_KEY))
    if not unknown:
        return None
    guesses = [f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)
               for key in unknown for close in [difflib.get_close_matches(key, BY_KEY, n=1)]]
    return f"unknown {what} {', '.join(guesses)}; known: {', '.join(BY_KEY)}"


def encode(values: Mapping[str, Any]) -> Dict[str, Tuple[str, Any]]:
    """The client's side: options by keyword -> {key: (signature, value)}, only those given.

    Refuses unknown keywords and values that cannot be sent, every one at once, as InvalidArgument.
    """
    problems = list(filter(None, [unknown_problem(values, "keyword")]))
    wire: Dict[str, Tuple[str, Any]] = {}
    for key, value in values.items():
        option = BY_KEY.get(key)
        if option is None or not (option.required or option.given(value)):
            continue
        problem = wire_problem(option.signature, value)
        if problem is not None:
            problems.append(f"{option.label}: {problem}")
        else:
            held = plain(option.signature, value)
            # On the wire an array is a list: what every D-Bus library (jeepney included) takes.
            wire[key] = (option.signature, list(held) if isinstance(held, tuple) else held)
    if problems:
        raise InvalidArgument("; ".join(problems))
    return wire


def plain(signature: str, value: Any) -> Any:
    """A wire value as gpujobd holds it: floats for d, tuples of ints for at, lists and dicts."""
    if signature == "d":
        return float(value)
    if signature == "as":
        return list(value)
    if signature == "at":
        return tuple(int(item) for item in value)
    if signature == "a{ss}":
        return dict(value)
    return value
