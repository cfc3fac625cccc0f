"""Smoke test of gpujobd's NVML reader against a real NVIDIA GPU and driver: skipped cleanly without one.

    .venv/bin/python -m pytest -q tests/gpu

What NVML says through gpujobd's reader must agree with nvidia-smi (which reads the same NVML): the
devices, their UUIDs and sizes, and the compute processes; a whole watch tick (NVML, /proc,
attribution) must run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import List

import pytest

from gpujobd.daemon.adapters.nvml import Nvml
from gpujobd.daemon.adapters.procfs import ProcFs
from gpujobd.daemon.gpu.nvml_cli import bench_tick
from gpujobd.daemon.gpu.reading import collect
from gpujobd.daemon.gpu.report import NvmlUnavailable
from gpujobd.daemon.gpu.worker import NO_STEPS

pytestmark = pytest.mark.gpu


def smi(*query: str) -> List[str]:
    done = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"nvidia-smi failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def nvml() -> Nvml:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi: no NVIDIA driver on this machine")
    pytest.importorskip("pynvml")
    smi("--query-gpu=uuid")  # skips when the driver is there but no GPU answers
    reader = Nvml()
    try:
        reader.read()
    except NvmlUnavailable as err:
        pytest.fail(f"nvidia-smi works but gpujobd cannot read NVML: {err}")
    yield reader
    reader.shutdown()


def test_devices_agree_with_nvidia_smi(nvml: Nvml) -> None:
    report = nvml.read()
    rows = [row.split(", ") for row in smi("--query-gpu=index,uuid,name,memory.total")]
    assert [d.index for d in report.devices] == [int(r[0]) for r in rows]
    assert [d.uuid for d in report.devices] == [r[1] for r in rows]
    assert [d.name for d in report.devices] == [r[2] for r in rows]
    for device, row in zip(report.devices, rows):
        assert device.state == "ok", device
        assert device.memory_total_bytes is not None
        assert abs(device.memory_total_bytes / 2**20 - float(row[3])) <= 1, "MiB, as nvidia-smi rounds"
        assert device.memory_used_bytes is not None and device.memory_used_bytes <= device.memory_total_bytes
    assert report.driver_version == smi("--query-gpu=driver_version")[0]


def test_a_cuda_process_is_listed_and_attributed(nvml: Nvml) -> None:
    """A process that holds a CUDA context (through the driver API, no toolkit needed) is listed on
    GPU 0 with its PID and attributed through /proc: here to this test's own unit, or no unit."""
    code = ("import ctypes, sys, time\n"
            "cuda = ctypes.CDLL('libcuda.so.1')\n"
            "assert cuda.cuInit(0) == 0\n"
            "dev = ctypes.c_int(); ctx = ctypes.c_void_p()\n"
            "assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0\n"
            "assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0\n"
            "print('ready', flush=True); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        if child.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            pytest.skip(f"could not create a CUDA context: {child.stderr.read()}")  # type: ignore[union-attr]
        snapshot = collect(nvml, ProcFs(), NO_STEPS)
        pids = [p.pid for p in snapshot.report.devices[0].processes]
        assert child.pid in pids, f"NVML lists {pids}, not the CUDA process {child.pid}"
        info = snapshot.processes[child.pid]
        assert info is not None and info.cmdline[0] == sys.executable
        listed = {int(pid) for pid in smi("--query-compute-apps=pid")}
        assert child.pid in listed
    finally:
        child.kill()
        child.wait()


def test_a_whole_tick_runs_and_attributes_everything(nvml: Nvml) -> None:
    result = bench_tick(nvml, repeat=3)
    assert result["devices"] == len(smi("--query-gpu=uuid"))
    assert result["tick_ms_median"] > 0
    print(f"one watch tick on this machine: {result}")
