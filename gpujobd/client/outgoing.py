"""What the client sends, as plain values: the Submit spec, the List filter, ids and limits.

The submit options are declared in gpujobd.shared.spec, which checks the keywords and encodes the
values; the daemon validates them. Only what the caller alone knows is settled here: the working
directory a relative (or no) `cwd` means, and the caller's environment (or, with `env_clear`, its LANG).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Sequence, Tuple

from gpujobd.shared import api, environment, errors, spec
from gpujobd.shared.states import JobState

MAX_UINT32 = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1

Wire = Dict[str, Tuple[str, Any]]  # {key: (D-Bus signature, plain value)}


def spec_wire(argv: Sequence[str], *, caller_environ: Mapping[str, str] | None = None,
              **options: Any) -> Wire:
    """The Submit spec, {key: (signature, value)}, of a command and its options (keywords of
    gpujobd.shared.spec.OPTIONS). InvalidArgument names every unknown keyword and every value that
    cannot be sent.

    `cwd` is made absolute against the caller's working directory (default: that directory). `env`
    sent is the caller's environment less its session variables (`environment.inherited`), with the
    explicit env over it; with `env_clear`, the explicit env plus the caller's LANG when set and not
    given. Only the options that are given are sent: an absent one means its default, or the server's.
    """
    values = dict(options, argv=argv)
    values["cwd"] = _resolved_cwd(options.get("cwd"))
    caller = os.environ if caller_environ is None else caller_environ
    values["env"] = _job_env(options.get("env"), caller, bool(options.get("env_clear")))
    return spec.encode(values)


def spec_values(argv: Sequence[str], **options: Any) -> Dict[str, Any]:
    """The Submit spec's plain values (see `spec_wire`)."""
    return {key: value for key, (_signature, value) in spec_wire(argv, **options).items()}


def _resolved_cwd(cwd: Any) -> Any:
    if cwd is None:
        try:
            return os.getcwd()
        except OSError as error:
            raise errors.InvalidArgument(
                f"the current directory cannot be read ({error.strerror}): cd somewhere else or give "
                "a working directory (cwd, --cwd)"
            ) from None
    return os.path.abspath(cwd) if isinstance(cwd, str) and "\0" not in cwd else cwd


def _job_env(env: Any, caller_environ: Mapping[str, str], env_clear: bool) -> Any:
    if env is not None and not isinstance(env, Mapping):
        return env  # spec.encode says what is wrong with it
    if env_clear:
        pairs = dict(env or {})
        if "LANG" not in pairs and caller_environ.get("LANG"):
            pairs["LANG"] = caller_environ["LANG"]
        return pairs
    return {**environment.inherited(caller_environ), **(env or {})}


def filter_wire(
    *, all: bool = False, user: str | None = None, state: str | None = None,
    limit: int | None = None, after_id: int | None = None,
) -> Wire:
    """The List filter, {key: (signature, value)}, with only the keys that are given."""
    values: Dict[str, Any] = {}
    if after_id is not None:
        values["after_id"] = checked_id(after_id) if after_id else 0
    if all:
        values["all"] = True
    if user:
        values["user"] = _checked_string("user", user)
    if state:
        values["state"] = _checked_state(state)
    if limit is not None:
        values["limit"] = _checked_limit(limit)
    return {key: (api.FILTER_FIELDS[key], value) for key, value in values.items()}


def _checked_string(what: str, value: Any) -> str:
    problem = spec.wire_problem("s", value)
    if problem is not None:
        raise errors.InvalidArgument(f"{what}: {problem}")
    return value


def _checked_state(state: str) -> str:
    try:
        return JobState(state).value
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise errors.InvalidArgument(f"unknown state {state!r}: use one of {known}") from None


def _checked_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= api.MAX_LIST_LIMIT:
        raise errors.InvalidArgument(f"the limit must be a whole number from 1 to {api.MAX_LIST_LIMIT}")
    return limit


def checked_id(job_id: int, what: str = "a job id") -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 <= job_id <= MAX_UINT64:
        raise errors.InvalidArgument(f"{what} is a whole number >= 0, not {job_id!r}")
    return job_id


def checked_run_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_UINT32:
        raise errors.InvalidArgument(f"the runs limit must be a whole number from 0 (all) to "
                                     f"{MAX_UINT32}, not {limit!r}")
    return limit


def checked_log_range(offset: int, max_bytes: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_UINT64:
        raise errors.InvalidArgument(f"a log offset is a whole number >= 0, not {offset!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 < max_bytes <= MAX_UINT32:
        raise errors.InvalidArgument(f"max_bytes must be a whole number from 1 to {MAX_UINT32}")
