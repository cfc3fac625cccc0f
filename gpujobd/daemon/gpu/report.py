"""What one reading of the GPUs through NVML gives: the devices, the processes on them, and the
exception that says NVML cannot be used now. Plain values, with no NVML in them: the adapter
(gpujobd.daemon.adapters.nvml) makes them, the watcher reads them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

DEVICE_OK = "ok"
DEVICE_LOST = "lost"  # fell off the bus (GPU_IS_LOST)
DEVICE_ERROR = "error"  # no handle: nothing but its index is known

PROCESS_COMPUTE = "C"
PROCESS_GRAPHICS = "G"
PROCESS_BOTH = "C+G"


class NvmlUnavailable(Exception):
    """NVML cannot be used now; the message is NVML's reason (or why the bindings are missing)."""


@dataclass(frozen=True)
class GpuProcess:
    """A process NVML lists on a device. `pid` is what NVML said: untrusted (0, 2**32-1, another
    PID namespace's number and swapped fields have been seen)."""

    pid: int
    type: str  # C, G or C+G, as nvidia-smi writes it
    used_memory_bytes: Optional[int] = None  # None: NVML does not know (not available, not supported)


@dataclass(frozen=True)
class Device:
    index: int
    state: str = DEVICE_OK
    uuid: Optional[str] = None
    name: Optional[str] = None
    minor: Optional[int] = None  # the N of /dev/nvidiaN (nvmlDeviceGetMinorNumber)
    memory_total_bytes: Optional[int] = None
    memory_used_bytes: Optional[int] = None
    utilization_gpu_percent: Optional[int] = None
    utilization_memory_percent: Optional[int] = None
    processes: Tuple[GpuProcess, ...] = ()
    errors: Dict[str, str] = field(default_factory=dict)  # field -> NVML's reason it is missing


@dataclass(frozen=True)
class NvmlReport:
    devices: Tuple[Device, ...]
    driver_version: Optional[str] = None
    taken_at: float = 0.0  # wall clock, when the read began
    duration_s: float = 0.0

    def pids(self) -> List[int]:
        """Every PID any device lists, once each, in order of first appearance."""
        seen: Dict[int, None] = {}
        for device in self.devices:
            for process in device.processes:
                seen.setdefault(process.pid, None)
        return list(seen)


def report_to_json(report: NvmlReport) -> Dict[str, Any]:
    return dataclasses.asdict(report)
