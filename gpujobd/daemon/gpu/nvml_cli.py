"""`python -m gpujobd.daemon.gpu.nvml_cli`: read the GPUs once through NVML, as the daemon's watcher
does, and print the reading as JSON; `--bench-tick` times whole watch ticks (`bench_tick`). A
diagnostic command for admins and the benchmarks, kept apart from the daemon's own modules: like
main, it builds the adapters (NVML, /proc) and hands them to the watcher."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional

from gpujobd.daemon.adapters.nvml import Nvml
from gpujobd.daemon.adapters.procfs import ProcFs
from gpujobd.daemon.gpu.attribution import ProcPort
from gpujobd.daemon.gpu.reading import NvmlPort, collect
from gpujobd.daemon.gpu.report import NvmlUnavailable, report_to_json
from gpujobd.daemon.gpu.watcher import Watcher
from gpujobd.daemon.gpu.worker import NO_STEPS, Worker
from gpujobd.shared.config import Config


class _NoTimers:
    def call_later(self, seconds: float, callback: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


def bench_tick(nvml: NvmlPort, repeat: int = 20, procs: Optional[ProcPort] = None) -> Dict[str, Any]:
    """Time whole ticks on this thread: NVML, /proc and the main loop's part (attribution, strays).
    Only a figure to print; nothing asserts on it."""
    procs = procs or ProcFs()
    watcher = Watcher(Config(), live_jobs=lambda: (), scheduler=_NoTimers(),
                      worker=Worker(post=lambda f: f()), nvml=nvml, procs=procs,
                      stop_unit=lambda unit: None, daemon_pid=os.getpid())
    collect_ms, apply_ms = [], []
    snapshot = None
    for _ in range(repeat):
        started = time.perf_counter()
        snapshot = collect(nvml, procs, NO_STEPS, watcher._proc_cache)  # as the watcher's ticks do
        middle = time.perf_counter()
        watcher._apply(snapshot)
        collect_ms.append((middle - started) * 1000)
        apply_ms.append((time.perf_counter() - middle) * 1000)
    assert snapshot is not None
    total = sorted(c + a for c, a in zip(collect_ms, apply_ms))
    return {
        "devices": len(snapshot.report.devices),
        "processes": sum(len(d.processes) for d in snapshot.report.devices),
        "ticks": repeat,
        "tick_ms_median": round(total[len(total) // 2], 3),
        "tick_ms_min": round(total[0], 3),
        "tick_ms_max": round(total[-1], 3),
        "read_ms_median": round(sorted(collect_ms)[len(collect_ms) // 2], 3),
        "classify_ms_median": round(sorted(apply_ms)[len(apply_ms) // 2], 3),
    }


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m gpujobd.daemon.gpu.nvml_cli",
        description="Read the GPUs through NVML once, as the daemon's watcher does, and print it.")
    parser.add_argument("--bench-tick", action="store_true",
                        help="time whole watch ticks (NVML, /proc and classification) and print the figure")
    parser.add_argument("--repeat", type=int, default=20, help="ticks to time with --bench-tick")
    args = parser.parse_args(argv)
    nvml = Nvml()
    if not args.bench_tick:
        try:
            report = nvml.read()
        except NvmlUnavailable as err:
            print(json.dumps({"available": False, "reason": str(err)}, indent=2))
            return 1
        print(json.dumps({"available": True, **report_to_json(report)}, indent=2))
        return 0
    from gpujobd.shared.log import configure_logging

    configure_logging("console", "error")  # every process is news on the first tick: not the figure
    result = bench_tick(nvml, repeat=max(1, args.repeat))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
