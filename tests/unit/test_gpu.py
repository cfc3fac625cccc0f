"""adapters.nvml: NVML read through a small stateful fake of the pynvml module; gpu.worker: the worker
thread and its hang detection, and the back-off schedule.

The fake keeps NVML's state (initialised or not, its devices, the processes on them) and fails any
call for any device on demand (`fail(function, code, index)`), or blocks it until released (`hang`),
the way a wedged driver holds a call in the kernel.
"""

from __future__ import annotations

import ctypes
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from gpujobd.daemon.adapters import nvml as gpu
from gpujobd.daemon.adapters.nvml import Nvml
from gpujobd.daemon.gpu import nvml_cli as gpu_cli
from gpujobd.daemon.gpu.report import NvmlUnavailable
from gpujobd.daemon.gpu.worker import Backoff, Done, Worker

NAMES = {
    1: "Uninitialized", 3: "Not Supported", 4: "Insufficient Permissions", 9: "Driver Not Loaded",
    12: "NVML Shared Library Not Found", 15: "GPU is lost", 999: "Unknown Error",
}


class FakeNVMLError(Exception):
    """pynvml.NVMLError: the NVML return code in `value`, NVML's words in str()."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return NAMES.get(self.value, f"NVML Error with code {self.value}")


class FakeMismatch(Exception):
    """pynvml.NVMLLibraryMismatchError: a versioned struct this driver does not know."""


class FakePynvml:
    NVMLError = FakeNVMLError
    NVMLLibraryMismatchError = FakeMismatch

    def __init__(self, devices: int = 2):
        self.initialised = 0
        self.init_calls = 0
        self.shutdown_calls = 0
        self.devices: List[Dict[str, Any]] = [
            {"uuid": f"GPU-{i:04d}-aaaa", "name": "NVIDIA H100 80GB HBM3", "total": 80 << 30,
             "used": (i + 1) << 30, "util": (10 * i, 5 * i), "compute": [], "graphics": []}
            for i in range(devices)]
        self.failures: Dict[Tuple[str, Optional[int]], BaseException] = {}
        self.hangs: Dict[str, threading.Event] = {}
        self.entered: Dict[str, threading.Event] = {}
        self.calls: List[str] = []

    # -- driven by the tests -----------------------------------------------------------------------
    def fail(self, function: str, code: int, index: Optional[int] = None) -> None:
        self.failures[(function, index)] = FakeNVMLError(code)

    def raise_on(self, function: str, error: BaseException, index: Optional[int] = None) -> None:
        self.failures[(function, index)] = error

    def heal(self) -> None:
        self.failures.clear()

    def hang(self, function: str) -> threading.Event:
        """The next call of `function` blocks until the returned event is set."""
        self.hangs[function] = threading.Event()
        self.entered[function] = threading.Event()
        return self.hangs[function]

    def process(self, index: int, pid: int, memory: Optional[int], kind: str = "compute") -> None:
        self.devices[index][kind].append(SimpleNamespace(pid=pid, usedGpuMemory=memory))

    # -- the module's functions --------------------------------------------------------------------
    def _enter(self, function: str, index: Optional[int] = None, needs_init: bool = True) -> None:
        self.calls.append(function if index is None else f"{function}({index})")
        if function in self.hangs:
            self.entered[function].set()
            self.hangs.pop(function).wait(10)
        for key in ((function, index), (function, None)):
            if key in self.failures:
                raise self.failures[key]
        if needs_init and not self.initialised:
            raise FakeNVMLError(gpu.ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.init_calls += 1
        self._enter("nvmlInit", needs_init=False)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._enter("nvmlShutdown")
        self.initialised = max(0, self.initialised - 1)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "550.54.14"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        self._enter("nvmlDeviceGetHandleByIndex", index)
        return SimpleNamespace(index=index)

    def nvmlDeviceGetUUID(self, handle: SimpleNamespace) -> str:
        self._enter("nvmlDeviceGetUUID", handle.index)
        return self.devices[handle.index]["uuid"]

    def nvmlDeviceGetName(self, handle: SimpleNamespace) -> bytes:
        self._enter("nvmlDeviceGetName", handle.index)
        return self.devices[handle.index]["name"].encode()

    def nvmlDeviceGetMemoryInfo(self, handle: SimpleNamespace) -> SimpleNamespace:
        self._enter("nvmlDeviceGetMemoryInfo", handle.index)
        device = self.devices[handle.index]
        total, used = device["total"], device["used"]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: SimpleNamespace) -> SimpleNamespace:
        self._enter("nvmlDeviceGetUtilizationRates", handle.index)
        busy, memory = self.devices[handle.index]["util"]
        return SimpleNamespace(gpu=busy, memory=memory)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimpleNamespace) -> list:
        self._enter("nvmlDeviceGetComputeRunningProcesses", handle.index)
        return list(self.devices[handle.index]["compute"])

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: SimpleNamespace) -> list:
        self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle.index)
        return list(self.devices[handle.index]["graphics"])


@pytest.fixture
def nv() -> FakePynvml:
    return FakePynvml()


def reader(nv: FakePynvml) -> Nvml:
    return Nvml(load=lambda: nv)


# ---------------------------------------------------------------------------------------------------
# Reading the GPUs.


def test_a_healthy_read_lists_every_device_and_its_processes(nv: FakePynvml) -> None:
    nv.process(0, 4242, 2 << 30)
    nv.process(0, 4243, None)  # NVML does not know this one's memory
    nv.process(1, 5000, 1 << 30, "graphics")
    report = reader(nv).read()
    assert report.driver_version == "550.54.14"
    first, second = report.devices
    assert (first.index, first.state, first.uuid, first.name) == (0, "ok", "GPU-0000-aaaa",
                                                                  "NVIDIA H100 80GB HBM3")
    assert (first.memory_total_bytes, first.memory_used_bytes) == (80 << 30, 1 << 30)
    assert (second.utilization_gpu_percent, second.utilization_memory_percent) == (10, 5)
    assert [(p.pid, p.type, p.used_memory_bytes) for p in first.processes] == [
        (4242, "C", 2 << 30), (4243, "C", None)]
    assert [(p.pid, p.type) for p in second.processes] == [(5000, "G")]
    assert first.errors == {} and second.errors == {}
    assert report.pids() == [4242, 4243, 5000]


def test_a_process_in_both_lists_is_one_entry_c_plus_g(nv: FakePynvml) -> None:
    nv.process(0, 4242, 1 << 30)
    nv.process(0, 4242, 3 << 30, "graphics")
    (process,) = reader(nv).read().devices[0].processes
    assert (process.pid, process.type, process.used_memory_bytes) == (4242, "C+G", 3 << 30)


def test_untrusted_pids_are_kept_as_nvml_gave_them(nv: FakePynvml) -> None:
    nv.process(0, 0, 5)
    nv.process(0, 4294967295, 2**64 - 1)  # NVML_VALUE_NOT_AVAILABLE as a raw number
    processes = reader(nv).read().devices[0].processes
    assert [(p.pid, p.used_memory_bytes) for p in processes] == [(0, 5), (4294967295, None)]


def test_nvml_is_initialised_once(nv: FakePynvml) -> None:
    nvml = reader(nv)
    nvml.read()
    nvml.read()
    assert nv.init_calls == 1 and nvml.initialised


@pytest.mark.parametrize(("code", "words"), [(gpu.ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded"),
                                             (gpu.ERROR_LIBRARY_NOT_FOUND, "Library Not Found"),
                                             (gpu.ERROR_NO_PERMISSION, "Insufficient Permissions")])
def test_a_failing_init_is_unavailable_with_nvmls_reason_and_is_retried(nv: FakePynvml, code: int,
                                                                         words: str) -> None:
    nv.fail("nvmlInit", code)
    nvml = reader(nv)
    with pytest.raises(NvmlUnavailable) as caught:
        nvml.read()
    assert words in str(caught.value) and f"NVML error {code}" in str(caught.value)
    assert not nvml.initialised and nv.shutdown_calls == 0
    nv.heal()
    assert len(nvml.read().devices) == 2
    assert nv.init_calls == 2


def _refusing_import(monkeypatch: pytest.MonkeyPatch, refused: set) -> None:
    import builtins

    real_import = builtins.__import__

    def refuse(name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (),
               level: int = 0) -> Any:
        wanted = {name} | {f"{name}.{item}" for item in (fromlist or ())}
        if wanted & refused:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals_, locals_, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", refuse)
    monkeypatch.delitem(__import__("sys").modules, "pynvml", raising=False)


def test_import_pynvml_gives_the_installed_bindings() -> None:
    pytest.importorskip("pynvml")
    module = gpu.import_pynvml()
    assert module.__name__ == "pynvml" and callable(module.nvmlInit)


def test_missing_bindings_make_nvml_unavailable_and_say_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _refusing_import(monkeypatch, {"pynvml"})
    with pytest.raises(NvmlUnavailable) as caught:
        Nvml().read()
    reason = str(caught.value)
    assert "not installed (module pynvml)" in reason
    assert "python3-pynvml" in reason and "nvidia-ml-py" in reason


def test_a_lost_gpu_is_reported_lost_and_the_others_are_fine(nv: FakePynvml) -> None:
    nv.process(0, 4242, 1 << 30)
    nv.fail("nvmlDeviceGetMemoryInfo", gpu.ERROR_GPU_IS_LOST, index=1)
    first, second = reader(nv).read().devices
    assert first.state == "ok" and [p.pid for p in first.processes] == [4242]
    assert second.state == "lost" and "GPU is lost" in second.errors["device"]
    assert second.uuid == "GPU-0001-aaaa"  # what was read before it fell off the bus
    assert second.memory_total_bytes is None and second.processes == ()
    assert "nvmlDeviceGetUtilizationRates(1)" not in nv.calls, "a lost GPU is asked nothing more"


def test_a_gpu_lost_before_its_handle_is_reported_lost(nv: FakePynvml) -> None:
    nv.fail("nvmlDeviceGetHandleByIndex", gpu.ERROR_GPU_IS_LOST, index=0)
    first, second = reader(nv).read().devices
    assert (first.index, first.state, first.uuid) == (0, "lost", None)
    assert second.state == "ok"


def test_a_handle_error_other_than_lost_marks_the_device_in_error(nv: FakePynvml) -> None:
    nv.fail("nvmlDeviceGetHandleByIndex", gpu.ERROR_NO_PERMISSION, index=1)
    _, second = reader(nv).read().devices
    assert second.state == "error" and "Insufficient Permissions" in second.errors["device"]


def test_not_supported_leaves_that_field_out_and_says_nothing(nv: FakePynvml) -> None:
    nv.fail("nvmlDeviceGetUtilizationRates", gpu.ERROR_NOT_SUPPORTED, index=0)
    first, second = reader(nv).read().devices
    assert first.utilization_gpu_percent is None and first.utilization_memory_percent is None
    assert first.errors == {} and first.memory_total_bytes == 80 << 30
    assert second.utilization_gpu_percent == 10


def test_a_permission_error_leaves_the_field_out_and_says_why(nv: FakePynvml) -> None:
    nv.process(0, 4242, 1 << 30, "graphics")
    nv.fail("nvmlDeviceGetComputeRunningProcesses", gpu.ERROR_NO_PERMISSION, index=0)
    first, _ = reader(nv).read().devices
    assert "Insufficient Permissions" in first.errors["compute_processes"]
    assert [(p.pid, p.type) for p in first.processes] == [(4242, "G")]  # the other list is still read


def test_a_pynvml_struct_mismatch_is_one_fields_error(nv: FakePynvml) -> None:
    nv.raise_on("nvmlDeviceGetGraphicsRunningProcesses", FakeMismatch("v3 unknown to this driver"))
    first, _ = reader(nv).read().devices
    assert "FakeMismatch" in first.errors["graphics_processes"]


@pytest.mark.parametrize("code", [gpu.ERROR_DRIVER_NOT_LOADED, gpu.ERROR_UNINITIALIZED,
                                  gpu.ERROR_LIB_RM_VERSION_MISMATCH])
def test_a_fatal_error_mid_read_makes_nvml_unavailable_and_it_starts_afresh(nv: FakePynvml,
                                                                           code: int) -> None:
    nvml = reader(nv)
    nvml.read()
    nv.fail("nvmlDeviceGetComputeRunningProcesses", code, index=1)
    with pytest.raises(NvmlUnavailable) as caught:
        nvml.read()
    assert "nvmlDeviceGetComputeRunningProcesses(GPU 1)" in str(caught.value)
    assert not nvml.initialised and nv.shutdown_calls == 1
    nv.heal()
    assert len(nvml.read().devices) == 2 and nv.init_calls == 2


def test_a_failing_device_count_is_unavailable(nv: FakePynvml) -> None:
    nv.fail("nvmlDeviceGetCount", gpu.ERROR_UNKNOWN)
    with pytest.raises(NvmlUnavailable, match="Unknown Error"):
        reader(nv).read()


def test_an_unexpected_exception_is_unavailable_not_a_crash(nv: FakePynvml) -> None:
    nv.raise_on("nvmlDeviceGetName", RuntimeError("ctypes exploded"), index=0)
    nvml = reader(nv)
    with pytest.raises(NvmlUnavailable, match="RuntimeError: ctypes exploded"):
        nvml.read()
    assert not nvml.initialised


def test_a_failing_shutdown_after_a_failure_changes_nothing(nv: FakePynvml) -> None:
    nvml = reader(nv)
    nvml.read()
    nv.fail("nvmlDeviceGetCount", gpu.ERROR_DRIVER_NOT_LOADED)
    nv.fail("nvmlShutdown", gpu.ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(NvmlUnavailable, match="Driver Not Loaded"):
        nvml.read()


def test_no_devices_is_a_good_report(nv: FakePynvml) -> None:
    nv.devices.clear()
    report = reader(nv).read()
    assert report.devices == () and report.pids() == []


def test_the_return_codes_are_nvmls() -> None:
    pynvml = pytest.importorskip("pynvml")
    for name in ("UNINITIALIZED", "INVALID_ARGUMENT", "NOT_SUPPORTED", "NO_PERMISSION", "NOT_FOUND",
                 "DRIVER_NOT_LOADED", "TIMEOUT", "LIBRARY_NOT_FOUND", "FUNCTION_NOT_FOUND",
                 "GPU_IS_LOST", "RESET_REQUIRED", "LIB_RM_VERSION_MISMATCH", "UNKNOWN"):
        assert getattr(gpu, f"ERROR_{name}") == getattr(pynvml, f"NVML_ERROR_{name}"), name


def test_the_real_pynvml_has_every_function_the_reader_calls() -> None:
    pynvml = pytest.importorskip("pynvml")
    for name in dir(FakePynvml):
        if name.startswith("nvml"):
            assert callable(getattr(pynvml, name, None)), name
    assert issubclass(pynvml.NVMLError, Exception) and pynvml.NVMLLibraryMismatchError


# ---------------------------------------------------------------------------------------------------
# The worker thread.


class Inbox:
    """The main loop's side of `post`: callbacks queued from the thread, run when the test says."""

    def __init__(self) -> None:
        self.callbacks: List[Callable[[], None]] = []
        self.arrived = threading.Event()
        self._lock = threading.Lock()

    def post(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self.callbacks.append(callback)
        self.arrived.set()

    def run(self, timeout: float = 5.0) -> int:
        assert self.arrived.wait(timeout), "nothing was posted to the main loop"
        with self._lock:
            callbacks, self.callbacks = self.callbacks, []
            self.arrived.clear()
        for callback in callbacks:
            callback()
        return len(callbacks)


def test_the_worker_runs_a_task_off_the_calling_thread_and_posts_the_result() -> None:
    inbox = Inbox()
    worker = Worker(post=inbox.post)
    results: List[Done] = []
    main = threading.get_ident()
    assert worker.submit(lambda steps: threading.get_ident(), results.append)
    assert worker.busy
    inbox.run()
    assert not worker.busy
    assert results[0].error is None and results[0].value != main


def test_a_task_that_raises_hands_its_exception_to_the_main_loop() -> None:
    inbox = Inbox()
    worker = Worker(post=inbox.post)
    results: List[Done] = []

    def task(steps: Any) -> None:
        raise NvmlUnavailable("Driver Not Loaded")

    worker.submit(task, results.append)
    inbox.run()
    assert isinstance(results[0].error, NvmlUnavailable)
    assert worker.submit(lambda steps: 1, results.append), "the thread goes on after a failed task"
    inbox.run()
    assert results[1].value == 1


def test_a_hung_call_is_seen_from_the_main_loop_and_never_gets_a_second_call(nv: FakePynvml) -> None:
    inbox = Inbox()
    worker = Worker(post=inbox.post)
    nvml = reader(nv)
    nvml.read()
    release = nv.hang("nvmlDeviceGetComputeRunningProcesses")
    results: List[Done] = []
    assert worker.submit(nvml.read, results.append)
    assert nv.entered["nvmlDeviceGetComputeRunningProcesses"].wait(5)
    time.sleep(0.05)
    what, seconds = worker.current()  # type: ignore[misc]
    assert what == "nvmlDeviceGetComputeRunningProcesses(GPU 0)" and seconds >= 0.04
    calls_before = len(nv.calls)
    assert not worker.submit(nvml.read, results.append), "no second call while one is stuck"
    assert worker.busy and results == [] and len(nv.calls) == calls_before
    release.set()
    inbox.run()
    assert results[0].error is None and len(results[0].value.devices) == 2
    assert worker.current() is None and not worker.busy


def test_steps_name_what_the_thread_waits_on() -> None:
    ticks = iter([10.0, 12.5])
    worker = Worker(post=lambda f: f(), monotonic=lambda: next(ticks))
    assert worker.current() is None
    with worker.step("nvmlInit"):
        assert worker.current() == ("nvmlInit", 2.5)
    assert worker.current() is None


# ---------------------------------------------------------------------------------------------------
# Back-off.


def test_backoff_doubles_from_the_initial_wait_to_the_maximum_and_resets() -> None:
    backoff = Backoff(5.0, 300.0)
    assert [backoff.next_delay() for _ in range(9)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    backoff.reset()
    assert backoff.next_delay() == 5.0


def test_backoff_survives_very_many_failures() -> None:
    backoff = Backoff(0.5, 60.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 60.0


# ---------------------------------------------------------------------------------------------------
# The command line.


def test_the_command_line_prints_unavailable_without_nvml(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    def unavailable(self: Nvml, steps: Any = None) -> Any:
        raise NvmlUnavailable("Driver Not Loaded (NVML error 9)")

    monkeypatch.setattr(Nvml, "read", unavailable)
    assert gpu_cli.main([]) == 1
    assert '"reason": "Driver Not Loaded (NVML error 9)"' in capsys.readouterr().out


def test_the_benchmark_times_whole_ticks(nv: FakePynvml) -> None:
    from gpujobd.daemon.gpu.nvml_cli import bench_tick

    for index in range(2):
        for pid in range(100):
            nv.process(index, 3_000_000 + pid, 1 << 20)
    result = bench_tick(reader(nv), repeat=3)
    assert result["devices"] == 2 and result["processes"] == 200 and result["ticks"] == 3
    assert result["tick_ms_median"] >= 0


# ---------------------------------------------------------------------------------------------------
# The process lists read only what changed (issue 13): the direct route (pynvml's function pointer,
# driven here by a ctypes callback that plays the C function), and the plain route's reuse.


class Info(ctypes.Structure):  # the layout of pynvml's c_nvmlProcessInfo_v3_t (nvmlProcessInfo_v2_t)
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


LIST_FUNCTION = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint),
                                 ctypes.POINTER(Info))
SYMBOLS = {"nvmlDeviceGetComputeRunningProcesses_v3": "compute",
           "nvmlDeviceGetGraphicsRunningProcesses_v3": "graphics"}


class DirectPynvml(FakePynvml):
    """The fake, with pynvml's function-pointer lookup and struct: the C functions are ctypes callbacks
    that follow NVML's size protocol over the fake's lists. Handles carry `_as_parameter_`, as pynvml's
    ctypes handles are passed."""

    c_nvmlProcessInfo_v3_t = Info

    def __init__(self, devices: int = 2):
        super().__init__(devices)
        self.c_calls: List[Tuple[str, int, int]] = []  # (list, device, capacity offered)
        self.missing: set = set()  # symbols this "driver" lacks
        self.c_errors: Dict[Tuple[str, int], int] = {}  # (list, device) -> NVML code to return
        self._callbacks: Dict[str, Any] = {}

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimpleNamespace:
        self._enter("nvmlDeviceGetHandleByIndex", index)
        return SimpleNamespace(index=index, _as_parameter_=index + 1)

    def _nvmlGetFunctionPointer(self, name: str) -> Any:
        if name in self.missing or name not in SYMBOLS:
            raise FakeNVMLError(13)  # FUNCTION_NOT_FOUND
        kind = SYMBOLS[name]

        def fn(handle: int, count: Any, infos: Any) -> int:
            index = handle - 1
            self.c_calls.append((kind, index, count[0]))
            code = self.c_errors.get((kind, index))
            if code is not None:
                return code
            listed = self.devices[index][kind]
            if count[0] < len(listed):
                count[0] = len(listed)
                return gpu.ERROR_INSUFFICIENT_SIZE
            for i, entry in enumerate(listed):
                memory = entry.usedGpuMemory
                infos[i] = Info(entry.pid, 2**64 - 1 if memory is None else memory, 0xFFFFFFFF, 0xFFFFFFFF)
            count[0] = len(listed)
            return gpu.NVML_SUCCESS

        self._callbacks[name] = LIST_FUNCTION(fn)  # kept alive while the reader may call it
        return self._callbacks[name]


@pytest.fixture
def direct() -> DirectPynvml:
    return DirectPynvml()


def plain_list_calls(nv: FakePynvml) -> List[str]:
    return [c for c in nv.calls if "RunningProcesses" in c]


def test_the_direct_route_reads_the_lists_as_the_plain_calls_do(direct: DirectPynvml) -> None:
    for i in range(40):  # more than the first buffer holds: NVML's size protocol grows it
        direct.process(0, 1000 + i, (i + 1) << 20)
    direct.process(0, 4243, None)
    direct.process(1, 5000, 1 << 30, "graphics")
    direct.process(1, 5000, 2 << 30)
    nvml = reader(direct)
    first, second = nvml.read().devices
    assert nvml._route is not None and plain_list_calls(direct) == []  # no plain pynvml list call
    assert [(p.pid, p.used_memory_bytes) for p in first.processes[:2]] == [(1000, 1 << 20), (1001, 2 << 20)]
    assert (first.processes[-1].pid, first.processes[-1].used_memory_bytes) == (4243, None)
    assert len(first.processes) == 41
    assert [(p.pid, p.type, p.used_memory_bytes) for p in second.processes] == [(5000, "C+G", 2 << 30)]
    grown = [capacity for kind, index, capacity in direct.c_calls if (kind, index) == ("compute", 0)]
    assert grown == [32, 41 * 2 + 5]  # too small, then room for what NVML said it needs
    plain = FakePynvml()
    plain.devices = direct.devices
    assert reader(plain).read().devices == (first, second)


def test_an_unchanged_list_is_the_previous_tuple_and_only_a_changed_device_is_parsed_again(
        direct: DirectPynvml) -> None:
    direct.process(0, 4242, 1 << 30)
    direct.process(1, 5000, 1 << 30)
    nvml = reader(direct)
    a0, a1 = nvml.read().devices
    b0, b1 = nvml.read().devices
    assert b0.processes is a0.processes and b1.processes is a1.processes
    direct.devices[1]["compute"][0] = SimpleNamespace(pid=5000, usedGpuMemory=3 << 30)
    c0, c1 = nvml.read().devices
    assert c0.processes is a0.processes and c1.processes is not a1.processes
    assert [(p.pid, p.used_memory_bytes) for p in c1.processes] == [(5000, 3 << 30)]
    direct.devices[1]["compute"][0] = SimpleNamespace(pid=5001, usedGpuMemory=3 << 30)  # another PID
    _, d1 = nvml.read().devices
    assert [p.pid for p in d1.processes] == [5001]


def test_the_plain_route_hands_back_the_previous_tuple_too(nv: FakePynvml) -> None:
    nv.process(0, 4242, 1 << 30)
    nvml = reader(nv)
    first = nvml.read().devices[0]
    again = nvml.read().devices[0]
    assert nvml._route is None and plain_list_calls(nv)
    assert first.processes and again.processes is first.processes
    nv.devices[0]["compute"].append(SimpleNamespace(pid=4343, usedGpuMemory=5))
    assert [p.pid for p in nvml.read().devices[0].processes] == [4242, 4343]


def test_without_the_function_pointer_the_plain_pynvml_call_is_made(direct: DirectPynvml) -> None:
    direct.missing.add("nvmlDeviceGetGraphicsRunningProcesses_v3")  # an older driver: no graphics _v3
    direct.process(0, 4242, 1 << 30)
    direct.process(0, 4343, 1 << 30, "graphics")
    nvml = reader(direct)
    first, _ = nvml.read().devices
    assert [(p.pid, p.type) for p in first.processes] == [(4242, "C"), (4343, "G")]
    assert plain_list_calls(direct) == ["nvmlDeviceGetGraphicsRunningProcesses(0)",
                                        "nvmlDeviceGetGraphicsRunningProcesses(1)"]
    assert {kind for kind, _, _ in direct.c_calls} == {"compute"}


def test_a_call_ctypes_refuses_falls_back_to_the_plain_call_for_good(direct: DirectPynvml) -> None:
    direct.process(0, 4242, 1 << 30)
    nvml = reader(direct)
    nvml.read()
    calls = len(direct.c_calls)
    direct.nvmlDeviceGetHandleByIndex = lambda index: SimpleNamespace(index=index)  # type: ignore[method-assign]
    nvml._static.clear()  # the next read takes handles ctypes cannot pass
    (first, _) = nvml.read().devices
    assert [p.pid for p in first.processes] == [4242] and first.errors == {}
    assert len(direct.c_calls) == calls and len(plain_list_calls(direct)) == 4
    assert nvml._route is not None and nvml._route.function("C") is None


def test_a_struct_of_another_layout_means_no_direct_route() -> None:
    class Other(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_ulonglong), ("usedGpuMemory", ctypes.c_ulonglong)]

    nv = DirectPynvml()
    nv.c_nvmlProcessInfo_v3_t = Other  # type: ignore[assignment]
    nv.process(0, 4242, 1 << 30)
    nvml = reader(nv)
    assert [p.pid for p in nvml.read().devices[0].processes] == [4242]
    assert nvml._route is None and nv.c_calls == [] and plain_list_calls(nv)


@pytest.mark.parametrize(("code", "state", "field"), [
    (gpu.ERROR_GPU_IS_LOST, "lost", "device"), (gpu.ERROR_NO_PERMISSION, "ok", "compute_processes")])
def test_nvml_errors_of_the_direct_route_are_those_of_the_plain_call(direct: DirectPynvml, code: int,
                                                                    state: str, field: str) -> None:
    direct.process(1, 5000, 1 << 30)
    direct.c_errors[("compute", 0)] = code
    first, second = reader(direct).read().devices
    assert first.state == state and field in first.errors
    assert [p.pid for p in second.processes] == [5000] and second.errors == {}


def test_a_list_nvml_says_cannot_fit_is_insufficient_size_without_growing_the_buffer(
        direct: DirectPynvml) -> None:
    direct.c_errors[("compute", 0)] = gpu.ERROR_INSUFFICIENT_SIZE  # and the count is left as offered
    first, _ = reader(direct).read().devices
    assert "compute_processes" in first.errors
    assert [capacity for kind, index, capacity in direct.c_calls if (kind, index) == ("compute", 0)] == [32]


def test_a_fatal_error_forgets_the_buffers_and_the_route(direct: DirectPynvml) -> None:
    direct.process(0, 4242, 1 << 30)
    nvml = reader(direct)
    before = nvml.read().devices[0]
    direct.c_errors[("graphics", 1)] = gpu.ERROR_DRIVER_NOT_LOADED
    with pytest.raises(NvmlUnavailable):
        nvml.read()
    assert nvml._route is None and nvml._lists == {} and nvml._merged == {}
    del direct.c_errors[("graphics", 1)]
    after = nvml.read().devices[0]
    assert after.processes == before.processes and after.processes is not before.processes
