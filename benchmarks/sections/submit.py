"""1. Submit as a user feels it, and submit until the job's command runs.

Each gpujobd job is waited for (untimed) before the next submit, so every sample starts on a quiet
daemon. systemd-run runs as root (a user may not create system scopes without polkit); tsp and
gpujobctl run as the bench user.
"""

from __future__ import annotations

import json
import time
from typing import Callable, List, Optional, Sequence, Tuple

from benchmarks import scopes
from benchmarks.params import Params
from benchmarks.stats import Dist, Row, check
from benchmarks.testbed import LIBDIR, SYSTEM_PYTHON, Testbed
from benchmarks.timing import interleaved, repeat, run_timed

SECTION = "submit"
_PROBE = (
    "import sys; sys.path.insert(0, {lib!r}); before = set(sys.modules); "
    "from gpujobd.cli.main import main; code = main(['submit', '--', 'true']); "
    "loaded = [k for k, m in sys.modules.items() if k not in before and getattr(m, '__name__', '') == k "
    "and getattr(m, '__spec__', None) is not None]; "
    "import json; sys.stderr.write(json.dumps(loaded))"
)
_FLOOR = "import sys; sys.path.insert(0, {lib!r})\nfor name in {names!r}:\n    __import__(name)"


def run(bed: Testbed, p: Params) -> List[Row]:
    modules = cli_modules(bed)
    third_party = [name for name in modules if not name.startswith("gpujobd")]
    client_dist, client_run = _agent(bed, p)
    call, active = scopes.start_latency(p.submit_runs, p.submit_warmup)
    _call, paced = scopes.start_latency(p.submit_runs, p.submit_warmup, scopes.PACED_PAUSE_S)
    ours, *peers = interleaved([
        ("gpujobctl submit -- true", lambda: _cli_submit(bed)),
        ("systemd-run --scope true (root)",
         lambda: run_timed(["systemd-run", "--scope", "-q", "true"]).seconds),
        ("tsp -f true (task-spooler, user)", lambda: run_timed(["tsp", "-f", "true"], bed.user).seconds),
        _floor(bed, f"floor: python3 -I -c 'import' of the {len(third_party)} modules gpujobctl loads, "
               "gpujobd's own excluded", third_party),
        _floor(bed, f"floor + gpujobd's own {len(modules) - len(third_party)} modules", modules),
    ], p.submit_runs, p.submit_warmup)
    for peer, names in ((peers[2], third_party), (peers[3], modules)):
        peer.detail["modules"] = list(names)
    return [
        Row(SECTION, "submit.cli", "`gpujobctl submit -- true`, process start to exit (user)", ours, peers,
            note="the floors are the interpreter start and imports gpujobctl cannot avoid; each run of "
                 "the five commands in turn, so the machine's drift moves them alike"),
        Row(SECTION, "submit.client", "`Client().submit(['true'])` from a warm process (user)",
            client_dist, [call], note="the limit: one raw StartTransientUnit call, warm"),
        Row(SECTION, "submit.cli_to_running", "`gpujobctl submit -- date`: process start until "
            "`date` runs", _cli_to_running(bed, p),
            [_printed_time("systemd-run --scope date (root)",
                           ["systemd-run", "--scope", "-q", "date", "+%s.%N"], p),
             _printed_time("tsp -nf date (task-spooler, user)", ["tsp", "-n", "-f", "date", "+%s.%N"],
                           p, bed)]),
        Row(SECTION, "submit.client_to_running", "`Client().submit()` until the command runs (warm, "
            f"each submit {scopes.PACED_PAUSE_S * 1000:g} ms after the last job ended)",
            client_run, [paced, active, _supervisor_floor(bed, p)],
            note="the limit: raw StartTransientUnit until the scope is active, paced as gpujobd's submits "
                 "(the ratio), and back to back"),
    ]


def cli_modules(bed: Testbed) -> List[str]:
    """Every module `gpujobctl submit -- true` imports, in import order (aliases left out); it submits
    one real job to find out."""
    ran = run_timed([SYSTEM_PYTHON, "-I", "-c", _PROBE.format(lib=str(LIBDIR))], bed.user)
    bed.client().wait(int(ran.stdout.split()[0]))
    names = json.loads(ran.stderr.strip().splitlines()[-1])
    check(isinstance(names, list) and any(n.startswith("jeepney") for n in names),
          f"unexpected module list from the probe: {ran.stderr[-300:]}")
    return [name for name in names if _importable(name)]


def _importable(name: str) -> bool:
    """Modules a script imports by name: not private ones and not gi's overrides, which their public
    modules pull in (importing an override first fails)."""
    return not any(part.startswith("_") for part in name.split(".")) and not name.startswith("gi.overrides")


def _floor(bed: Testbed, label: str, names: Sequence[str]) -> Tuple[str, Callable[[], float]]:
    argv = [SYSTEM_PYTHON, "-I", "-c", _FLOOR.format(lib=str(LIBDIR), names=list(names))]
    return label, lambda: run_timed(argv, bed.user).seconds


def _supervisor_floor(bed: Testbed, p: Params) -> Dist:
    label, measure = _floor(bed, "a supervisor's interpreter start (python3 -I, gpujobd.supervisor "
                            "imported), off the path since the zygote forks supervisors",
                            ["gpujobd.supervisor"])
    return repeat(label, measure, p.submit_runs, p.submit_warmup)


def _submitted(bed: Testbed, stdout: str) -> int:
    job_id = int(stdout.split()[0])
    bed.client().wait(job_id)
    return job_id


def _cli_submit(bed: Testbed) -> float:
    """One `gpujobctl submit -- true`, timed; its job waited for, untimed."""
    ran = run_timed(bed.ctl("submit", "--", "true"), bed.user)
    _submitted(bed, ran.stdout)
    return ran.seconds


def _cli_to_running(bed: Testbed, p: Params) -> Dist:
    def once() -> float:
        wall = time.time()
        ran = run_timed(bed.ctl("submit", "--", "date", "+%s.%N"), bed.user)
        job_id = _submitted(bed, ran.stdout)
        return float(bed.job_log(job_id).read_text().split()[0]) - wall
    return _repeat("gpujobctl submit -- date +%s.%N", once, p)


def _printed_time(label: str, argv: Sequence[str], p: Params, bed: Optional[Testbed] = None) -> Dist:
    """Until the command ran, by the time it printed (argv prints `date +%s.%N`)."""
    def once() -> float:
        wall = time.time()
        ran = run_timed(argv, bed.user if bed is not None else None)
        return float(ran.stdout.split()[0]) - wall
    return _repeat(label, once, p)


def _repeat(label: str, once: Callable[[], float], p: Params) -> Dist:
    samples = [once() for _ in range(p.submit_warmup + p.submit_runs)][p.submit_warmup:]
    return Dist(label, "s", samples, p.submit_warmup)


def _agent(bed: Testbed, p: Params) -> Tuple[Dist, Dist]:
    plain = json.loads(run_timed(bed.agent("submit", "--runs", str(p.submit_runs), "--warmup",
                                           str(p.submit_warmup)), bed.user).stdout)
    dated = json.loads(run_timed(bed.agent("submit", "--date", "--pause", str(scopes.PACED_PAUSE_S),
                                           "--runs", str(p.submit_runs), "--warmup", str(p.submit_warmup)),
                                 bed.user).stdout)
    return (Dist("Client().submit(['true'])", "s", plain["submit_s"], p.submit_warmup),
            Dist("Client().submit(['date', ...]) until it runs", "s", dated["to_running_s"],
                 p.submit_warmup))
