"""Resource properties a user may put on a job's scope (`--property MemoryMax=4G`), parsed strictly.

Each accepted name maps to a parser that turns systemd's text syntax into the (D-Bus signature, value)
that StartTransientUnit takes, as systemd-run would send it. The admin's allowlist (config key
`jobs.allowed_properties`) decides which of these a user may set.
"""

from __future__ import annotations

import decimal
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Set, Tuple

from gpujobd.shared.errors import InvalidArgument

UINT64_MAX = 2**64 - 1
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTPE]?)$")
_SIZE_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
MAX_CPU_INDEX = 8191

Encoded = Tuple[str, str, Any]  # (D-Bus property name, signature, value)


def _bytes(name: str, text: str) -> Encoded:
    if text == "infinity":
        return name, "t", UINT64_MAX
    match = _SIZE.match(text)
    if not match:
        raise ValueError("a size in bytes with an optional K, M, G, T suffix (e.g. 4G), or 'infinity'")
    size = int(decimal.Decimal(match.group(1)) * _SIZE_FACTORS[match.group(2)])
    if size >= UINT64_MAX:
        raise ValueError("a size below 16E, or 'infinity'")
    return name, "t", size


def _cpu_quota(name: str, text: str) -> Encoded:
    if not re.fullmatch(r"\d+(?:\.\d+)?%", text):
        raise ValueError("a percentage of one CPU, e.g. 150% for one and a half CPUs")
    usec = int(decimal.Decimal(text[:-1]) * 10_000)  # exact, as systemd parses it
    if not 1 <= usec < UINT64_MAX:
        raise ValueError("a percentage of one CPU of at least 0.01%, e.g. 150%")
    return "CPUQuotaPerSecUSec", "t", usec


def _weight(name: str, text: str) -> Encoded:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise ValueError("an integer from 1 to 10000")
    return name, "t", int(text)


def _tasks(name: str, text: str) -> Encoded:
    if text == "infinity":
        return name, "t", UINT64_MAX
    if not text.isdigit() or not 1 <= int(text) < UINT64_MAX:
        raise ValueError("a positive integer or 'infinity'")
    return name, "t", int(text)


def _cpu_set(name: str, text: str) -> Encoded:
    cpus: Set[int] = set()
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError("a CPU list like 0-3,8")
        first, last = int(low), int(high or low)
        if first > last or last > MAX_CPU_INDEX:
            raise ValueError(f"a CPU list like 0-3,8 with indexes up to {MAX_CPU_INDEX}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("a non-empty CPU list like 0-3,8")
    mask = bytearray(max(cpus) // 8 + 1)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return name, "ay", bytes(mask)


PARSERS: Mapping[str, Callable[[str, str], Encoded]] = {
    "MemoryMax": _bytes,
    "MemoryHigh": _bytes,
    "MemoryLow": _bytes,
    "MemorySwapMax": _bytes,
    "CPUQuota": _cpu_quota,
    "CPUWeight": _weight,
    "IOWeight": _weight,
    "TasksMax": _tasks,
    "AllowedCPUs": _cpu_set,
    "AllowedMemoryNodes": _cpu_set,
}


def parse_properties(given: Mapping[str, str], allowed: Iterable[str]) -> List[Encoded]:
    """Validate every property at once; raise one InvalidArgument listing every problem."""
    allowed_set = {name for name in allowed if name in PARSERS}
    encoded: List[Encoded] = []
    problems: List[str] = []
    for name, text in given.items():
        if name not in allowed_set:
            problems.append(f"--property {name}: not allowed here; allowed: "
                            f"{', '.join(sorted(allowed_set)) or 'none'}")
            continue
        try:
            encoded.append(PARSERS[name](name, text.strip()))
        except ValueError as err:
            problems.append(f"--property {name}={text}: expected {err}")
    if problems:
        raise InvalidArgument("; ".join(problems))
    return encoded


def split_assignment(text: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidArgument(f"--property {text!r}: expected NAME=VALUE, e.g. MemoryMax=4G")
    return name, value


def as_dict(pairs: Iterable[str]) -> Dict[str, str]:
    return dict(split_assignment(p) for p in pairs)


# --- the admin's defaults and ceilings (jobs.default_properties, jobs.max_properties) ------------------

# Properties whose value is a ceiling: a larger value (or infinity) lifts it.
CEILINGS = ("MemoryMax", "MemoryHigh", "MemorySwapMax", "TasksMax", "CPUQuota")


def admin_properties(settings: Iterable[str]) -> Dict[str, Encoded]:
    """The admin's NAME=VALUE list, parsed with the same parsers as a user's (any name of PARSERS)."""
    given = as_dict(settings)
    return {name: encoded for name, encoded in zip(given, parse_properties(given, PARSERS))}


def with_admin_limits(given: Mapping[str, str], user: List[Encoded], defaults: Iterable[str],
                      maxima: Iterable[str]) -> List[Encoded]:
    """The user's properties, the admin's defaults for those not given, and every ceiling enforced:
    a value above the admin's maximum (infinity included) is refused; a ceiling the job leaves unset
    is set to the maximum."""
    chosen: Dict[str, Encoded] = dict(admin_properties(defaults))
    chosen.update(zip(given, user))
    problems = []
    for name, ceiling in admin_properties(maxima).items():
        if name not in CEILINGS:
            continue
        value = chosen.get(name)
        if value is None:
            chosen[name] = ceiling
        elif value[2] > ceiling[2]:
            problems.append(f"--property {name}={given.get(name, 'the default')}: above this server's "
                            f"ceiling {name}={_ceiling_text(maxima, name)} (jobs.max_properties); ask "
                            "for less")
    if problems:
        raise InvalidArgument("; ".join(problems))
    return list(chosen.values())


def _ceiling_text(maxima: Iterable[str], name: str) -> str:
    return as_dict(maxima)[name]
