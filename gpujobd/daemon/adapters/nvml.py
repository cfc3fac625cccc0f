"""NVML through pynvml: the only module of gpujobd that imports pynvml (NVIDIA's nvidia-ml-py).

`Nvml` reads the GPUs: initialised once (again only after a failure), it lists every device (index,
UUID, name, memory, utilisation) and each device's compute and graphics processes with the GPU
memory they use. Every NVML error is handled at the call that raised it: a library or driver that
is missing raises `NvmlUnavailable` with NVML's own reason (bindings that are not installed too);
GPU_IS_LOST marks that one device lost and leaves the others be; NOT_SUPPORTED leaves that one field
out; a permission or other error of one call leaves that field out and says why in the device's
`errors`. It runs on the GPU worker thread (gpujobd.daemon.gpu.worker), never on the main loop, and
names each call that may block through `Steps`. See docs/gpu.md.

A device's process lists are read into a buffer kept per device and list (`_ProcessList`), through
the very C function and struct pynvml's own call uses (looked up with pynvml's function-pointer
lookup); when the bytes NVML wrote are those of the previous read, the previous entries are handed
back, and the device's `processes` is the previous tuple itself, so a reader of the report can tell
"unchanged" by identity. Where that route is missing (other bindings, another pynvml, a symbol this
driver lacks), the plain pynvml call is made, as before.
"""

from __future__ import annotations

import ctypes
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from gpujobd.daemon.gpu.report import (
    DEVICE_ERROR,
    DEVICE_LOST,
    PROCESS_BOTH,
    PROCESS_COMPUTE,
    PROCESS_GRAPHICS,
    Device,
    GpuProcess,
    NvmlReport,
    NvmlUnavailable,
)
from gpujobd.daemon.gpu.worker import NO_STEPS, Steps

# NVML return codes (nvml.h). pynvml defines the same numbers (tests/unit/test_gpu.py checks); they
# are repeated here so that a daemon without pynvml still names them.
NVML_SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_ALREADY_INITIALIZED = 5
ERROR_NOT_FOUND = 6
ERROR_INSUFFICIENT_SIZE = 7
ERROR_DRIVER_NOT_LOADED = 9
ERROR_TIMEOUT = 10
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_UNKNOWN = 999

# Errors that say NVML as a whole is unusable, whichever call returned them: the report becomes
# "unavailable", NVML is shut down, and initialised again on the next (backed-off) try.
FATAL_ERRORS = frozenset({ERROR_UNINITIALIZED, ERROR_DRIVER_NOT_LOADED, ERROR_LIBRARY_NOT_FOUND,
                          ERROR_LIB_RM_VERSION_MISMATCH})
# Errors that say one device is gone; the other devices are read as usual.
LOST_ERRORS = frozenset({ERROR_GPU_IS_LOST})


def import_pynvml() -> Any:
    """The pynvml module (PyPI nvidia-ml-py; Debian and Ubuntu python3-pynvml); NvmlUnavailable,
    naming what to install, when it is missing."""
    try:
        import pynvml
    except ImportError as err:
        raise NvmlUnavailable(
            "the NVML Python bindings are not installed (module pynvml): install the package "
            "python3-pynvml (Debian contrib, Ubuntu multiverse) or the PyPI package nvidia-ml-py "
            f"where gpujobd's python3 finds it, see docs/install.md ({err})") from None
    return pynvml


def _reason(err: BaseException) -> str:
    """NVML's words for an error, with its code: 'Driver Not Loaded (NVML error 9)'."""
    code = getattr(err, "value", None)
    try:
        text = str(err)
    except Exception:  # pynvml asks the library for unknown codes' strings; that may fail too
        text = ""
    text = text or type(err).__name__
    return f"{text} (NVML error {code})" if isinstance(code, int) else text


class _DeviceLost(Exception):
    pass


class Nvml:
    """Reads the GPUs through pynvml (or a module of the same shape: the tests' fake).

    Not thread-safe: one Worker thread is its only user. `read()` initialises NVML when it is not,
    and shuts it down after a failure that makes it unusable, so the next read starts afresh.
    """

    def __init__(self, load: Callable[[], Any] = import_pynvml,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._load = load
        self._clock = clock
        self._monotonic = monotonic
        self._nv: Any = None
        self._initialised = False
        self.driver_version: Optional[str] = None
        # Per GPU index while NVML stays initialised: its handle, UUID and name, which do not change;
        # a tick then makes 4 calls a GPU (memory, utilization, the two process lists), not 7.
        self._static: Dict[int, Tuple[Any, Dict[str, Any]]] = {}
        # Per GPU index while NVML stays initialised: its compute and graphics lists, each with its
        # buffer, the bytes of its latest read and their entries; and the processes merged from them.
        self._lists: Dict[Tuple[int, str], _ProcessList] = {}
        self._merged: Dict[int, Tuple[_Entries, _Entries, Tuple[GpuProcess, ...]]] = {}
        self._route: Optional[_DirectRoute] = None  # the direct route, found again at each init

    @property
    def initialised(self) -> bool:
        return self._initialised

    def read(self, steps: Steps = NO_STEPS) -> NvmlReport:
        """Every device and its processes. Raises NvmlUnavailable when NVML cannot be used."""
        taken_at, started = self._clock(), self._monotonic()
        try:
            self._init(steps)
            with steps.step("nvmlDeviceGetCount"):
                count = self._nv.nvmlDeviceGetCount()
            devices = tuple(self._device(steps, index) for index in range(int(count)))
        except NvmlUnavailable:
            self._shutdown(steps)
            raise
        except Exception as err:
            if self._is_nvml_error(err) or self._nv is None:
                self._shutdown(steps)
                raise NvmlUnavailable(_reason(err)) from None
            self._shutdown(steps)
            raise NvmlUnavailable(f"NVML failed unexpectedly: {type(err).__name__}: {err}") from None
        return NvmlReport(devices=devices, driver_version=self.driver_version, taken_at=taken_at,
                          duration_s=self._monotonic() - started)

    def shutdown(self, steps: Steps = NO_STEPS) -> None:
        self._shutdown(steps)

    # -- one device ----------------------------------------------------------------------------------
    def _device(self, steps: Steps, index: int) -> Device:
        errors: Dict[str, str] = {}
        static = self._static.get(index)
        if static is None:
            try:
                handle = self._call(steps, f"nvmlDeviceGetHandleByIndex({index})",
                                    self._nv.nvmlDeviceGetHandleByIndex, index)
            except _DeviceLost as lost:
                return Device(index=index, state=DEVICE_LOST, errors={"device": str(lost)})
            except _FieldError as err:
                return Device(index=index, state=DEVICE_ERROR, errors={"device": str(err)})
        else:
            handle = static[0]
        values: Dict[str, Any] = {}
        try:
            if static is None:
                values["uuid"] = self._field(steps, index, "uuid", errors, self._nv.nvmlDeviceGetUUID, handle)
                values["name"] = self._field(steps, index, "name", errors, self._nv.nvmlDeviceGetName, handle)
                get_minor = getattr(self._nv, "nvmlDeviceGetMinorNumber", None)  # not on every platform
                if get_minor is not None:
                    minor = self._field(steps, index, "minor", errors, get_minor, handle)
                    values["minor"] = _int_or_none(minor)
                if not errors:
                    self._static[index] = (handle, dict(values))
            else:
                values.update(static[1])
            memory = self._field(steps, index, "memory", errors, self._nv.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                values["memory_total_bytes"] = _int_or_none(getattr(memory, "total", None))
                values["memory_used_bytes"] = _int_or_none(getattr(memory, "used", None))
            rates = self._field(steps, index, "utilization", errors,
                                self._nv.nvmlDeviceGetUtilizationRates, handle)
            if rates is not None:
                values["utilization_gpu_percent"] = _int_or_none(getattr(rates, "gpu", None))
                values["utilization_memory_percent"] = _int_or_none(getattr(rates, "memory", None))
            compute = self._processes(steps, index, PROCESS_COMPUTE, errors, handle)
            graphics = self._processes(steps, index, PROCESS_GRAPHICS, errors, handle)
        except _DeviceLost as lost:
            self._forget(index)
            errors["device"] = str(lost)
            return Device(index=index, state=DEVICE_LOST, errors=errors,
                          **{k: v for k, v in values.items() if k in ("uuid", "name")})
        merged = self._merged.get(index)
        if merged is not None and merged[0] is compute and merged[1] is graphics:
            values["processes"] = merged[2]  # neither list changed: the very tuple of the last read
        else:
            values["processes"] = _merge_processes(compute, graphics)
            self._merged[index] = (compute, graphics, values["processes"])
        return Device(index=index, errors=errors, **values)

    def _forget(self, index: int) -> None:
        self._static.pop(index, None)
        self._merged.pop(index, None)
        for kind in (PROCESS_COMPUTE, PROCESS_GRAPHICS):
            self._lists.pop((index, kind), None)

    def _processes(self, steps: Steps, index: int, kind: str, errors: Dict[str, str],
                   handle: Any) -> _Entries:
        """One process list of one device as (pid, used memory) entries: the very tuple of the
        previous read when NVML's list is the same; () when the call failed (noted in `errors`, as any
        field's). Through the direct route where there is one, else the plain pynvml call."""
        name = "compute_processes" if kind == PROCESS_COMPUTE else "graphics_processes"
        listed = self._lists.get((index, kind))
        if listed is None:
            listed = self._lists[index, kind] = _ProcessList()
        route = self._route
        direct = route.function(kind) if route is not None else None
        if route is not None and direct is not None:
            call = _DirectCall(direct, _PLAIN[kind], listed, route, self._nv)
            try:
                entries = self._field(steps, index, name, errors, call, handle)
                return entries if entries is not None else ()
            except _RouteFailed:  # ctypes refused the call: this list goes the plain way from now on
                route.give_up(kind)
        plain = self._field(steps, index, name, errors, getattr(self._nv, _PLAIN[kind]), handle)
        return listed.same_or(_entries_of(plain or ()))

    def _field(self, steps: Steps, index: int, name: str, errors: Dict[str, str],
               fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call for one field: its value, or None (NOT_SUPPORTED: silently; other errors:
        noted in `errors`). GPU_IS_LOST raises _DeviceLost, fatal errors NvmlUnavailable."""
        try:
            value = self._call(steps, f"{fn.__name__}(GPU {index})", fn, *args)
        except _FieldError as err:
            if err.code != ERROR_NOT_SUPPORTED:
                errors[name] = str(err)
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value

    def _call(self, steps: Steps, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            with steps.step(what):
                return fn(*args)
        except Exception as err:
            if self._is_mismatch(err):  # pynvml: this one function's struct differs from the driver's
                raise _FieldError(None, f"{type(err).__name__}: {err}") from None
            if not self._is_nvml_error(err):
                raise
            code = getattr(err, "value", None)
            if code in FATAL_ERRORS:
                raise NvmlUnavailable(f"{what}: {_reason(err)}") from None
            if code in LOST_ERRORS:
                raise _DeviceLost(_reason(err)) from None
            raise _FieldError(code, _reason(err)) from None

    # -- init and shutdown ---------------------------------------------------------------------------
    def _init(self, steps: Steps) -> None:
        if self._initialised:
            return
        if self._nv is None:
            self._nv = self._load()
        try:
            with steps.step("nvmlInit"):
                self._nv.nvmlInit()
        except Exception as err:
            if self._is_nvml_error(err):
                raise NvmlUnavailable(_reason(err)) from None
            raise NvmlUnavailable(f"nvmlInit failed: {type(err).__name__}: {err}") from None
        self._initialised = True
        self._route = _DirectRoute.of(self._nv)
        try:
            with steps.step("nvmlSystemGetDriverVersion"):
                version = self._nv.nvmlSystemGetDriverVersion()
            self.driver_version = version.decode() if isinstance(version, bytes) else str(version)
        except Exception as err:
            if not self._is_nvml_error(err):
                raise
            self.driver_version = None

    def _shutdown(self, steps: Steps) -> None:
        if not self._initialised:
            return
        self._initialised = False
        self._static.clear()  # handles are valid only while NVML stays initialised
        self._lists.clear()
        self._merged.clear()
        self._route = None
        try:
            with steps.step("nvmlShutdown"):
                self._nv.nvmlShutdown()
        except Exception as err:  # already unusable: nothing to tell beyond the first error
            if not self._is_nvml_error(err):
                raise

    def _is_mismatch(self, err: BaseException) -> bool:
        error_class = getattr(self._nv, "NVMLLibraryMismatchError", None)
        return isinstance(error_class, type) and isinstance(err, error_class)

    def _is_nvml_error(self, err: BaseException) -> bool:
        error_class = getattr(self._nv, "NVMLError", None)
        return isinstance(error_class, type) and isinstance(err, error_class)


class _FieldError(Exception):
    def __init__(self, code: Optional[int], reason: str):
        super().__init__(reason)
        self.code = code


def _int_or_none(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


# NVML's "not available" for unsigned long long (pynvml already maps it to None for usedGpuMemory).
_NOT_AVAILABLE_ULL = 2**64 - 1


_Entries = Tuple[Tuple[int, Optional[int]], ...]  # (pid, used memory or None), as NVML listed them
_PLAIN = {PROCESS_COMPUTE: "nvmlDeviceGetComputeRunningProcesses",
          PROCESS_GRAPHICS: "nvmlDeviceGetGraphicsRunningProcesses"}


def _entries_of(listed: Any) -> _Entries:
    """pynvml's process objects as entries; those without an integer PID are left out."""
    entries = []
    for info in listed:
        pid = _int_or_none(getattr(info, "pid", None))
        if pid is None:
            continue
        memory = _int_or_none(getattr(info, "usedGpuMemory", None))
        entries.append((pid, None if memory == _NOT_AVAILABLE_ULL else memory))
    return tuple(entries)


def _merge_processes(compute: _Entries, graphics: _Entries) -> Tuple[GpuProcess, ...]:
    """One entry per PID: a process in both lists is C+G; its memory is the larger figure given."""
    merged: Dict[int, GpuProcess] = {}
    for kind, listed in ((PROCESS_COMPUTE, compute), (PROCESS_GRAPHICS, graphics)):
        for pid, memory in listed:
            earlier = merged.get(pid)
            if earlier is None:
                merged[pid] = GpuProcess(pid=pid, type=kind, used_memory_bytes=memory)
                continue
            both = PROCESS_BOTH if earlier.type != kind else kind
            known = [m for m in (earlier.used_memory_bytes, memory) if m is not None]
            merged[pid] = GpuProcess(pid=pid, type=both, used_memory_bytes=max(known) if known else None)
    return tuple(merged.values())


# --- the direct route to the process lists ---------------------------------------------------------------

# The first buffer of a list holds this many entries; a list that outgrows its buffer gets one of twice
# its length and a few more (as pynvml's own call sizes its second one), kept from then on.
_FIRST_CAPACITY = 32
_TRIES = 3  # reads of one list that may find it grown past the buffer before INSUFFICIENT_SIZE stands
_MOST_ENTRIES = 1 << 16  # a list NVML says is longer is not believed (a GPU runs far fewer processes)


class _ProcessList:
    """One device's compute or graphics list across reads: the ctypes buffer NVML writes into, the bytes
    of the latest read and the entries parsed from them. Worker thread only."""

    def __init__(self) -> None:
        self.buffer: Any = None
        self.capacity = 0
        self.count = ctypes.c_uint(0)
        self.raw: Optional[bytes] = None
        self.entries: _Entries = ()

    def same_or(self, entries: _Entries) -> _Entries:
        """The entries of the previous read if equal to these (that tuple itself), else these."""
        if entries == self.entries:
            return self.entries
        self.entries, self.raw = entries, None
        return entries


class _DirectRoute:
    """pynvml's own C function pointers for the versioned process-list functions its plain calls use
    (`_v3`), with its struct type for them. Neither is pynvml's documented API, so both are checked at
    each init: no lookup, a struct of another layout, or a symbol this library lacks leaves that list
    to the plain pynvml call (which then fails or not, as it always did)."""

    SYMBOLS = {PROCESS_COMPUTE: "nvmlDeviceGetComputeRunningProcesses_v3",
               PROCESS_GRAPHICS: "nvmlDeviceGetGraphicsRunningProcesses_v3"}

    def __init__(self, record: Any, layout: struct.Struct, functions: Dict[str, Any]):
        self.record = record
        self.size = ctypes.sizeof(record)
        self.layout = layout
        self._functions = functions

    @classmethod
    def of(cls, nv: Any) -> Optional[_DirectRoute]:
        """The route through this pynvml module, once NVML is initialised; None where there is none."""
        lookup = getattr(nv, "_nvmlGetFunctionPointer", None)
        record = getattr(nv, "c_nvmlProcessInfo_v3_t", None)
        if not callable(lookup) or not isinstance(record, type) or not issubclass(record, ctypes.Structure):
            return None
        layout = _record_layout(record)
        if layout is None:
            return None
        functions = {}
        for kind, symbol in cls.SYMBOLS.items():
            try:
                functions[kind] = lookup(symbol)
            except Exception:  # FUNCTION_NOT_FOUND (an older driver), or a lookup of another shape
                continue
        return cls(record, layout, functions) if functions else None

    def function(self, kind: str) -> Any:
        return self._functions.get(kind)

    def give_up(self, kind: str) -> None:
        self._functions.pop(kind, None)

    def buffer(self, capacity: int) -> Any:
        return (self.record * capacity)()


def _record_layout(record: Any) -> Optional[struct.Struct]:
    """How to read (pid, usedGpuMemory) out of the bytes of `record` (pynvml's process-info struct): a
    32-bit pid and a 64-bit memory figure at their offsets; None for any other shape."""
    try:
        pid, memory = record.pid, record.usedGpuMemory
    except AttributeError:
        return None
    size = ctypes.sizeof(record)
    if (pid.size, memory.size) != (4, 8) or pid.offset + 4 > memory.offset or memory.offset + 8 > size:
        return None
    return struct.Struct(f"={pid.offset}xI{memory.offset - pid.offset - 4}xQ{size - memory.offset - 8}x")


class _RouteFailed(Exception):
    pass


class _DirectCall:
    """One read of one list through the direct route, called as `fn(handle)` by Nvml._field, which
    names it as the plain call is named and maps NVML's errors. NVML's size protocol: the buffer's
    capacity goes in; INSUFFICIENT_SIZE gives back the count needed, and the read is made again with
    room for it (and a few more), up to _TRIES times."""

    def __init__(self, fn: Any, name: str, listed: _ProcessList, route: _DirectRoute, nv: Any):
        self._fn = fn
        self.__name__ = name
        self._listed = listed
        self._route = route
        self._nv = nv

    def __call__(self, handle: Any) -> _Entries:
        listed, route = self._listed, self._route
        code = ERROR_INSUFFICIENT_SIZE
        for _ in range(_TRIES):
            if listed.buffer is None:
                listed.capacity = max(listed.capacity, _FIRST_CAPACITY)
                listed.buffer = route.buffer(listed.capacity)
            listed.count.value = listed.capacity
            try:
                code = self._fn(handle, ctypes.byref(listed.count), listed.buffer)
            except (ctypes.ArgumentError, TypeError) as err:
                raise _RouteFailed(str(err)) from None
            if code == NVML_SUCCESS:
                return _parsed(listed, route, min(listed.count.value, listed.capacity))
            needed = listed.count.value
            if code != ERROR_INSUFFICIENT_SIZE or not listed.capacity < needed <= _MOST_ENTRIES:
                break  # an error, or a size NVML cannot mean: the call's error stands
            listed.capacity, listed.buffer = min(needed * 2 + 5, _MOST_ENTRIES), None
        raise self._nv.NVMLError(code)


def _parsed(listed: _ProcessList, route: _DirectRoute, count: int) -> _Entries:
    raw = ctypes.string_at(listed.buffer, count * route.size)
    if raw == listed.raw:
        return listed.entries
    entries: List[Tuple[int, Optional[int]]] = []
    for pid, memory in route.layout.iter_unpack(raw):
        entries.append((pid, None if memory == _NOT_AVAILABLE_ULL else memory))
    listed.raw, listed.entries = raw, tuple(entries)
    return listed.entries
