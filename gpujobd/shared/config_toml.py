"""The configuration file: found, read as TOML, checked strictly into gpujobd.shared.config's dataclasses,
and written back (the effective configuration, and the shipped file with every key at its default).

A file is checked as a whole: every problem (unknown or misspelt key, wrong type, value out of range)
is collected and reported at once in one ConfigError naming the file and each dotted key.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from gpujobd.shared.config import BY_SECTION, SECTIONS, SETTINGS, Config, Setting

# Finding and reading the file live in config_file, which the CLI imports without the rest.
from gpujobd.shared.config_file import CONFIG_ENV, DEFAULT_CONFIG_PATH, read_config_files, resolve_config_path
from gpujobd.shared.errors import ConfigError

__all__ = ["CONFIG_ENV", "DEFAULT_CONFIG_PATH", "config_from_mapping", "load_config", "resolve_config_path"]


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
    guess = _suggest(key, list(BY_SECTION.get(section, {})))
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
    known = BY_SECTION[section]
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
    defaults = {s.name: s.default for s in BY_SECTION[section].values()}
    for s in BY_SECTION[section].values():
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


def load_config(path: str | Path | None = None) -> Config:
    """Read the configuration: from `path` if given (it must exist), else as resolve_config_path says."""
    if path is None:
        resolved, explicit = resolve_config_path(None)
    else:
        resolved, explicit = Path(path), True
    data, source = read_config_files(resolved, explicit)
    if data is None:
        return Config()
    return config_from_mapping(data, source=source)


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
        lines += [f"{s.name} = {toml_value(getattr(values, s.name))}" for s in BY_SECTION[section].values()]
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
        for s in BY_SECTION[section].values():
            lines += ["", f"# {s.doc} [{s.expected}]", f"# {s.name} = {toml_value(s.default)}"]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
