"""4. History scale: the CLI's cost at each of params.history_sizes ended jobs in the daemon's state.

For each size the daemon is stopped, its state emptied, the database seeded with
benchmarks.seed (jobs that ended SEED_INTERVAL_S apart, the newest that long ago: a busy server's
history), and the daemon started again. The interval puts 100 jobs in the last hour at every size, so
the default `list` shows the same 100 jobs whatever the history (with 10 s, the first runs compared
360 jobs shown at 10 000 with 100 at 100, a 3.6x longer output, not a longer history).
Each figure at a size stands beside the same figure at the smallest
size: a ratio near 1 is flat, near the size ratio is O(n). The daemon's RSS is sampled after every
query; its start (systemctl start until READY=1, reconcile included) is timed by restarting it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from benchmarks.params import Params
from benchmarks.stats import Dist, Row
from benchmarks.testbed import DB_FILE, GPUJOBCTL, STATE_DIR, Testbed, rss_bytes, sh
from benchmarks.timing import Ran, run_timed

SECTION = "history"
MIB = float(1 << 20)
SEED_INTERVAL_S = 36.0  # 3600 s / 100: the last hour holds the smallest size's 100 jobs at every size
FIGURES = (  # key, figure
    ("list", "`gpujobctl list` (default view: active jobs and those ended in the last hour, 100 at "
             "every size)"),
    ("list_all", "`gpujobctl list --all --json | head`"),
    ("status", "`gpujobctl status ID` (a job in the middle of the history)"),
    ("submit", "`gpujobctl submit -- true`"),
    ("start", "daemon start: `systemctl start gpujobd` until ready (reconcile included)"),
)


def run(bed: Testbed, p: Params) -> List[Row]:
    at = {n: _at_scale(bed, p, n) for n in p.history_sizes}
    base = p.history_sizes[0]
    rows = []
    for key, figure in FIGURES:
        for n in p.history_sizes[1:]:
            dist, failed = at[n][key]
            rows.append(Row(SECTION, f"history.{key}_{n}", f"{figure}, {n:,} jobs in history", dist,
                            [at[base][key][0]], failed=failed, note=_growth(at, p.history_sizes, key)))
    for n in p.history_sizes[1:]:
        rows.append(Row("daemon", f"daemon.rss_{n}", f"gpujobd RSS with {n:,} ended jobs in history "
                        "(sampled after each query above)", at[n]["rss"][0], [at[base]["rss"][0]],
                        ratio_of="max", note=_growth(at, p.history_sizes, "rss", "max")))
    return rows


Figure = Tuple[Dist, str]  # samples, and what failed ('' if nothing)


def _growth(at: Dict[int, Dict[str, Figure]], sizes: Any, key: str, stat: str = "p50") -> str:
    small, large = sizes[-2], sizes[-1]
    ratio = at[large][key][0].summary()[stat] / at[small][key][0].summary()[stat]
    if at[large][key][1]:
        return f"failed at {large:,} jobs; until then at least x{ratio:.1f} from {small:,} jobs"
    kind = "flat" if ratio < 1.5 else "O(n)" if ratio > 0.5 * large / small else "grows"
    return f"{kind}: {stat} x{ratio:.2f} from {small:,} to {large:,} jobs (x{large / small:g} the history)"


def _seed(bed: Testbed, n: int) -> None:
    from benchmarks.seed import seed_ended_jobs  # imports gpujobd: only inside the testbed

    bed.reset_state()
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    seed_ended_jobs(DB_FILE, n, bed.user.name, bed.user.uid, bed.user.gid, time.time(),
                    interval_s=SEED_INTERVAL_S)


class _Scale:
    """The figures at one history size; the daemon's RSS is sampled after every command."""

    def __init__(self, bed: Testbed, n: int) -> None:
        self.bed = bed
        self.n = n
        self.daemon = bed.main_pid()
        self.rss: List[float] = []

    def timed(self, argv: List[str], runs: int, after: Optional[Callable[[Ran], str]] = None) -> Figure:
        """One warm-up and `runs` runs; a run that fails ends the figure (its time is the sample)."""
        samples: List[float] = []
        for index in range(1 + runs):
            ran = run_timed(argv, self.bed.user)
            failed = after(ran) if after is not None else ""
            failed += self._sample_rss()
            if failed:
                self.bed.wait_responsive()
                return Dist(f"{self.n:,} jobs", "s", [*samples, ran.seconds], min(index, 1)), failed
            if index:
                samples.append(ran.seconds)
        return Dist(f"{self.n:,} jobs", "s", samples, 1), ""


    def _sample_rss(self) -> str:
        """Sample the daemon's RSS; if it is gone, say why (the journal) and follow its successor."""
        try:
            self.rss.append(rss_bytes(self.daemon) / MIB)
            self.hwm = max(getattr(self, "hwm", 0.0), _vm_hwm_mib(self.daemon))
            return ""
        except OSError:
            journal = sh("journalctl", "-u", "gpujobd", "-n", "8", "--no-pager", "-o", "cat",
                         check_rc=False).stdout.strip().replace("\n", " | ")
            self.bed.wait_responsive()
            self.daemon = self.bed.main_pid()
            return f"; gpujobd (pid {self.daemon}) exited meanwhile, systemd restarted it: {journal[-400:]}"


def _at_scale(bed: Testbed, p: Params, n: int) -> Dict[str, Figure]:
    _seed(bed, n)
    starts = []
    for _ in range(1 + p.history_runs // 2):
        bed.stop_daemon()
        starts.append(bed.start_daemon())
    scale = _Scale(bed, n)
    first_id = bed.client().list(all=True, limit=1, raw=True)[0]["id"] - n + 1
    figures = {
        "list": scale.timed(bed.ctl("list"), p.history_runs),
        "status": scale.timed(bed.ctl("status", str(first_id + n // 2)), p.history_runs),
        "submit": scale.timed(bed.ctl("submit", "--", "true"), p.history_runs,
                              lambda ran: _waited(bed, ran)),
        # last: at large sizes it fails and keeps the daemon busy long after the client gave up
        "list_all": scale.timed(["sh", "-c", f"{GPUJOBCTL} list --all --json | head"],
                                p.history_all_runs, _head_failed),
        "start": (Dist(f"{n:,} jobs", "s", starts[1:], 1), ""),
    }
    figures["rss"] = (Dist(f"{n:,} jobs", "MiB", scale.rss, 0, {"VmHWM_MiB": getattr(scale, "hwm", 0.0)}), "")
    return figures


def _waited(bed: Testbed, ran: Ran) -> str:
    bed.client().wait(int(ran.stdout.split()[0]))
    return ""


def _head_failed(ran: Ran) -> str:
    """`| head` hides gpujobctl's exit status: a failure shows as its error line and no output."""
    if "gpujobctl:" in ran.stderr or not ran.stdout.strip():
        return ran.stderr.strip()[:300] or "no output"
    return ""


def _vm_hwm_mib(pid: int) -> float:
    """The daemon's peak RSS so far (OSError if it is gone)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
