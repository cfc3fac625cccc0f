"""The configuration: one TOML file, read into frozen dataclasses, checked strictly.

Every key is declared once, as a field of its section's dataclass with `spec()` as its metadata:
default, type (the type of the default), range or choices, and a one-line doc. `SETTINGS` is that
table; the parser, `dump_toml()`, `default_config_text()` (the shipped packaging/gpujobd.toml) and
the tests of docs/configuration.md are all driven by it.

A file is checked as a whole: every problem (unknown or misspelt key, wrong type, value out of range)
is collected and reported at once in one ConfigError naming the file and each dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple, Type

from gpujobd.shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/gpujobd/gpujobd.toml")
CONFIG_ENV = "GPUJOBD_CONFIG"

_SPEC = "gpujobd.setting"


@dataclass(frozen=True)
class Spec:
    """What a key accepts besides its type, and what it means."""

    doc: str
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    choices: Tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None  # on the value, or on each item of a list
    expect: str = ""  # what `check` wants, for messages and docs
    item_expect: str = ""  # the same for one item of a list
    at_least: str = ""  # another key of the same section this one may not be below


def spec(doc: str, **constraints: Any) -> Dict[str, Spec]:
    """The metadata of a key's dataclass field: its one-line doc and the constraints of `Spec`."""
    return {_SPEC: Spec(doc, **constraints)}


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)
    return lambda value: compiled.fullmatch(value) is not None


def _is_slice_name(value: str) -> bool:
    if not value.endswith(".slice") or len(value) > 255:
        return False
    parts = value[: -len(".slice")].split("-")
    return all(re.fullmatch(r"[A-Za-z0-9:_.]+", part) for part in parts)


def _is_search_path(value: str) -> bool:
    return all(part.startswith("/") for part in value.split(":"))


def _is_umask(value: str) -> bool:
    return re.fullmatch(r"[0-7]{3,4}", value) is not None and int(value, 8) <= 0o777


_is_account_name = _matches(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
_is_property_name = _matches(r"[A-Z][A-Za-z0-9]*")

LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
STRAY_POLICIES = ("report", "kill")
PRESTART_CHECKS = ("off", "refuse", "wait")


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = field(
        default=Path("/var/lib/gpujobd"), metadata=spec("Directory of the daemon's state (job database)."),
    )
    log_dir: Path = field(
        default=Path("/var/log/gpujobd"),
        metadata=spec("Directory of logs; job output goes to its jobs/ subdirectory."),
    )
    admin_group: str = field(default="gpujob-admin", metadata=spec(
        "Members of this group may act on every user's jobs.", check=_is_account_name, expect="a group name",
    ))
    slice: str = field(default="gpujob.slice", metadata=spec(
        "Slice every job's scope is placed in.",
        check=_is_slice_name, expect='a slice unit name ending in ".slice"',
    ))
    log_format: str = field(default="console", metadata=spec(
        "Daemon log format: key=value lines or JSON objects.", choices=LOG_FORMATS,
    ))
    log_level: str = field(default="info", metadata=spec(
        "Least severe daemon log level that is written.", choices=LOG_LEVELS,
    ))
    start_timeout_s: float = field(default=10.0, metadata=spec(
        "How long the daemon waits for a job's scope to become active.", above=0,
    ))
    reconcile_on_start: bool = field(default=True, metadata=spec(
        "At start, reconcile recorded jobs with the scopes systemd has.",
    ))

    @property
    def job_log_dir(self) -> Path:
        return self.log_dir / "jobs"


@dataclass(frozen=True)
class JobsConfig:
    stop_timeout_s: float = field(default=10.0, metadata=spec(
        "Grace between SIGTERM and SIGKILL on stop; set as TimeoutStopSec= on each scope.", above=0,
    ))
    default_max_runs: int = field(default=10, metadata=spec(
        "Runs of a background loop job when none are asked for.", minimum=1,
    ))
    max_runs_limit: int = field(default=1000, metadata=spec(
        "Most runs a background loop job may ask for.", minimum=1, at_least="default_max_runs",
    ))
    restart_delay_s: float = field(default=2.0, metadata=spec(
        "Pause between two runs of a background loop job.", minimum=0,
    ))
    max_timeout_s: float = field(default=0.0, metadata=spec(
        "Largest --timeout a job may ask for; 0 means no limit.", minimum=0,
    ))
    default_path: str = field(
        default="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        metadata=spec(
            "PATH given to a job whose environment has none.",
            check=_is_search_path, expect="absolute directories separated by ':'",
        ),
    )
    umask: str = field(default="0022", metadata=spec(
        "Umask a job's processes start with (octal).",
        check=_is_umask, expect='an octal umask such as "0022"',
    ))
    allowed_properties: Tuple[str, ...] = field(
        default=("MemoryMax", "MemoryHigh", "MemorySwapMax", "CPUQuota", "CPUWeight", "AllowedCPUs",
                 "TasksMax", "IOWeight"),
        metadata=spec(
            "systemd scope properties a user may set on a job.",
            check=_is_property_name, expect="a list of systemd property names",
            item_expect='a systemd property name such as "MemoryMax"',
        ),
    )
    log_read_max_bytes: int = field(default=1048576, metadata=spec(
        "Most bytes of job output one ReadLog call returns.", minimum=4096, maximum=67108864,
    ))
    recent_window_s: float = field(default=3600.0, metadata=spec(
        "A list without --all shows active jobs and jobs that ended this recently.", minimum=0,
    ))

    @property
    def umask_int(self) -> int:
        return int(self.umask, 8)

    @property
    def timeout_limit_s(self) -> float | None:
        """The largest --timeout allowed, or None when there is no limit."""
        return self.max_timeout_s or None


@dataclass(frozen=True)
class GpuConfig:
    watch: bool = field(default=True, metadata=spec("Watch the GPUs for processes that belong to no job."))
    poll_interval_s: float = field(default=5.0, metadata=spec(
        "How often the GPUs' processes are listed.", minimum=0.1,
    ))
    nvml_call_timeout_s: float = field(default=2.0, metadata=spec(
        "How long one NVML call may take before it counts as hung.", above=0,
    ))
    retry_initial_s: float = field(default=5.0, metadata=spec(
        "First wait before NVML is tried again after it failed.", above=0,
    ))
    retry_max_s: float = field(default=300.0, metadata=spec(
        "Longest wait between NVML retries (the wait doubles up to this).", above=0,
        at_least="retry_initial_s",
    ))
    stray_policy: str = field(default="report", metadata=spec(
        "What to do about a stray GPU process: log it, or kill it.", choices=STRAY_POLICIES,
    ))
    stray_grace_s: float = field(default=60.0, metadata=spec(
        "With policy kill, how long a stray must have been seen (since it was first found) before "
        "it may be killed.", minimum=0,
    ))
    stray_kill_min_ticks: int = field(default=3, metadata=spec(
        "With policy kill, polls in a row a process must be seen stray before it may be killed.",
        minimum=1,
    ))
    stray_kill_users: Tuple[str, ...] = field(default=(), metadata=spec(
        "With policy kill, kill only strays whose real user is one of these (empty: any user but "
        "root and system accounts, who are never killed).",
        check=_is_account_name, expect="a list of user names", item_expect="a user name",
    ))
    stray_kill_orphans_only: bool = field(default=True, metadata=spec(
        "With policy kill, kill only orphans: strays whose parent is PID 1 or a systemd subreaper.",
    ))
    prestart_check: str = field(default="off", metadata=spec(
        "Before a job starts, if a stray holds its GPUs: start anyway, refuse the job, or wait "
        "(queued) for the GPUs; a job's own gpu_check overrides it.", choices=PRESTART_CHECKS,
    ))
    prestart_wait_s: float = field(default=300.0, metadata=spec(
        "How long a job waits, queued, for strays to leave its GPUs before it fails.", above=0,
    ))

    @property
    def kills_strays(self) -> bool:
        return self.stray_policy == "kill"


@dataclass(frozen=True)
class ClientConfig:
    follow_poll_interval_s: float = field(default=0.25, metadata=spec(
        "How often `gpujobctl logs -f` asks for new output.", above=0,
    ))
    call_timeout_s: float = field(default=30.0, metadata=spec(
        "How long gpujobctl waits for the daemon to answer a call.", above=0,
    ))


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    client: ClientConfig = field(default_factory=ClientConfig)


SECTIONS: Mapping[str, Type[Any]] = {
    f.name: f.default_factory for f in dataclasses.fields(Config)  # type: ignore[misc]
}


@dataclass(frozen=True)
class Setting:
    """One row of the table: a key of a section."""

    section: str
    name: str
    default: Any
    spec: Spec

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def doc(self) -> str:
        return self.spec.doc

    @property
    def expected(self) -> str:
        """What the key accepts, in words: 'a number > 0', 'one of "report", "kill"'."""
        return _expected(self)


def _table() -> Tuple[Setting, ...]:
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append(Setting(section, f.name, f.default, f.metadata[_SPEC]))
    return tuple(rows)


SETTINGS: Tuple[Setting, ...] = _table()
_BY_SECTION: Dict[str, Dict[str, Setting]] = {
    section: {s.name: s for s in SETTINGS if s.section == section} for section in SECTIONS
}


# --- describing values -------------------------------------------------------------------------------

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a list of strings"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _expected(s: Setting) -> str:
    spec = s.spec
    if spec.choices:
        return "one of " + ", ".join(f'"{c}"' for c in spec.choices)
    if issubclass(s.kind, Path):
        return "an absolute path"
    words = spec.expect or _KIND_WORDS[s.kind]
    bounds = []
    if spec.minimum is not None and spec.maximum is not None:
        bounds.append(f"from {_number(spec.minimum)} to {_number(spec.maximum)}")
    elif spec.minimum is not None:
        bounds.append(f">= {_number(spec.minimum)}")
    elif spec.maximum is not None:
        bounds.append(f"<= {_number(spec.maximum)}")
    if spec.above is not None:
        bounds.append(f"> {_number(spec.above)}")
    if spec.at_least:
        bounds.append(f">= {s.section}.{spec.at_least}")
    return " ".join([words, " and ".join(bounds)]) if bounds else words


def _show(value: Any) -> str:
    """A value as found in the file, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_value(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


# --- converting and checking one value ---------------------------------------------------------------


class _Invalid(Exception):
    """A key's problems: one, or one per bad item of a list."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _problem(where: str, expected: str, value: Any) -> str:
    """`where` is the dotted key, with [index] for an item of a list."""
    return f"{where}: expected {expected}, got {_show(value)}"


def _invalid(where: str, expected: str, value: Any) -> _Invalid:
    return _Invalid([_problem(where, expected, value)])


def _convert(s: Setting, value: Any) -> Any:
    """The file's value as the dataclass holds it, or _Invalid."""
    kind = s.kind
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is tuple:
        ok = isinstance(value, list)
    else:  # str and Path: both written as TOML strings
        ok = isinstance(value, str)
    if not ok:
        raise _invalid(s.dotted, s.expected, value)
    if kind is tuple:
        return _convert_items(s, value)
    if issubclass(kind, Path):
        return _convert_path(s, value)
    return value


def _convert_items(s: Setting, items: List[Any]) -> Tuple[str, ...]:
    problems = [_item_problem(s, index, item) for index, item in enumerate(items)]
    problems = [problem for problem in problems if problem]
    if problems:
        raise _Invalid(problems)
    return tuple(items)


def _item_problem(s: Setting, index: int, item: Any) -> str:
    where = f"{s.dotted}[{index}]"
    if not isinstance(item, str):
        return _problem(where, "a string", item)
    if s.spec.check is not None and not s.spec.check(item):
        return _problem(where, s.spec.item_expect or "a string", item)
    return ""


def _convert_path(s: Setting, value: str) -> Path:
    if not value.startswith("/") or "\0" in value:
        raise _invalid(s.dotted, s.expected, value)
    return Path(value)


def _check(s: Setting, value: Any) -> None:
    """Raise _Invalid when a value of the right type breaks its range, choices or format."""
    spec = s.spec
    bad = (
        (spec.choices and value not in spec.choices)
        or (spec.minimum is not None and value < spec.minimum)
        or (spec.maximum is not None and value > spec.maximum)
        or (spec.above is not None and value <= spec.above)
        or (spec.check is not None and s.kind is not tuple and not spec.check(value))
    )
    if bad:
        raise _invalid(s.dotted, s.expected, value)


# --- a whole file ------------------------------------------------------------------------------------


def _suggest(word: str, candidates: List[str]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(section: str, key: str) -> str:
    """The message for a key the section does not have, suggesting the key probably meant."""
    where = f"{section}.{key}" if section else key
    elsewhere = {s.name: s.dotted for s in SETTINGS if s.section != section}
    if key in elsewhere:  # the right key in the wrong section
        return f"{where}: unknown key; did you mean {elsewhere[key]}?"
    guess = _suggest(key, list(_BY_SECTION.get(section, {})))
    if guess is not None:
        return f"{where}: unknown key; did you mean {section}.{guess}?"
    guess = _suggest(key, list(elsewhere))
    if guess is not None:
        return f"{where}: unknown key; did you mean {elsewhere[guess]}?"
    if not section:
        return f"{where}: unknown key; keys belong in a section: " + _section_list()
    return f"{where}: unknown key in [{section}]"


def _unknown_section(name: str) -> str:
    guess = _suggest(name, list(SECTIONS))
    if guess is not None:
        return f"[{name}]: unknown section; did you mean [{guess}]?"
    return f"[{name}]: unknown section; the sections are " + _section_list()


def _section_list() -> str:
    return ", ".join(f"[{name}]" for name in SECTIONS)


def _parse_section(section: str, table: Mapping[str, Any], problems: List[str]) -> Dict[str, Any]:
    """The valid values of a section's table; each problem found is appended to `problems`."""
    values: Dict[str, Any] = {}
    known = _BY_SECTION[section]
    for key, raw in table.items():
        s = known.get(key)
        if s is None:
            problems.append(_unknown_key(section, key))
            continue
        try:
            value = _convert(s, raw)
            _check(s, value)
        except _Invalid as invalid:
            problems.extend(invalid.problems)
            continue
        values[key] = value
    return values


def _check_order(section: str, table: Mapping[str, Any], values: Dict[str, Any], problems: List[str]) -> None:
    """Cross-field checks (`at_least`), skipped where either key is missing or was itself invalid."""
    defaults = {s.name: s.default for s in _BY_SECTION[section].values()}
    for s in _BY_SECTION[section].values():
        other = s.spec.at_least
        if not other or (s.name not in values and other not in values):
            continue
        if any(key in table and key not in values for key in (s.name, other)):
            continue
        value = values.get(s.name, defaults[s.name])
        floor = values.get(other, defaults[other])
        if value < floor:
            problems.append(f"{s.dotted}: expected a value >= {section}.{other} ({floor!r}), got {value!r}")


def config_from_mapping(data: Mapping[str, Any], source: str = "<configuration>") -> Config:
    """A Config from parsed TOML (nested dicts); raises one ConfigError listing every problem."""
    problems: List[str] = []
    sections: Dict[str, Any] = {}
    for name, table in data.items():
        if name not in SECTIONS:
            problems.append(_unknown_section(name) if isinstance(table, dict) else _unknown_key("", name))
            continue
        if not isinstance(table, dict):
            problems.append(f"[{name}]: expected a table (a [{name}] section), got {_show(table)}")
            continue
        values = _parse_section(name, table, problems)
        _check_order(name, table, values, problems)
        sections[name] = SECTIONS[name](**values)
    if problems:
        count = f"{len(problems)} error" + ("s" if len(problems) > 1 else "")
        raise ConfigError(f"{source}: invalid configuration ({count}):\n  " + "\n  ".join(problems))
    return Config(**sections)


# --- finding and reading the file --------------------------------------------------------------------


def resolve_config_path(cli_value: str | None) -> Tuple[Path, bool]:
    """(path, explicit): the --config flag beats $GPUJOBD_CONFIG beats DEFAULT_CONFIG_PATH.

    An explicit path must exist; the default path may be missing (then the defaults apply).
    """
    if cli_value is not None:
        if not cli_value:
            raise ConfigError("--config: the path is empty")
        return Path(cli_value), True
    from_env = os.environ.get(CONFIG_ENV, "")
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def _read_toml(path: Path, explicit: bool) -> Dict[str, Any] | None:
    """The parsed file, or None for a missing file that nobody named."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: configuration file not found") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None) -> Config:
    """Read the configuration: from `path` if given (it must exist), else as resolve_config_path says."""
    if path is None:
        resolved, explicit = resolve_config_path(None)
    else:
        resolved, explicit = Path(path), True
    data = _read_toml(resolved, explicit)
    if data is None:
        return Config()
    return config_from_mapping(data, source=str(resolved))


# --- writing TOML ------------------------------------------------------------------------------------

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    """A configuration value (bool, int, finite float, str, Path, tuple of str) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def dump_toml(config: Config) -> str:
    """The effective configuration as TOML: every section and key, loadable by load_config."""
    blocks = []
    for section in SECTIONS:
        values = getattr(config, section)
        lines = [f"[{section}]"]
        lines += [f"{s.name} = {toml_value(getattr(values, s.name))}" for s in _BY_SECTION[section].values()]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


_FILE_HEADER = f"""\
# gpujobd configuration ({DEFAULT_CONFIG_PATH}).
#
# Every key is listed at its default value, commented out; uncomment a line to change it.
# Each key's comment says what it means and, in brackets, what it accepts. See
# docs/configuration.md. Check a file and see the effective configuration with:
#   gpujobd --check-config --config /path/to/gpujobd.toml
"""


def default_config_text() -> str:
    """The shipped packaging/gpujobd.toml: every key commented out at its default, with its doc."""
    blocks = [_FILE_HEADER]
    for section in SECTIONS:
        lines = [f"[{section}]"]
        for s in _BY_SECTION[section].values():
            lines += ["", f"# {s.doc} [{s.expected}]", f"# {s.name} = {toml_value(s.default)}"]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
