"""Values typed as text on a command line: durations, counts, job ids, NAME=VALUE pairs, a command.

Each parser turns one word into a value or raises ValueError with a message that says what was
expected; gpujobctl shows it as a usage error. Parsing only: whether a value is acceptable (a
server's limit, a loop's conditions) is the daemon's to say.
"""

from __future__ import annotations

import re
import shlex
from typing import List, Tuple

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|min|sec|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def job_id(text: str) -> int:
    """A job id: a whole number."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"a job id is a whole number, not {text!r}")
    return int(text)


def count(text: str) -> int:
    """A whole number > 0."""
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise ValueError(f"expected a whole number > 0, not {text!r}")
    return int(text)


def duration(text: str) -> float:
    """Seconds from "90", "1.5", "30s", "10min", "2h", "1h30m"; must be > 0."""
    return _duration(text, allow_zero=False)


def delay(text: str) -> float:
    """A duration like `duration`, where 0 is allowed."""
    return _duration(text, allow_zero=True)


def _duration(text: str, allow_zero: bool) -> float:
    stripped = text.strip()
    pos, total = 0, 0.0
    while pos < len(stripped):
        part = _DURATION_PART.match(stripped, pos)
        if part is None:
            break
        total += float(part.group(1)) * _DURATION_UNITS[(part.group(2) or "s").lower()]
        pos = part.end()
        while pos < len(stripped) and stripped[pos] == " ":
            pos += 1
    if not stripped or pos != len(stripped) or total < 0 or (total == 0 and not allow_zero):
        examples = "0, 500ms, 2s or 1min" if allow_zero else "90, 30s, 10min, 2h or 1h30m"
        raise ValueError(f"expected a duration such as {examples}, got {text!r}")
    return total


def key_value(text: str) -> Tuple[str, str]:
    """NAME=VALUE (the value may hold '=' itself)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def command(text: str) -> List[str]:
    """A command given as one shell-quoted string, split like a shell would (no expansion)."""
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"cannot split {text!r} into words: {error}") from None
    if not words:
        raise ValueError("the command is empty: give it as one quoted string, e.g. "
                         "'python eval.py --every 60'")
    return words


def escaped(value: str) -> str:
    """`value` with every control character (C0, DEL, C1; a newline or an ESC too) written as \\xNN
    and backslashes doubled: safe to show on an admin's terminal or in one log line."""
    return "".join(_escape_char(char) for char in value)


def _escape_char(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if code in (0x2028, 0x2029, 0x200E, 0x200F) or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069:
        return f"\\u{code:04x}"  # line separators and bidirectional overrides reorder what is shown
    return char
