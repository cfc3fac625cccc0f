#!/usr/bin/env python3
"""Time one GPU watch tick of gpujobd through the NVML double: 8 GPUs x 100 processes by default.

    python3 tests/nvml_double/bench_tick.py [--gpus 8] [--per-gpu 100] [--repeat 20]

Starts that many real processes (sleeps, so each /proc look finds a live one), lists them in the
double's script, and runs `python -m gpujobd.daemon.gpu.nvml_cli --bench-tick` in a child process whose
LD_LIBRARY_PATH puts the double first (the double must never be loaded into this process). Prints
the child's figures (milliseconds per tick: NVML + /proc on the worker's side, attribution on the
main loop's). A figure to look at, not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]
sys.path.insert(0, str(CHECKOUT))

from tests.nvml_double import build, environ  # noqa: E402
from tests.nvml_double.script import Device, Process, write_script  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--per-gpu", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    libdir = build()
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(args.gpus * args.per_gpu)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "script"
            write_script(script,
                         devices=[Device(uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000",
                                         memory_used=40 << 30) for i in range(args.gpus)],
                         processes=[Process(i // args.per_gpu, p.pid, 256 << 20)
                                    for i, p in enumerate(sleepers)])
            done = subprocess.run([sys.executable, "-m", "gpujobd.daemon.gpu.nvml_cli", "--bench-tick",
                                   "--repeat",
                                   str(args.repeat)], cwd=CHECKOUT, env=environ(libdir, script),
                                  capture_output=True, text=True, timeout=600)
    finally:
        for p in sleepers:
            p.kill()
        for p in sleepers:
            p.wait()
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        return done.returncode
    result = json.loads(done.stdout)
    print(json.dumps(result, indent=2))
    print(f"one watch tick, {result['devices']} GPUs x {args.per_gpu} processes: "
          f"{result['tick_ms_median']:.2f} ms median ({result['read_ms_median']:.2f} ms NVML + /proc on the "
          f"worker thread, {result['classify_ms_median']:.2f} ms attribution on the main loop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
