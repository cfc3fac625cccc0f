"""7. The GPU watcher: one watch tick with 8 GPUs x 100 processes, and the daemon's idle CPU with it on.

Through the NVML test double (tests/nvml_double, built here), never a real GPU: 8 jobs each run 100
sleeping processes, and the double's script puts each job's sleepers on one GPU. The tick is the
watcher's `bench_tick` (gpujobd.daemon.gpu.nvml_cli: NVML, /proc and attribution), run in a child
whose LD_LIBRARY_PATH puts the double first; each sample is the median of a few ticks of a fresh
watcher. Its limit is the poll interval (gpu.poll_interval_s): the tick's share of it is the
watcher's duty cycle. The idle CPU is taken like section 6's, with gpu.watch on, beside the same
windows with it off, with the double loaded into the daemon through a runtime drop-in.

While the watcher is not part of the gpujobd being benchmarked, the rows say so and nothing is run.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from benchmarks.params import Params
from benchmarks.sections.daemon import _cpu_windows, _total
from benchmarks.stats import Dist, Row, check
from benchmarks.testbed import CHECKOUT, LIBDIR, SYSTEM_PYTHON, Testbed, sh
from benchmarks.timing import run_timed

SECTION = "gpu"
NVML_READER = "gpujobd/daemon/adapters/nvml.py"
POLL_INTERVAL_S = 5.0  # gpu.poll_interval_s's default
DROP_IN = Path("/run/systemd/system/gpujobd.service.d/bench-nvml-double.conf")
SCRIPT = Path("/run/gpujobd-bench-nvml/script")
_TICK = (
    "import json, sys; sys.path.insert(0, {lib!r})\n"
    "from gpujobd.daemon.adapters.nvml import Nvml\nfrom gpujobd.shared.log import configure_logging\n"
    "from gpujobd.daemon.gpu.nvml_cli import bench_tick\n"
    "configure_logging('console', 'error'); nvml = Nvml()\n"
    "print(json.dumps([bench_tick(nvml, repeat={ticks}) for _ in range({runs})]))\n"
)


def run(bed: Testbed, p: Params) -> List[Row]:
    tick = f"GPU watcher: one watch tick, {p.gpu_devices} GPUs x {p.gpu_processes} processes (NVML double)"
    idle = "gpujobd CPU at rest with the GPU watcher on (8 jobs on 8 GPUs through the NVML double)"
    if not ((bed.source / NVML_READER).exists() and (bed.source / "tests" / "nvml_double").is_dir()):
        missing = f"the gpujobd benchmarked has no {NVML_READER} or tests/nvml_double"
        return [Row(SECTION, "gpu.tick", tick, missing=missing),
                Row(SECTION, "gpu.idle_cpu", idle, missing=missing)]
    try:
        return _measure(bed, p, tick, idle)
    except Exception as error:  # work in progress elsewhere: say why, do not sink the other sections
        reason = f"GPU watcher benchmark could not run: {type(error).__name__}: {str(error)[:200]}"
        return [Row(SECTION, "gpu.tick", tick, missing=reason),
                Row(SECTION, "gpu.idle_cpu", idle, missing=reason)]
    finally:
        _restore(bed)


def _measure(bed: Testbed, p: Params, tick: str, idle: str) -> List[Row]:
    libdir = _build_double(bed)
    _provide_pynvml()
    jobs = _gpu_jobs(bed, p)
    _write_script(bed, p, jobs)
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(libdir), "NVML_DOUBLE_SCRIPT": str(SCRIPT)}
    ticks = _ticks(p, env)
    off, on = _idle_cpu(bed, p, env)
    for job_id in jobs:
        bed.client().stop(job_id)
    bed.wait_idle()
    interval = Dist(f"poll interval (gpu.poll_interval_s = {POLL_INTERVAL_S:g} s)", "s",
                    [POLL_INTERVAL_S] * len(ticks.samples))
    return [Row(SECTION, "gpu.tick", tick, ticks, [interval],
                note="each sample: the median of a fresh watcher's ticks; ratio = duty cycle"),
            Row(SECTION, "gpu.idle_cpu", idle, on, [off], note=_total(on))]


def _build_double(bed: Testbed) -> Path:
    outdir = CHECKOUT / "build" / "nvml-double"
    sh("sh", str(bed.source / "tests" / "nvml_double" / "build.sh"), str(outdir), timeout=600)
    return outdir


def _provide_pynvml() -> None:
    """The installed daemon runs the system's python3; give it this environment's pynvml if it has none."""
    if sh(SYSTEM_PYTHON, "-I", "-c", f"import sys; sys.path.insert(0, {str(LIBDIR)!r}); import pynvml",
          check_rc=False).returncode == 0:
        return
    import pynvml

    shutil.copy(pynvml.__file__, LIBDIR / "pynvml.py")


def _gpu_jobs(bed: Testbed, p: Params) -> List[int]:
    loop = (f"i=0; while [ $i -lt {p.gpu_processes} ]; do sleep 9999 & i=$((i+1)); done; wait")
    jobs = [int(run_timed(bed.ctl("submit", "--", "sh", "-c", loop), bed.user).stdout.split()[0])
            for _ in range(p.gpu_devices)]
    deadline = time.monotonic() + 120
    for job_id in jobs:
        while len(_sleepers(bed, job_id)) < p.gpu_processes:
            check(time.monotonic() < deadline, f"GPU job {job_id} never started its processes")
            time.sleep(0.05)
    return jobs


def _sleepers(bed: Testbed, job_id: int) -> List[int]:
    from benchmarks.testbed import cgroup_pids

    found = []
    for pid in cgroup_pids(bed.scope_cgroup(f"gpujob-{job_id}.scope")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                found.append(pid)
        except OSError:
            pass
    return found


def _write_script(bed: Testbed, p: Params, jobs: List[int]) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_nvml_script", bed.source / "tests" / "nvml_double" / "script.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while the class is built
    spec.loader.exec_module(script)
    SCRIPT.parent.mkdir(parents=True, exist_ok=True)
    devices = [script.Device(uuid=f"GPU-{i:08x}-0000-0000-0000-00000000bench", memory_used=40 << 30)
               for i in range(p.gpu_devices)]
    processes = [script.Process(index, pid, 256 << 20) for index, job_id in enumerate(jobs)
                 for pid in _sleepers(bed, job_id)]
    script.write_script(SCRIPT, devices=devices, processes=processes)


def _ticks(p: Params, env: Dict[str, str]) -> Dist:
    code = _TICK.format(lib=str(LIBDIR), ticks=3, runs=1 + p.gpu_ticks)
    done = sh(SYSTEM_PYTHON, "-I", "-c", code, env=env, timeout=600)
    results: List[Dict[str, Any]] = json.loads(done.stdout)
    check(results[-1]["devices"] == p.gpu_devices, f"the watcher saw {results[-1]['devices']} GPUs")
    check(results[-1]["processes"] == p.gpu_devices * p.gpu_processes,
          f"the watcher saw {results[-1]['processes']} GPU processes")
    return Dist("gpujobd watcher tick (bench_tick)", "s", [r["tick_ms_median"] / 1000 for r in results[1:]],
                1, {"ticks": results})


def _idle_cpu(bed: Testbed, p: Params, env: Dict[str, str]) -> Tuple[Dist, Dist]:
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text("[Service]\n" + "".join(f"Environment={k}={v}\n" for k, v in env.items()
                                               if k != "PATH"))
    sh("systemctl", "daemon-reload")
    results = []
    for watch in ("false", "true"):
        bed.write_config(f"\n[gpu]\nwatch = {watch}\npoll_interval_s = {POLL_INTERVAL_S}\n")
        bed.stop_daemon()
        bed.start_daemon()
        time.sleep(POLL_INTERVAL_S + 1)  # the first ticks: every process is news
        if watch == "true":
            _check_watched(p)
        ours, _systemd = _cpu_windows(bed, p)
        ours.label = f"gpujobd, gpu.watch = {watch}"
        results.append(ours)
    return results[0], results[1]


def _check_watched(p: Params) -> None:
    """The daemon's own report must list the double's GPUs, or the windows measure a failing watcher."""
    report = sh("busctl", "--system", "-j", "call", "org.gpujobd1", "/org/gpujobd1", "org.gpujobd1.Manager",
                "Gpus").stdout
    seen = report.count("00000000bench")
    check(seen >= p.gpu_devices, f"the daemon's watcher reports {seen} of the {p.gpu_devices} GPUs")


def _restore(bed: Testbed) -> None:
    if DROP_IN.exists():
        DROP_IN.unlink()
        sh("systemctl", "daemon-reload", check_rc=False)
    bed.write_config()
    sh("systemctl", "restart", "gpujobd", check_rc=False)
    bed._client = None
