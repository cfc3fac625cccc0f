"""8. The queue: a freed GPU handed to the next job, 1,000 queued jobs, and an array with a slot limit.

Through the NVML test double (tests/nvml_double), loaded into the daemon by a runtime drop-in as in
section 7, never a real GPU.

- GPU freed -> next job's command running: job A holds the only GPU and prints the time just before
  it exits; job B, queued for that GPU, prints the time as its command starts. B - A is the whole
  hand-off: the scope's end seen, an immediate NVML reading asked for, the GPU released, the plan,
  the scope started. Beside it: one raw StartTransientUnit until the scope is active (the part any
  start costs). The poll interval is left at its default (5 s): the hand-off must not wait for it.
- 1,000 queued jobs: each waits for a blocker job (`--after`), submitted by one warm client; the first
  and last 100 submits' latencies side by side (flat: the queue does not make a submit slower), one
  `gpujobctl list` with them all queued, and the daemon's CPU at rest with 1,000 queued vs none.
  Stopping the blocker then ends all 1,000 `dependency-failed` (timed too).
- An array of 20 tasks x 3 s with %4 (seed 003): submit to last end, beside the ideal 20/4 x 3 s
  = 15 s and the serial 60 s.
"""

from __future__ import annotations

import json
import time
from typing import Any, List

from benchmarks import scopes
from benchmarks.params import Params
from benchmarks.sections import gpu as gpu_section
from benchmarks.stats import Dist, Row, check
from benchmarks.testbed import LIBDIR, SYSTEM_PYTHON, Testbed, cpu_seconds, sh
from benchmarks.timing import run_timed

SECTION = "queue"
QUEUED_JOBS = 1000
LIST_PAGE = 20  # what a person looks at: the newest jobs, queued ones included
ARRAY_TASKS, ARRAY_LIMIT, TASK_S = 20, 4, 3.0
IDLE_WINDOW_S = 3.0
UUID = "GPU-0000beef-0000-0000-0000-00000000queue"
_SUBMIT_MANY = (
    "import json, sys, time; sys.path.insert(0, {lib!r})\n"
    "from gpujobd.client import Client\nclient = Client(call_timeout_s=120)\nlatencies = []\n"
    "for _ in range({count}):\n"
    "    started = time.perf_counter()\n"
    "    client.submit(['true'], after=[{blocker}], raw=True)\n"
    "    latencies.append(time.perf_counter() - started)\n"
    "print(json.dumps(latencies))\n"
)


def run(bed: Testbed, p: Params) -> List[Row]:
    handoff = "GPU freed -> the next queued job's command runs (1 GPU, NVML double)"
    try:
        _with_double(bed)
        rows = [_handoff(bed, p, handoff)]
    except Exception as error:  # the double cannot be built here: say why, go on with the rest
        rows = [Row(SECTION, "queue.gpu_handoff", handoff,
                    missing=f"could not run: {type(error).__name__}: {str(error)[:200]}")]
    finally:
        gpu_section._restore(bed)
    rows += _thousand(bed, p)
    rows.append(_array(bed))
    return rows


# --- GPU hand-off ----------------------------------------------------------------------------------


def _with_double(bed: Testbed) -> None:
    libdir = gpu_section._build_double(bed)
    gpu_section._provide_pynvml()
    env = {"LD_LIBRARY_PATH": str(libdir), "NVML_DOUBLE_SCRIPT": str(gpu_section.SCRIPT)}
    script = _script_module(bed)
    gpu_section.SCRIPT.parent.mkdir(parents=True, exist_ok=True)
    script.write_script(gpu_section.SCRIPT, devices=[script.Device(uuid=UUID)])
    gpu_section.DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    gpu_section.DROP_IN.write_text("[Service]\n" + "".join(f"Environment={k}={v}\n"
                                                            for k, v in env.items()))
    sh("systemctl", "daemon-reload")
    bed.write_config("\n[gpu]\nwatch = true\n")
    bed.stop_daemon()
    bed.start_daemon()
    deadline = time.monotonic() + 30
    while not bed.client().gpus(raw=True).get("available"):
        check(time.monotonic() < deadline, "the daemon never read the NVML double's GPU")
        time.sleep(0.1)


def _script_module(bed: Testbed) -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_queue_script",
                                                  bed.source / "tests" / "nvml_double" / "script.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _handoff(bed: Testbed, p: Params, label: str) -> Row:
    samples = []
    for index in range(p.submit_warmup + p.submit_runs):
        first = _submit(bed, "--gpus", "1", "--", "sh", "-c", "sleep 0.3; date +%s.%N")
        second = _submit(bed, "--gpus", "1", "--", "date", "+%s.%N")
        client = bed.client()
        check(client.get(second, raw=True)["state"] == "queued", "the second job did not queue")
        for job_id in (first, second):
            ended = client.wait(job_id, timeout_s=60, raw=True)
            check(ended["state"] == "succeeded", f"job {job_id} ended {ended['state']}")
        freed = float(bed.job_log(first).read_text().split()[0])
        began = float(bed.job_log(second).read_text().split()[0])
        if index >= p.submit_warmup:
            samples.append(began - freed)
    _call, active = scopes.start_latency(p.submit_runs, p.submit_warmup)
    ours = Dist("gpujobd: A's last output -> B's command", "s", samples, p.submit_warmup)
    return Row(SECTION, "queue.gpu_handoff", label, ours, [active],
               note="includes A's exit and scope end, one NVML reading, and B's whole start")


def _submit(bed: Testbed, *args: str) -> int:
    return int(run_timed(bed.ctl("submit", *args), bed.user).stdout.split()[0])


# --- 1,000 queued jobs -------------------------------------------------------------------------------


def _thousand(bed: Testbed, p: Params) -> List[Row]:
    bed.write_config()
    bed.stop_daemon()
    bed.start_daemon()
    pid = bed.main_pid()
    rest_empty = _cpu_at_rest(pid)
    listing_empty = [run_timed(bed.ctl("list"), bed.user).seconds for _ in range(3)]
    page_empty = [run_timed(bed.ctl("list", "--limit", str(LIST_PAGE)), bed.user).seconds for _ in range(3)]
    blocker = _submit(bed, "--", "sleep", "3600")
    ran = run_timed([SYSTEM_PYTHON, "-I", "-c", _SUBMIT_MANY.format(lib=str(LIBDIR), count=QUEUED_JOBS,
                                                                    blocker=blocker)], bed.user)
    latencies: List[float] = json.loads(ran.stdout)
    queued = bed.client().list(all=True, state="queued", limit=QUEUED_JOBS + 10, raw=True)
    check(len(queued) == QUEUED_JOBS, f"{len(queued)} of {QUEUED_JOBS} jobs are queued")
    listing = [run_timed(bed.ctl("list"), bed.user).seconds for _ in range(3)]
    page = [run_timed(bed.ctl("list", "--limit", str(LIST_PAGE)), bed.user).seconds for _ in range(3)]
    rest_full = _cpu_at_rest(pid)
    started = time.perf_counter()
    bed.client().stop(blocker)
    bed.wait_idle(timeout_s=300)
    drained = time.perf_counter() - started
    failed = bed.client().list(all=True, state="failed", limit=QUEUED_JOBS + 10, raw=True)
    check(sum(job.get("reason") == "dependency-failed" for job in failed) == QUEUED_JOBS,
          "not every queued job ended dependency-failed")
    return [
        Row(SECTION, "queue.submit_flat", f"submit with {QUEUED_JOBS} jobs queued: the last 100 submits",
            Dist("Client().submit, submits 901-1000", "s", latencies[-100:]),
            [Dist("Client().submit, submits 1-100", "s", latencies[:100])],
            note="each event checks every queued job's dependencies (in-process, ~0.5 ms per 1,000 "
                 "jobs waiting on --after); their places and sentences are planned when asked"),
        Row(SECTION, "queue.list", f"`gpujobctl list` with {QUEUED_JOBS} queued jobs",
            Dist("gpujobctl list", "s", listing),
            [Dist("gpujobctl list, nothing queued", "s", listing_empty)],
            note="prints every queued job: grows with what it shows"),
        Row(SECTION, "queue.list_page",
            f"`gpujobctl list --limit {LIST_PAGE}` with {QUEUED_JOBS} queued jobs",
            Dist(f"list --limit {LIST_PAGE}", "s", page),
            [Dist(f"list --limit {LIST_PAGE}, nothing queued", "s", page_empty)]),
        Row(SECTION, "queue.idle_cpu", f"gpujobd CPU at rest with {QUEUED_JOBS} queued jobs",
            Dist(f"{QUEUED_JOBS} queued", "s/s", [rest_full]), [Dist("none queued", "s/s", [rest_empty])],
            note=f"one {IDLE_WINDOW_S:g} s window each; the queue plans on events only"),
        Row(SECTION, "queue.dependency_fail",
            f"blocker stopped -> {QUEUED_JOBS} jobs ended dependency-failed",
            Dist("stop to idle", "s", [drained]),
            [Dist(f"the {QUEUED_JOBS} submits, one after another", "s", [sum(latencies)])]),
    ]


def _cpu_at_rest(pid: int) -> float:
    before = cpu_seconds(pid)
    time.sleep(IDLE_WINDOW_S)
    return (cpu_seconds(pid) - before) / IDLE_WINDOW_S


# --- the array -------------------------------------------------------------------------------------------


def _array(bed: Testbed) -> Row:
    started = time.perf_counter()
    ran = run_timed(bed.ctl("submit", "--array", f"0-{ARRAY_TASKS - 1}%{ARRAY_LIMIT}", "--",
                            "sleep", f"{TASK_S:g}"), bed.user)
    tasks = [int(line) for line in ran.stdout.split()]
    check(len(tasks) == ARRAY_TASKS, f"the array has {len(tasks)} tasks")
    for task in tasks:
        ended = bed.client().wait(task, timeout_s=300, raw=True)
        check(ended["state"] == "succeeded", f"task {task} ended {ended['state']}")
    took = time.perf_counter() - started
    ideal = ARRAY_TASKS / ARRAY_LIMIT * TASK_S
    return Row(SECTION, "queue.array",
               f"array of {ARRAY_TASKS} x {TASK_S:g} s tasks with %{ARRAY_LIMIT}: submit to last end",
               Dist("gpujobd", "s", [took]),
               [Dist(f"ideal {ARRAY_TASKS}/{ARRAY_LIMIT} x {TASK_S:g} s", "s", [ideal]),
                Dist("serial", "s", [ARRAY_TASKS * TASK_S])])

