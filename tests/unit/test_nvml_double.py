"""The NVML test double (tests/nvml_double) driven by the real pynvml.

pynvml dlopens "libnvidia-ml.so.1" by name, once per process, and dlopen hands back any library
of that soname already loaded, so every check runs in a fresh Python subprocess whose
LD_LIBRARY_PATH starts with the double's directory and whose NVML_DOUBLE_SCRIPT names the test's
script.  Nothing here loads the double into the pytest process itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest

from tests.nvml_double import LIBRARY_NAME, build, environ
from tests.nvml_double.script import Delay, Device, Error, Process, remove_script, render_script, write_script

GIB = 1 << 30

# Run first in every child: pynvml plus helpers that turn results and NVML errors into JSON.
PRELUDE = '''
import ctypes, json, sys, threading, time
import pynvml

def attempt(fn, *args):
    """{"ok": result} or {"error": pynvml exception class name, "value": NVML return code}."""
    try:
        return {"ok": plain(fn(*args))}
    except pynvml.NVMLError as e:
        return {"error": type(e).__name__, "value": e.value}

def plain(value):
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, ctypes.Structure):
        return {name: plain(getattr(value, name)) for name, *_ in value._fields_}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return {k: plain(v) for k, v in vars(value).items()}
    return value.decode() if isinstance(value, bytes) else value

def handle(i):
    return pynvml.nvmlDeviceGetHandleByIndex(i)

def emit(value):
    print(json.dumps(value), flush=True)
'''


@pytest.fixture(scope="session")
def nvml_libdir() -> Path:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) to build the NVML double with")
    return build()


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return tmp_path / "nvml-script"


def run_pynvml(libdir: Path, script: Path, code: str, timeout: float = 60) -> Any:
    """Run PRELUDE + code in a fresh interpreter against the double; return what it emit()ted last."""
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        env=environ(libdir, script), capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


def two_devices(script: Path, **kwargs: Any) -> None:
    write_script(script, devices=[
        Device(uuid="GPU-6e4f2b3c-9d1a-4c2e-8f00-0123456789ab", name="NVIDIA H100 80GB HBM3",
               memory_total=80 * GIB, memory_used=3 * GIB + 17, memory_reserved=512 << 20,
               util_gpu=87, util_memory=41, pci_bus_id="00000000:1B:00.0"),
        Device(uuid="GPU-00000000-1111-2222-3333-444444444444", name="Tesla  T4 (two blanks)",
               memory_total=16 * GIB, memory_used=0, util_gpu=0, util_memory=100, minor=7),
    ], **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Initialisation


def test_no_script_means_driver_not_loaded_and_the_double_is_what_pynvml_loaded(nvml_libdir, script):
    remove_script(script)
    out = run_pynvml(nvml_libdir, script, """
        r = attempt(pynvml.nvmlInit)
        maps = [line.split()[-1] for line in open("/proc/self/maps") if "libnvidia-ml" in line]
        emit({"init": r, "maps": sorted(set(maps)), "double": hasattr(pynvml.nvmlLib, "nvml_double_sizeof")})
    """)
    assert out["init"] == {"error": "NVMLError_DriverNotLoaded", "value": 9}
    assert out["maps"] == [str(nvml_libdir / LIBRARY_NAME)]
    assert out["double"] is True


@pytest.mark.parametrize(("init", "cls"), [
    ("NO_PERMISSION", "NVMLError_NoPermission"),
    ("LIBRARY_NOT_FOUND", "NVMLError_LibraryNotFound"),
    ("DRIVER_NOT_LOADED", "NVMLError_DriverNotLoaded"),
    ("UNKNOWN", "NVMLError_Unknown"),
])
def test_init_failure_is_scripted(nvml_libdir, script, init, cls):
    two_devices(script, init=init)
    out = run_pynvml(nvml_libdir, script, """
        emit([attempt(pynvml.nvmlInit), attempt(pynvml.nvmlDeviceGetCount)])
    """)
    assert out[0]["error"] == cls
    assert out[1]["error"] == "NVMLError_Uninitialized"  # a failed init leaves the library uninitialised


def test_calls_outside_init_and_shutdown_are_uninitialized(nvml_libdir, script):
    two_devices(script)
    out = run_pynvml(nvml_libdir, script, """
        pynvml._LoadNvmlLibrary()
        before = attempt(pynvml.nvmlDeviceGetCount)
        pynvml.nvmlInit(); pynvml.nvmlInit()  # reference counted, like NVML
        pynvml.nvmlShutdown()
        middle = attempt(pynvml.nvmlDeviceGetCount)
        pynvml.nvmlShutdown()
        emit([before, middle, attempt(pynvml.nvmlDeviceGetCount), attempt(pynvml.nvmlShutdown)])
    """)
    assert out == [{"error": "NVMLError_Uninitialized", "value": 1}, {"ok": 2},
                   {"error": "NVMLError_Uninitialized", "value": 1},
                   {"error": "NVMLError_Uninitialized", "value": 1}]


# ----------------------------------------------------------------------------------------------------------
# Reading devices back


def test_two_devices_read_back_exactly(nvml_libdir, script):
    two_devices(script, driver="550.54.14")
    out = run_pynvml(nvml_libdir, script, """
        pynvml.nvmlInit()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = handle(i)
            devices.append({
                "index": pynvml.nvmlDeviceGetIndex(h),
                "minor": pynvml.nvmlDeviceGetMinorNumber(h),
                "uuid": pynvml.nvmlDeviceGetUUID(h),
                "name": pynvml.nvmlDeviceGetName(h),
                "memory": plain(pynvml.nvmlDeviceGetMemoryInfo(h)),
                "memory_v2": plain(pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)),
                "util": plain(pynvml.nvmlDeviceGetUtilizationRates(h)),
                "pci": plain(pynvml.nvmlDeviceGetPciInfo(h)),
            })
        emit({"driver": pynvml.nvmlSystemGetDriverVersion(), "devices": devices,
              "out_of_range": attempt(pynvml.nvmlDeviceGetHandleByIndex, 2)})
    """)
    assert out["driver"] == "550.54.14"
    d0, d1 = out["devices"]
    assert (d0["index"], d0["uuid"], d0["name"]) == (0, "GPU-6e4f2b3c-9d1a-4c2e-8f00-0123456789ab",
                                                     "NVIDIA H100 80GB HBM3")
    assert (d1["index"], d1["uuid"], d1["name"]) == (1, "GPU-00000000-1111-2222-3333-444444444444",
                                                     "Tesla  T4 (two blanks)")
    assert (d0["minor"], d1["minor"]) == (0, 7)  # the index by default, else as scripted
    assert d0["memory"] == {"total": 80 * GIB, "used": 3 * GIB + 17, "free": 77 * GIB - 17}
    assert d0["memory_v2"] == {"version": 0x02000028, "total": 80 * GIB, "reserved": 512 << 20,
                               "used": 3 * GIB + 17 - (512 << 20), "free": 77 * GIB - 17}
    assert d1["memory"] == {"total": 16 * GIB, "used": 0, "free": 16 * GIB}
    assert d0["util"] == {"gpu": 87, "memory": 41}
    assert d1["util"] == {"gpu": 0, "memory": 100}
    assert d0["pci"]["busId"] == "00000000:1B:00.0"
    assert d0["pci"]["busIdLegacy"] == "0000:1B:00.0"
    assert (d0["pci"]["bus"], d0["pci"]["pciDeviceId"]) == (0x1B, 0x233010DE)
    assert out["out_of_range"]["error"] == "NVMLError_InvalidArgument"


def test_struct_sizes_of_pynvml_match_nvml_h(nvml_libdir, script):
    remove_script(script)
    out = run_pynvml(nvml_libdir, script, """
        pynvml._LoadNvmlLibrary()
        size = pynvml.nvmlLib.nvml_double_sizeof
        size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_char_p]
        pairs = {
            "nvmlProcessInfo_v2_t": pynvml.c_nvmlProcessInfo_v2_t,
            "nvmlProcessInfo_t": pynvml.c_nvmlProcessInfo_t,
            "nvmlMemory_t": pynvml.c_nvmlMemory_t,
            "nvmlMemory_v2_t": pynvml.c_nvmlMemory_v2_t,
            "nvmlUtilization_t": pynvml.c_nvmlUtilization_t,
            "nvmlPciInfo_t": pynvml.nvmlPciInfo_t,
        }
        emit({name: [size(name.encode()), ctypes.sizeof(cls)] for name, cls in pairs.items()})
    """)
    for name, (c_size, ctypes_size) in out.items():
        assert c_size == ctypes_size != 0, name


# ----------------------------------------------------------------------------------------------------------
# Processes


def test_compute_and_graphics_processes_with_their_memory(nvml_libdir, script):
    compute = [Process(0, pid=1000 + i, used_memory=i * (1 << 20)) for i in range(100)]
    compute += [Process(0, pid=0, used_memory=None), Process(0, pid=4294967295, used_memory=7)]
    graphics = [Process(0, pid=4242, used_memory=GIB, kind="graphics"),
                Process(1, pid=77, used_memory=1, kind="graphics", gpu_instance_id=3, compute_instance_id=0)]
    write_script(script, devices=[Device(uuid="GPU-a"), Device(uuid="GPU-b")], processes=compute + graphics)
    out = run_pynvml(nvml_libdir, script, """
        pynvml.nvmlInit()
        emit([{
            "compute": attempt(pynvml.nvmlDeviceGetComputeRunningProcesses, handle(i)),
            "compute_v2": attempt(pynvml.nvmlDeviceGetComputeRunningProcesses_v2, handle(i)),
            "graphics": attempt(pynvml.nvmlDeviceGetGraphicsRunningProcesses, handle(i)),
            "graphics_v2": attempt(pynvml.nvmlDeviceGetGraphicsRunningProcesses_v2, handle(i)),
        } for i in range(2)])
    """)
    no_mig = {"gpuInstanceId": 0xFFFFFFFF, "computeInstanceId": 0xFFFFFFFF}
    want_compute = [{"pid": 1000 + i, "usedGpuMemory": i * (1 << 20), **no_mig} for i in range(100)]
    # pynvml turns NVML_VALUE_NOT_AVAILABLE (0xFFFFFFFFFFFFFFFF) into None; PIDs come through raw.
    want_compute += [{"pid": 0, "usedGpuMemory": None, **no_mig},
                     {"pid": 4294967295, "usedGpuMemory": 7, **no_mig}]
    dev0, dev1 = out
    assert dev0["compute"] == dev0["compute_v2"] == {"ok": want_compute}
    assert dev0["graphics"] == dev0["graphics_v2"] == {"ok": [{"pid": 4242, "usedGpuMemory": GIB, **no_mig}]}
    assert dev1["compute"] == dev1["compute_v2"] == {"ok": []}
    mig = {"gpuInstanceId": 3, "computeInstanceId": 0}
    assert dev1["graphics"] == {"ok": [{"pid": 77, "usedGpuMemory": 1, **mig}]}


def test_process_list_size_protocol_at_the_c_abi(nvml_libdir, script):
    write_script(script, devices=[Device(uuid="GPU-a"), Device(uuid="GPU-b")],
                 processes=[Process(0, pid=10 + i, used_memory=100 + i) for i in range(7)])
    out = run_pynvml(nvml_libdir, script, """
        pynvml.nvmlInit()
        lib = pynvml.nvmlLib
        h0, h1 = handle(0), handle(1)
        v3 = lib.nvmlDeviceGetComputeRunningProcesses_v3
        Info = pynvml.c_nvmlProcessInfo_t
        class InfoV1(ctypes.Structure):  # nvmlProcessInfo_v1_t, which pynvml no longer declares
            _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]
        res = {}
        n = ctypes.c_uint(0)
        res["probe"] = [v3(h0, ctypes.byref(n), None), n.value]
        small = (Info * 6)(); n = ctypes.c_uint(6)
        res["small"] = [v3(h0, ctypes.byref(n), small), n.value, small[0].pid]
        big = (Info * 20)(); n = ctypes.c_uint(20)
        res["big"] = [v3(h0, ctypes.byref(n), big), n.value, [big[i].pid for i in range(n.value)]]
        n = ctypes.c_uint(3)
        res["null_with_count"] = [v3(h0, ctypes.byref(n), None)]
        res["null_count"] = [v3(h0, None, big)]
        n = ctypes.c_uint(0)
        res["empty"] = [v3(h1, ctypes.byref(n), None), n.value]
        legacy = (InfoV1 * 7)(); n = ctypes.c_uint(7)
        res["v1"] = [lib.nvmlDeviceGetComputeRunningProcesses(h0, ctypes.byref(n), legacy), n.value,
                     [[legacy[i].pid, legacy[i].usedGpuMemory] for i in range(7)]]
        emit(res)
    """)
    success, invalid_argument, insufficient_size = 0, 2, 7
    assert out["probe"] == [insufficient_size, 7]
    assert out["small"] == [insufficient_size, 7, 0]  # count says what is needed; nothing written
    assert out["big"] == [success, 7, list(range(10, 17))]
    assert out["null_with_count"] == [invalid_argument]
    assert out["null_count"] == [invalid_argument]
    assert out["empty"] == [success, 0]
    assert out["v1"] == [success, 7, [[10 + i, 100 + i] for i in range(7)]]


# ----------------------------------------------------------------------------------------------------------
# Scripted errors and delays


@pytest.mark.parametrize(("device", "function", "error", "cls"), [
    (1, "nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED", "NVMLError_NotSupported"),
    (0, "nvmlDeviceGetComputeRunningProcesses", "GPU_IS_LOST", "NVMLError_GpuIsLost"),
    (1, "nvmlDeviceGetMemoryInfo", "NO_PERMISSION", "NVMLError_NoPermission"),
    (0, "nvmlDeviceGetGraphicsRunningProcesses", "NVML_ERROR_UNKNOWN", "NVMLError_Unknown"),
    (1, "nvmlDeviceGetHandleByIndex", "GPU_IS_LOST", "NVMLError_GpuIsLost"),
])
def test_scripted_error_hits_one_call_of_one_device(nvml_libdir, script, device, function, error, cls):
    two_devices(script, processes=[Process(0, pid=5, used_memory=1), Process(1, pid=6, used_memory=2)],
                errors=[Error(device, function, error)])
    out = run_pynvml(nvml_libdir, script, f"""
        pynvml.nvmlInit()
        fn = getattr(pynvml, {function!r})
        arg = (lambda i: i) if fn is pynvml.nvmlDeviceGetHandleByIndex else handle
        emit([attempt(fn, arg(i)) for i in range(2)]
             + [attempt(pynvml.nvmlDeviceGetName, handle({1 - device}))])
    """)
    assert out[device]["error"] == cls
    assert "ok" in out[1 - device], out  # the other device answers the same call
    assert "ok" in out[2]


def test_scripted_insufficient_size_is_what_pynvml_sees_when_the_list_outgrows_it(nvml_libdir, script):
    two_devices(script, errors=[Error(0, "nvmlDeviceGetComputeRunningProcesses", "INSUFFICIENT_SIZE")])
    out = run_pynvml(nvml_libdir, script, """
        pynvml.nvmlInit()
        emit(attempt(pynvml.nvmlDeviceGetComputeRunningProcesses, handle(0)))
    """)
    assert out["error"] == "NVMLError_InsufficientSize"


def test_error_rules_specific_beats_star_and_versions_can_be_targeted(nvml_libdir, script):
    two_devices(script, errors=[
        Error("*", "nvmlDeviceGetUtilizationRates", "NOT_SUPPORTED"),
        Error(0, "nvmlDeviceGetUtilizationRates", "SUCCESS"),
        Error(1, "nvmlDeviceGetComputeRunningProcesses_v2", "GPU_IS_LOST"),
        Error("*", "nvmlDeviceGetCount", "NO_PERMISSION"),
    ])
    out = run_pynvml(nvml_libdir, script, """
        pynvml.nvmlInit()
        emit({
            "util": [attempt(pynvml.nvmlDeviceGetUtilizationRates, handle(i)) for i in range(2)],
            "v3": attempt(pynvml.nvmlDeviceGetComputeRunningProcesses, handle(1)),
            "v2": attempt(pynvml.nvmlDeviceGetComputeRunningProcesses_v2, handle(1)),
            "count": attempt(pynvml.nvmlDeviceGetCount),
        })
    """)
    assert out["util"][0] == {"ok": {"gpu": 87, "memory": 41}}
    assert out["util"][1]["error"] == "NVMLError_NotSupported"
    assert out["v3"] == {"ok": []}
    assert out["v2"]["error"] == "NVMLError_GpuIsLost"
    assert out["count"]["error"] == "NVMLError_NoPermission"


def test_delay_makes_the_call_take_that_long_without_blocking_other_calls(nvml_libdir, script):
    two_devices(script, delays=[Delay(0, "nvmlDeviceGetUtilizationRates", 400), Delay("*", "nvmlInit", 150)])
    out = run_pynvml(nvml_libdir, script, """
        t = time.monotonic(); pynvml.nvmlInit(); init_s = time.monotonic() - t
        h0, h1 = handle(0), handle(1)
        t = time.monotonic(); pynvml.nvmlDeviceGetUtilizationRates(h0); slow_s = time.monotonic() - t
        t = time.monotonic(); pynvml.nvmlDeviceGetUtilizationRates(h1); fast_s = time.monotonic() - t
        # A wedged call on one thread must not hold up others (ctypes drops the GIL, the double its lock).
        done = {}
        def wedged():
            pynvml.nvmlDeviceGetUtilizationRates(h0); done["wedged"] = time.monotonic()
        t = time.monotonic()
        thread = threading.Thread(target=wedged); thread.start()
        time.sleep(0.05)
        pynvml.nvmlDeviceGetMemoryInfo(h0); other = time.monotonic()
        thread.join()
        emit({"init": init_s, "slow": slow_s, "fast": fast_s,
              "other_before_wedged": other < done["wedged"], "wedged": done["wedged"] - t})
    """)
    assert out["init"] >= 0.15
    assert out["slow"] >= 0.4
    assert out["fast"] < 0.4
    assert out["wedged"] >= 0.4
    assert out["other_before_wedged"] is True


# ----------------------------------------------------------------------------------------------------------
# The script changes while the process runs


def test_script_changes_are_seen_between_calls(nvml_libdir, script):
    def device(used: int, util: int) -> Device:
        return Device(uuid="GPU-a", memory_total=1000, memory_used=used, util_gpu=util)

    write_script(script, devices=[device(100, 10), Device(uuid="GPU-b")])
    child = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent("""
            pynvml.nvmlInit()
            h0, h1 = handle(0), handle(1)
            for line in sys.stdin:
                emit({"count": attempt(pynvml.nvmlDeviceGetCount),
                      "util": attempt(pynvml.nvmlDeviceGetUtilizationRates, h0),
                      "memory": attempt(pynvml.nvmlDeviceGetMemoryInfo, h0),
                      "dev1": attempt(pynvml.nvmlDeviceGetUUID, h1),
                      "procs": attempt(pynvml.nvmlDeviceGetComputeRunningProcesses, h0)})
        """)],
        env=environ(nvml_libdir, script), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )

    def ask() -> Dict[str, Any]:
        assert child.stdin and child.stdout
        child.stdin.write("\n")
        child.stdin.flush()
        line = child.stdout.readline()
        assert line, "child died"
        return json.loads(line)

    try:
        first = ask()
        assert first["util"]["ok"]["gpu"] == 10 and first["memory"]["ok"]["used"] == 100
        assert first["procs"] == {"ok": []}

        # Same size, only digits differ: seen all the same (the rename gives a new inode).
        write_script(script, devices=[device(200, 20), Device(uuid="GPU-b")],
                     processes=[Process(0, pid=99, used_memory=5)])
        second = ask()
        assert second["util"]["ok"]["gpu"] == 20 and second["memory"]["ok"]["used"] == 200
        assert [p["pid"] for p in second["procs"]["ok"]] == [99]

        # Device 1 leaves: its handle now reports a lost GPU.
        write_script(script, devices=[device(200, 20)])
        third = ask()
        assert third["count"] == {"ok": 1}
        assert third["dev1"]["error"] == "NVMLError_GpuIsLost"

        # A broken script: every call fails loudly (NVML_ERROR_UNKNOWN) until it is fixed.
        script.write_text("device 0 uuid=GPU-a\nerror 0 nvmlDeviceGetUtilisationRates NOT_SUPPORTED\n")
        fourth = ask()
        assert fourth["count"]["error"] == fourth["util"]["error"] == "NVMLError_Unknown"

        # The driver goes away: no devices, handles are lost.
        remove_script(script)
        fifth = ask()
        assert fifth["count"] == {"ok": 0}
        assert fifth["util"]["error"] == "NVMLError_GpuIsLost"
    finally:
        _, stderr = child.communicate(timeout=30)  # closes its stdin: the child's loop ends
    assert child.returncode == 0, stderr
    assert f"nvml-double: {script}:2: unknown or unscriptable NVML function 'nvmlDeviceGetUtilisationRates'" \
        in stderr


def test_driver_that_appears_later_lets_a_retried_init_succeed(nvml_libdir, script, tmp_path):
    remove_script(script)
    staged = write_script(tmp_path / "staged", devices=[Device(uuid="GPU-late")])
    out = run_pynvml(nvml_libdir, script, f"""
        import os
        first = attempt(pynvml.nvmlInit)
        os.replace({str(staged)!r}, {str(script)!r})
        second = attempt(pynvml.nvmlInit)
        emit([first, second, pynvml.nvmlDeviceGetUUID(handle(0))])
    """)
    assert out == [{"error": "NVMLError_DriverNotLoaded", "value": 9}, {"ok": None}, "GPU-late"]


@pytest.mark.parametrize(("text", "message"), [
    ("device 1 uuid=GPU-x\n", "device 0 is missing"),
    ("device 0 uuid=GPU-x\nprocess 1 compute pid=1 used_memory=1\n", "process on device 1"),
    ("device 0 uuid=GPU-x memory_total=1 memory_used=2\n", "memory_used <= memory_total"),
    ("device 0 colour=green\n", "unknown key 'colour'"),
    ("device 0\nerror 0 nvmlDeviceGetName NOT_A_THING\n", "unknown NVML error name 'NOT_A_THING'"),
    ("device 0\nprocess 0 compute pid=-5 used_memory=1\n", "bad value for 'pid'"),
    ("frobnicate\n", "unknown directive 'frobnicate'"),
])
def test_malformed_scripts_fail_every_call_and_say_why(nvml_libdir, script, text, message):
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + "emit(attempt(pynvml.nvmlInit))"],
        env=environ(nvml_libdir, script), capture_output=True, text=True, timeout=60,
    )
    assert json.loads(proc.stdout)["error"] == "NVMLError_Unknown"
    assert message in proc.stderr and str(script) in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# The Python writer (no build needed)


def test_render_script_accepts_dataclasses_mappings_and_tuples():
    text = render_script(
        devices=[{"uuid": "GPU-a", "name": "NVIDIA A100-SXM4-40GB"}, Device(uuid="GPU-b", index=1)],
        processes=[(0, 1, None), Process(1, 2, 3, kind="graphics")],
        errors=[("*", "nvmlDeviceGetName", "NVML_ERROR_GPU_IS_LOST")],
        delays=[Delay(1, "nvmlDeviceGetUUID", 5)],
        init="NO_PERMISSION",
    )
    lines = text.splitlines()
    assert "init NO_PERMISSION" in lines
    assert lines[3].startswith("device 0 uuid=GPU-a ") and lines[3].endswith(" name=NVIDIA A100-SXM4-40GB")
    assert "process 0 compute pid=1 used_memory=-1" in lines
    assert "process 1 graphics pid=2 used_memory=3" in lines
    assert "error * nvmlDeviceGetName GPU_IS_LOST" in lines
    assert "delay 1 nvmlDeviceGetUUID 5" in lines


@pytest.mark.parametrize("kwargs", [
    {"devices": [Device(uuid="GPU-a", name="two\nlines")]},
    {"devices": [Device(uuid="GPU a")]},
    {"devices": [Device(uuid="GPU-a", memory_total=1, memory_used=2)]},
    {"devices": [Device(uuid="GPU-a"), Device(uuid="GPU-b", index=0)]},
    {"processes": [Process(0, pid=2**32, used_memory=0)]},
    {"processes": [Process(0, pid=1, used_memory=0, kind="cuda")]},
    {"errors": [Error(0, "nvmlDeviceGetName\ninit SUCCESS", "UNKNOWN")]},
    {"delays": [Delay(0, "nvmlDeviceGetName", -1)]},
])
def test_render_script_rejects_what_the_format_cannot_carry(kwargs):
    with pytest.raises(ValueError):
        render_script(**kwargs)


def test_write_script_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "script"
    write_script(path, devices=[Device(uuid="GPU-a")])
    inode = path.stat().st_ino
    write_script(path, devices=[Device(uuid="GPU-b")])
    assert path.stat().st_ino != inode
    assert "uuid=GPU-b" in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["script"]


# ----------------------------------------------------------------------------------------------------------
# gpujobd's reader (gpujobd.daemon.adapters.nvml.Nvml) on the double: its direct route to the process lists
# (pynvml's own function pointer, a buffer kept per device and list) runs for real here.

READER = '''
from gpujobd.daemon.adapters.nvml import Nvml

def plain_pynvml():
    """pynvml as a module without the function-pointer lookup: the reader must take the plain calls."""
    import types
    module = types.ModuleType("pynvml_plain")
    module.__dict__.update({k: v for k, v in vars(pynvml).items() if k != "_nvmlGetFunctionPointer"})
    return module

def table(report):
    return [{"state": d.state, "errors": d.errors,
             "processes": [[p.pid, p.type, p.used_memory_bytes] for p in d.processes]}
            for d in report.devices]

def direct(nvml):
    route = nvml._route
    return sorted(route._functions) if route is not None else None
'''


def run_reader(libdir: Path, script: Path, code: str) -> Any:
    return run_pynvml(libdir, script, READER + textwrap.dedent(code))


def mixed_processes() -> list:
    compute = [Process(0, pid=1000 + i, used_memory=(i + 1) << 20) for i in range(70)]  # > the first buffer
    compute += [Process(0, pid=0, used_memory=None), Process(0, pid=4294967295, used_memory=7),
                Process(1, pid=4242, used_memory=GIB)]
    graphics = [Process(1, pid=4242, used_memory=2 * GIB, kind="graphics"),
                Process(1, pid=77, used_memory=1, kind="graphics")]
    return compute + graphics


def test_the_reader_takes_the_direct_route_and_reads_what_plain_pynvml_reads(nvml_libdir, script):
    write_script(script, devices=[Device(uuid="GPU-a"), Device(uuid="GPU-b"), Device(uuid="GPU-c")],
                 processes=mixed_processes())
    out = run_reader(nvml_libdir, script, """
        nvml = Nvml()
        fast = nvml.read()
        plain = Nvml(load=plain_pynvml)
        slow = plain.read()
        emit({"route": direct(nvml), "plain_route": direct(plain),
              "fast": table(fast), "slow": table(slow)})
    """)
    assert out["route"] == ["C", "G"] and out["plain_route"] is None
    dev0, dev1, dev2 = out["fast"]
    assert dev0["processes"][:2] == [[1000, "C", 1 << 20], [1001, "C", 2 << 20]]
    assert dev0["processes"][-2:] == [[0, "C", None], [4294967295, "C", 7]]  # NOT_AVAILABLE is None
    assert len(dev0["processes"]) == 72
    assert dev1["processes"] == [[4242, "C+G", 2 * GIB], [77, "G", 1]]
    assert dev2 == {"state": "ok", "errors": {}, "processes": []}
    assert out["fast"] == out["slow"]


def test_an_unchanged_list_is_the_last_reads_tuple_and_a_changed_one_is_read_anew(nvml_libdir, script,
                                                                                  tmp_path):
    devices = [Device(uuid="GPU-a"), Device(uuid="GPU-b")]
    write_script(script, devices=devices, processes=mixed_processes())
    changed = mixed_processes()
    changed[5] = Process(0, pid=1005, used_memory=123)  # one process's memory on GPU 0
    later = tmp_path / "later"
    write_script(later, devices=devices, processes=changed)
    out = run_reader(nvml_libdir, script, f"""
        import os
        nvml = Nvml()
        first = nvml.read()
        second = nvml.read()
        os.replace({str(later)!r}, {str(script)!r})  # as write_script does: the double sees it at once
        third = nvml.read()
        emit({{"route": direct(nvml),
              "second_same": [a.processes is b.processes for a, b in zip(first.devices, second.devices)],
              "third_same": [a.processes is b.processes for a, b in zip(second.devices, third.devices)],
              "first": table(first), "third": table(third)}})
    """)
    assert out["route"] == ["C", "G"]
    assert out["second_same"] == [True, True]
    assert out["third_same"] == [False, True]
    assert out["first"][0]["processes"][5] == [1005, "C", 6 << 20]
    assert out["third"][0]["processes"][5] == [1005, "C", 123]
    assert len(out["third"][0]["processes"]) == 72


@pytest.mark.parametrize(("function", "error", "state", "field"), [
    ("nvmlDeviceGetComputeRunningProcesses_v3", "GPU_IS_LOST", "lost", "device"),
    ("nvmlDeviceGetGraphicsRunningProcesses_v3", "NO_PERMISSION", "ok", "graphics_processes"),
    ("nvmlDeviceGetComputeRunningProcesses_v3", "INSUFFICIENT_SIZE", "ok", "compute_processes"),
])
def test_nvml_errors_through_the_direct_route_are_handled_as_before(nvml_libdir, script, function, error,
                                                                    state, field):
    write_script(script, devices=[Device(uuid="GPU-a"), Device(uuid="GPU-b")], processes=mixed_processes(),
                 errors=[Error(0, function, error)])
    out = run_reader(nvml_libdir, script, """
        nvml = Nvml()
        fast = table(nvml.read())
        emit({"route": direct(nvml), "fast": fast, "slow": table(Nvml(load=plain_pynvml).read())})
    """)
    assert out["route"] == ["C", "G"]
    dev0, dev1 = out["fast"]
    assert dev0["state"] == state and field in dev0["errors"]
    assert dev1["state"] == "ok" and dev1["errors"] == {} and len(dev1["processes"]) == 2
    assert out["fast"] == out["slow"]  # the plain pynvml calls come to the same report


def test_without_the_versioned_symbol_the_plain_call_runs_and_fails_as_it_always_did(nvml_libdir, script):
    """An older driver without the _v3 functions: pynvml's lookup says FUNCTION_NOT_FOUND; the reader then
    makes the plain pynvml call, whose mismatch error becomes that one field's error."""
    write_script(script, devices=[Device(uuid="GPU-a")], processes=mixed_processes()[:3])
    out = run_reader(nvml_libdir, script, """
        real_lookup = pynvml._nvmlGetFunctionPointer
        def old_driver(name):
            if name.endswith("RunningProcesses_v3"):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            return real_lookup(name)
        pynvml._nvmlGetFunctionPointer = old_driver
        nvml = Nvml()
        emit({"route": direct(nvml), "read": table(nvml.read()), "after": direct(nvml)})
    """)
    assert out["route"] is None and out["after"] is None  # no route: nothing could be looked up
    (dev0,) = out["read"]
    assert dev0["state"] == "ok" and dev0["processes"] == []
    assert "NVMLLibraryMismatchError" in dev0["errors"]["compute_processes"]
    assert "NVMLLibraryMismatchError" in dev0["errors"]["graphics_processes"]
