"""`python -m gpujobd.daemon.gpu.nvml_cli`: read the GPUs once through NVML, as the daemon's watcher does, and
print the reading as JSON; `--bench-tick` times whole watch ticks. A diagnostic command for admins
and the benchmarks, kept apart from the daemon's NVML module."""

from __future__ import annotations

from typing import List, Optional

from gpujobd.daemon.gpu.nvml_reader import Nvml, NvmlUnavailable, report_to_json


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
    from gpujobd.daemon.gpu.watcher import bench_tick
    from gpujobd.shared.log import configure_logging

    configure_logging("console", "error")  # every process is news on the first tick: not the figure
    result = bench_tick(nvml, repeat=max(1, args.repeat))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
