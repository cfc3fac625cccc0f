"""Write scripts for the NVML test double (nvml_double.c; format in README.md) from plain data.

    from tests.nvml_double.script import Device, Error, Process, write_script

    write_script(path,
                 devices=[Device(uuid="GPU-0", name="NVIDIA H100 80GB HBM3", memory_total=80 << 30)],
                 processes=[Process(device=0, pid=1234, used_memory=2 << 30)],
                 errors=[Error(1, "nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED")],
                 delays=[Delay("*", "nvmlDeviceGetComputeRunningProcesses", 500)])

Each item may be an instance of its dataclass, a mapping of its fields or a tuple of them in order.
The file is replaced atomically (temp file + rename), so the double, which re-reads it when it
changes, sees either the old script or the new one, and every new one.  This module checks the
shape of the data (nothing can smuggle in an extra line); the double itself rejects unknown
function or error names, loudly, by failing every call with NVML_ERROR_UNKNOWN.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Type, TypeVar, Union

DEFAULT_SCRIPT_PATH = Path("/run/nvml-double/script")
SCRIPT_ENV = "NVML_DOUBLE_SCRIPT"

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
NAME_MAX_BYTES = 95  # NVML_DEVICE_NAME_V2_BUFFER_SIZE - 1
UUID_MAX_BYTES = 95  # NVML_DEVICE_UUID_V2_BUFFER_SIZE - 1
PROCESS_KINDS = ("compute", "graphics", "mps")

_TOKEN = re.compile(r"\S+\Z")
_ERROR_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_FUNCTION = re.compile(r"nvml[A-Za-z0-9_]+\Z")
_BUS_ID = re.compile(r"[0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{1,2}:[0-9A-Fa-f]{1,2}\.0\Z")


@dataclass(frozen=True)
class Device:
    """One GPU.  `index` defaults to its position in `devices`; memory in bytes, utilisation in %."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 80 << 30
    memory_used: int = 0
    util_gpu: int = 0
    util_memory: int = 0
    memory_reserved: int = 0  # included in memory_used; reported apart by nvmlDeviceGetMemoryInfo_v2
    pci_bus_id: Optional[str] = None  # "00000000:65:00.0"; default bus = index + 1
    pci_device_id: Optional[int] = None  # default 0x233010DE
    index: Optional[int] = None
    minor: Optional[int] = None  # nvmlDeviceGetMinorNumber, the N of /dev/nvidiaN; default = index


@dataclass(frozen=True)
class Process:
    """A process with a context on `device`.  used_memory None (or -1) = NVML_VALUE_NOT_AVAILABLE."""

    device: int
    pid: int
    used_memory: Optional[int]
    kind: str = "compute"  # compute | graphics | mps
    gpu_instance_id: Optional[int] = None  # default 0xFFFFFFFF (no MIG), as NVML reports
    compute_instance_id: Optional[int] = None


@dataclass(frozen=True)
class Error:
    """`function` (a symbol, or its unversioned family) returns `error` for `device` (index or "*")."""

    device: Union[int, str]
    function: str
    error: str  # "NOT_SUPPORTED" or "NVML_ERROR_NOT_SUPPORTED"


@dataclass(frozen=True)
class Delay:
    """`function` sleeps `ms` milliseconds first, for `device` (index or "*")."""

    device: Union[int, str]
    function: str
    ms: int


T = TypeVar("T")


def _coerce(cls: Type[T], item: Any) -> T:
    if isinstance(item, cls):
        return item
    if isinstance(item, Mapping):
        return cls(**item)
    if isinstance(item, (tuple, list)):
        return cls(*item)
    raise TypeError(f"expected {cls.__name__}, a mapping or a tuple, got {item!r}")


def _int(what: str, value: Any, lo: int = 0, hi: int = U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _token(what: str, value: Any, pattern: re.Pattern = _TOKEN) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{what}: expected one blank-free token, got {value!r}")
    return value


def _device_ref(what: str, value: Any) -> str:
    return "*" if value == "*" else str(_int(f"{what}.device", value, 0, 63))


def _error_name(what: str, value: Any) -> str:
    if isinstance(value, str) and value.startswith("NVML_ERROR_"):
        value = value[len("NVML_ERROR_"):]
    return _token(what, value, _ERROR_NAME)


def _device_line(index: int, d: Device) -> str:
    where = f"device {index}"
    uuid = _token(f"{where}.uuid", d.uuid)
    if len(uuid.encode()) > UUID_MAX_BYTES:
        raise ValueError(f"{where}.uuid: longer than {UUID_MAX_BYTES} bytes")
    if (not isinstance(d.name, str) or not d.name or d.name != d.name.strip() or "\n" in d.name
            or "\r" in d.name or len(d.name.encode()) > NAME_MAX_BYTES):
        raise ValueError(f"{where}.name: need 1..{NAME_MAX_BYTES} bytes on one line, no outer blanks")
    parts = [f"device {index}", f"uuid={uuid}"]
    total = _int(f"{where}.memory_total", d.memory_total)
    used = _int(f"{where}.memory_used", d.memory_used)
    reserved = _int(f"{where}.memory_reserved", d.memory_reserved)
    if not reserved <= used <= total:
        raise ValueError(f"{where}: need memory_reserved <= memory_used <= memory_total")
    parts += [f"memory_total={total}", f"memory_used={used}", f"memory_reserved={reserved}",
              f"util_gpu={_int(f'{where}.util_gpu', d.util_gpu, 0, U32_MAX)}",
              f"util_memory={_int(f'{where}.util_memory', d.util_memory, 0, U32_MAX)}"]
    if d.pci_bus_id is not None:
        parts.append(f"pci_bus_id={_token(f'{where}.pci_bus_id', d.pci_bus_id, _BUS_ID)}")
    if d.pci_device_id is not None:
        parts.append(f"pci_device_id={_int(f'{where}.pci_device_id', d.pci_device_id, 0, U32_MAX)}")
    if d.minor is not None:
        parts.append(f"minor={_int(f'{where}.minor', d.minor, 0, U32_MAX)}")
    parts.append(f"name={d.name}")  # last: the rest of the line
    return " ".join(parts)


def _process_line(p: Process) -> str:
    what = f"process {p!r}"
    if p.kind not in PROCESS_KINDS:
        raise ValueError(f"{what}: kind must be one of {PROCESS_KINDS}")
    memory = -1 if p.used_memory in (None, -1) else _int(f"{what}.used_memory", p.used_memory)
    parts = [f"process {_int(f'{what}.device', p.device, 0, 63)} {p.kind}",
             f"pid={_int(f'{what}.pid', p.pid, 0, U32_MAX)}", f"used_memory={memory}"]
    if p.gpu_instance_id is not None:
        parts.append(f"gpu_instance_id={_int(f'{what}.gpu_instance_id', p.gpu_instance_id, 0, U32_MAX)}")
    if p.compute_instance_id is not None:
        parts.append(
            f"compute_instance_id={_int(f'{what}.compute_instance_id', p.compute_instance_id, 0, U32_MAX)}")
    return " ".join(parts)


def render_script(
    devices: Iterable[Any] = (),
    processes: Iterable[Any] = (),
    errors: Iterable[Any] = (),
    delays: Iterable[Any] = (),
    init: str = "SUCCESS",
    driver: str = "550.54.14",
) -> str:
    """The script text for this data (what write_script writes)."""
    lines: List[str] = ["# written by tests/nvml_double/script.py",
                        f"init {_error_name('init', init)}",
                        f"driver {_token('driver', driver)}"]
    seen = set()
    for position, item in enumerate(devices):
        d = _coerce(Device, item)
        index = position if d.index is None else _int("device.index", d.index, 0, 63)
        if index in seen:
            raise ValueError(f"device {index} given twice")
        seen.add(index)
        lines.append(_device_line(index, d))
    lines += [_process_line(_coerce(Process, p)) for p in processes]
    for item in errors:
        e = _coerce(Error, item)
        function = _token("error.function", e.function, _FUNCTION)
        name = _error_name("error.error", e.error)
        lines.append(f"error {_device_ref('error', e.device)} {function} {name}")
    for item in delays:
        d = _coerce(Delay, item)
        function = _token("delay.function", d.function, _FUNCTION)
        ms = _int("delay.ms", d.ms, 0, U32_MAX)
        lines.append(f"delay {_device_ref('delay', d.device)} {function} {ms}")
    return "\n".join(lines) + "\n"


def write_text_atomically(path: Union[str, os.PathLike], text: str) -> Path:
    """Replace `path` with `text` by temp file + rename (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_script(
    path: Union[str, os.PathLike],
    devices: Iterable[Any] = (),
    processes: Iterable[Any] = (),
    errors: Iterable[Any] = (),
    delays: Iterable[Any] = (),
    init: str = "SUCCESS",
    driver: str = "550.54.14",
) -> Path:
    """Atomically (re)write the script at `path`; returns the path."""
    text = render_script(devices=devices, processes=processes, errors=errors, delays=delays,
                         init=init, driver=driver)
    return write_text_atomically(path, text)


def remove_script(path: Union[str, os.PathLike]) -> None:
    """Remove the script: nvmlInit then fails with DRIVER_NOT_LOADED, as without a driver."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


__all__ = ["DEFAULT_SCRIPT_PATH", "SCRIPT_ENV", "Delay", "Device", "Error", "Process", "remove_script",
           "render_script", "write_script", "write_text_atomically"]
