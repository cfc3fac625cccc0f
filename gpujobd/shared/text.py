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
# Slurm's time formats with a colon or a day: MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS. (A bare
# number stays seconds here, as everywhere in gpujobd, where Slurm would read minutes.)
_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+(?:\.\d*)?))?")


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


def line_count(text: str) -> int:
    """A whole number >= 0 (0 lines is a valid tail: `logs -f -n 0`)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected a whole number of lines, not {text!r}")
    return int(text)


def duration(text: str) -> float:
    """Seconds from "90", "1.5", "30s", "10min", "2h", "1h30m", or Slurm's "1:30:00", "2-00:00:00";
    must be > 0."""
    return _duration(text, allow_zero=False)


def delay(text: str) -> float:
    """A duration like `duration`, where 0 is allowed."""
    return _duration(text, allow_zero=True)


def _duration(text: str, allow_zero: bool) -> float:
    stripped = text.strip()
    if ":" in stripped or re.match(r"\d+-", stripped):
        return _slurm_duration(text, allow_zero)
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


def _slurm_duration(text: str, allow_zero: bool) -> float:
    """Slurm's [D-]HH:MM:SS family: MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    match = _SLURM_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a time such as 90s, 1:30:00 (HH:MM:SS) or 2-12:00:00 (D-HH:MM:SS), "
                         f"got {text!r}")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        parts = [float(days) * 24 + float(first), float(second or 0), float(third or 0)]
    elif third is not None:  # HH:MM:SS
        parts = [float(first), float(second), float(third)]
    else:  # MM:SS
        parts = [0.0, float(first), float(second or 0)]
    total = parts[0] * 3600 + parts[1] * 60 + parts[2]
    if total == 0 and not allow_zero:
        raise ValueError(f"expected a duration above 0, got {text!r}")
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
                         "'python3 eval.py --every 60'")
    return words


def whole(text: str) -> int:
    """A whole number >= 0."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected a whole number (0 or more), not {text!r}")
    return int(text)


def integer(text: str) -> int:
    """A whole number, possibly negative (a priority)."""
    body = text[1:] if text[:1] in "+-" else text
    if not (body.isascii() and body.isdigit()):
        raise ValueError(f"expected a whole number such as 5 or -3, not {text!r}")
    return int(text)


def job_ids(text: str) -> Tuple[int, ...]:
    """ID[,ID...]: job ids, in the order given, each once."""
    words = [word.strip() for word in text.split(",")]
    if not words or not all(words):
        raise ValueError(f"expected job ids separated by commas (12,15), not {text!r}")
    seen: List[int] = []
    for word in words:
        number = job_id(word)
        if number not in seen:
            seen.append(number)
    return tuple(seen)


MAX_ARRAY_TASKS = 10_000
_RANGE = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")


def array(text: str) -> Tuple[Tuple[int, ...], int]:
    """Slurm's --array: "0-19", "1,3,5", "0-15:4" (a step), each with an optional "%K" (at most K
    tasks at once) -> (the indices in order, each once; K or 0 for no limit)."""
    body, percent, limit_text = text.strip().partition("%")
    limit = 0
    if percent:
        if not (limit_text.isascii() and limit_text.isdigit()) or int(limit_text) == 0:
            raise ValueError(f"in --array {text!r}, %K needs a whole number > 0 after '%'")
        limit = int(limit_text)
    indices: List[int] = []
    for part in body.split(","):
        found = _RANGE.fullmatch(part.strip())
        if found is None:
            raise ValueError(f"expected an array such as 0-19, 1,3,5 or 0-19%4, not {text!r}")
        first, last, step = int(found.group(1)), found.group(2), int(found.group(3) or 1)
        end = int(last) if last is not None else first
        if end < first or step == 0:
            raise ValueError(f"in --array {text!r}, {part.strip()!r} is an empty range: "
                             "write A-B with A <= B")
        indices.extend(range(first, end + 1, step))
        if len(indices) > MAX_ARRAY_TASKS:
            raise ValueError(f"--array {text!r} has more than {MAX_ARRAY_TASKS} tasks: split it")
    return tuple(dict.fromkeys(indices)), limit


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
