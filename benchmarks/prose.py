"""The performance page's sentences that judge a figure, computed from the figures.

Every claim the page makes about this run ("flat", "grows x1.8", "the 2 cores were 98% busy", "no process
survived") is a placeholder filled here from the results, so a regression changes the words as well as
the numbers. The template keeps only what no run can contradict: what was measured and how, the design
being measured, and proposals.
"""

from __future__ import annotations

import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.table import number

Rows = Dict[str, Dict[str, Any]]
FLAT_BELOW = 1.5  # a growth factor under this between two history sizes reads "flat"
SLOWED_ABOVE = 1.5  # another client's Get this much slower during a follow reads "slowed"
HISTORY_FIGURES = (  # key, how the page names it
    ("list", "the default `list`"),
    ("list_all", "`list --all --json | head`"),
    ("status", "`status ID`"),
    ("submit", "`submit`"),
    ("start", "the daemon's start"),
)


def derived(result: Dict[str, Any]) -> Dict[str, str]:
    rows: Rows = {row["key"]: row for row in result["rows"]}
    params = result["params"]
    found = {**_run(result), **_burst(rows, params, result["machine"]), **_logs(rows, params),
             **_history(rows, params), **_submit(rows), **_rest(rows, params)}
    return found


def _measured(rows: Rows, key: str) -> bool:
    return key in rows and "ours" in rows[key] and rows[key]["status"] == "measured"


def _p50(rows: Rows, key: str, peer: Optional[int] = None) -> float:
    row = rows[key]
    dist = row["ours"] if peer is None else row["peers"][peer]
    return float(dist["p50"])


def _ms(seconds: float) -> str:
    return number(seconds, "s")


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%"


def _size(n_bytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n_bytes >= 1 << shift:
            return f"{n_bytes / (1 << shift):g} {unit}"
    return f"{n_bytes} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --- the run --------------------------------------------------------------------------------------


def _run(result: Dict[str, Any]) -> Dict[str, str]:
    machine = result["machine"]
    if machine["where"] == "sandbox":
        where = ("The sandbox is a private systemd on this machine's kernel; its root is an overlay on "
                 "memory, so SQLite's fsync is nearly free here and will cost more on a real disk.")
    else:
        where = (f"Measured against this host's own systemd ({machine['where']}), its state on the host's "
                 "disk.")
    took = ""
    if result.get("finished_at"):
        seconds = (datetime.datetime.fromisoformat(result["finished_at"])
                   - datetime.datetime.fromisoformat(result["started_at"])).total_seconds()
        took = _duration(seconds)
    return {"where_text": where, "run_took": took or "an unrecorded time"}


# --- burst ----------------------------------------------------------------------------------------

CPU_PARTS = ("machine", "gpujobd", "systemd", "dbus-daemon")


def _burst(rows: Rows, params: Dict[str, Any], machine: Dict[str, Any]) -> Dict[str, str]:
    if not _measured(rows, "burst.rate"):
        return {}
    found: Dict[str, str] = {}
    burst = rows["burst.rate"]
    limit_runs = burst["peers"][0]["detail"]["runs"]
    for side, runs in (("ours", burst["ours"]["detail"]["runs"]), ("limit", limit_runs)):
        per_job = _cpu_per_job(runs, len(runs) * params["burst_jobs"])
        for part, value in per_job.items():
            found[f"burst__{side}__cpu_ms_per_job__{part.replace('-', '_')}"] = f"{value:.1f} ms"
        if side == "ours":
            rest = per_job["machine"] - sum(per_job[part] for part in CPU_PARTS[1:])
            found["burst__ours__cpu_ms_per_job__rest"] = f"{rest:.1f} ms"
            found["burst__cores_busy"] = _cores_busy(runs, machine["cpus"])
    found["burst__foreign_units"] = _foreign_units(limit_runs, params["burst_jobs"])
    return found


def _cpu_per_job(runs: Sequence[Dict[str, Any]], jobs: int) -> Dict[str, float]:
    return {part: sum(r["cpu_s"][part] for r in runs) / jobs * 1000 for part in CPU_PARTS}


def _cores_busy(runs: Sequence[Dict[str, Any]], cpus: int) -> str:
    cpu_s = sum(r["cpu_s"]["machine"] for r in runs)
    wall_s = sum(r["seconds"] for r in runs)
    return f"the machine's {cpus} cores were {_percent(cpu_s, wall_s * cpus)} busy"


def _foreign_units(limit_runs: Sequence[Dict[str, Any]], jobs_per_run: int) -> str:
    """What gpujobd spent while the raw loop started scopes that are not its own."""
    per_scope = sum(r["cpu_s"]["gpujobd"] for r in limit_runs) / (len(limit_runs) * jobs_per_run) * 1000
    if per_scope < 0.05:
        return "gpujobd spent no measurable CPU on the raw loop's scopes, which are not its own"
    return (f"gpujobd spent {per_scope:.1f} ms of CPU per scope of the raw loop, scopes not its own: it "
            "receives every unit's `PropertiesChanged` on the machine and filters them in Python")


# --- logs -----------------------------------------------------------------------------------------


def _logs(rows: Rows, params: Dict[str, Any]) -> Dict[str, str]:
    found = {"logs__target_size": _size(params["log_bytes"]),
             "logs__budget": _duration(params["log_budget_s"]),
             "logs__measured_size": "not measured", "logs__warmups": "not measured"}
    if not _measured(rows, "logs.bytes_ratio"):
        return found
    detail = rows["logs.bytes_ratio"]["ours"]["detail"]
    found["logs__measured_size"] = _size(detail["bytes"])
    found["logs__size_note"] = _size_note(detail, params)
    found["logs__warmups"] = _warmups(detail["probe"])
    if _measured(rows, "logs.get_during_follow"):
        row = rows["logs.get_during_follow"]
        slowdown = row["ours"]["max"] / row["peers"][0]["max"]
        found["logs__get_verdict"] = (
            f"another client's calls were up to {slowdown:.1f}x slower during a follow (the daemon "
            "serves one call at a time)" if slowdown > SLOWED_ABOVE else
            f"another client's calls were barely slowed by a follow (max x{slowdown:.2f})")
    return found


def _warmups(probe: Dict[str, Any]) -> str:
    """The warm-up follows this run made (runs before they grew recorded one, without its sizes)."""
    sizes = probe.get("warmup_sizes", [probe["bytes"]])
    which = "one warm-up follow" if len(sizes) == 1 else f"{len(sizes)} warm-up follows"
    return f"{which} of {', '.join(_size(n) for n in sizes)}, the last at {probe['follow_mb_s']:.2f} MB/s"


def _size_note(detail: Dict[str, Any], params: Dict[str, Any]) -> str:
    target = detail.get("target_bytes", params["log_bytes"])
    if detail["bytes"] == target:
        return "the size the run aims at"
    probe = detail["probe"]
    would_take = target / 1e6 / probe["follow_mb_s"]
    return (f"not the {_size(target)} the run aims at: at the warm-up follow's "
            f"{probe['follow_mb_s']:.2f} MB/s "
            f"({_size(probe['bytes'])}), {_size(target)} would have taken {_duration(would_take)}, past the "
            f"{_duration(params['log_budget_s'])} a measured follow may take, so the size was halved until "
            "it fit")


# --- history --------------------------------------------------------------------------------------


def _history(rows: Rows, params: Dict[str, Any]) -> Dict[str, str]:
    sizes: List[int] = list(params["history_sizes"])
    lines = [_history_line(rows, name, f"history.{key}", sizes, "p50") for key, name in HISTORY_FIGURES]
    rss = "the daemon's RSS, sampled after each query"
    lines.append(_history_line(rows, rss, "daemon.rss", sizes, "max"))
    return {"history__text": "\n".join(f"- {line}" for line in lines if line)}


def _history_line(rows: Rows, name: str, prefix: str, sizes: Sequence[int], stat: str) -> str:
    keys = [f"{prefix}_{n}" for n in sizes[1:]]
    if not all(key in rows and "ours" in rows[key] for key in keys):
        return f"{name}: not measured"
    base = rows[keys[0]]["peers"][0]
    points: List[Tuple[int, float, str]] = [(sizes[0], base[stat], base["unit"])]
    points += [(n, rows[key]["ours"][stat], rows[key]["ours"]["unit"]) for n, key in zip(sizes[1:], keys)]
    parts = [f"{number(points[0][1], points[0][2])} at {points[0][0]:,} jobs"]
    for (n0, v0, _), (n1, v1, unit) in zip(points, points[1:]):
        parts.append(f"{number(v1, unit)} at {n1:,} (x{v1 / v0:.2f} from {n0:,})")
    failed = [rows[key]["status"] for key in keys if rows[key]["status"] != "measured"]
    verdict = f"failed: {failed[0]}" if failed else _growth_word(points[-2], points[-1])
    return f"{name} ({stat}): " + ", ".join(parts) + f"; {verdict}"


def _growth_word(small: Tuple[int, float, str], large: Tuple[int, float, str]) -> str:
    grew, history_grew = large[1] / small[1], large[0] / small[0]
    if grew < FLAT_BELOW:
        return f"flat from {small[0]:,} to {large[0]:,} jobs"
    if grew > 0.5 * history_grew:
        return f"O(n): x{grew:.1f} for x{history_grew:g} the history"
    return f"grows x{grew:.1f} for x{history_grew:g} the history"


# --- submit ---------------------------------------------------------------------------------------


def _submit(rows: Rows) -> Dict[str, str]:
    found: Dict[str, str] = {}
    if _measured(rows, "submit.cli"):
        row = rows["submit.cli"]
        cli, floor = _p50(rows, "submit.cli"), _p50(rows, "submit.cli", 2)
        with_own = _p50(rows, "submit.cli", 3)
        found["submit__import_share"] = _percent(with_own, cli)
        found["submit__floor_modules"] = str(len(row["peers"][2]["detail"]["modules"]))
        own = len(row["peers"][3]["detail"]["modules"]) - len(row["peers"][2]["detail"]["modules"])
        found["submit__own_modules"] = str(own)
        found["submit__own_import"] = _ms(with_own - floor)
        found["submit__after_imports"] = _ms(cli - with_own)
    found["submit__supervisor_share"] = "not measured"  # runs before issue 13 had no such peer
    if _measured(rows, "submit.client_to_running") and len(rows["submit.client_to_running"]["peers"]) > 2:
        total, supervisor = _p50(rows, "submit.client_to_running"), _p50(rows, "submit.client_to_running", 2)
        found["submit__supervisor_share"] = _percent(supervisor, total)
    return found


# --- stop, the daemon at rest, the GPU watcher ----------------------------------------------------


def _rest(rows: Rows, params: Dict[str, Any]) -> Dict[str, str]:
    found = {"stop__timeout": f"{params['stop_timeout_s']:g} s", "stop__levels": str(params["tree_levels"]),
             "stop__processes": str(10 * params["tree_levels"]),
             "history__base": f"{params['history_sizes'][0]:,}",
             "daemon__load_jobs": str(params["load_jobs"]), "gpu__devices": str(params["gpu_devices"]),
             "gpu__processes": str(params["gpu_processes"]), "burst__clients": str(params["burst_clients"]),
             "burst__jobs": str(params["burst_jobs"]), "burst__warmup_jobs": str(params["burst_warmup_jobs"])}
    stops = [rows.get("stop.ignoring"), rows.get("stop.plain")]
    if all(row and row["status"] == "measured" for row in stops):
        found["stop__survivors"] = "No process survived any stop (/proc was searched after each)."
    else:
        found["stop__survivors"] = "Not every stop was measured: see the table."
    if _measured(rows, "stop.plain"):
        found["stop__plain_difference"] = _ms(_p50(rows, "stop.plain") - _p50(rows, "stop.plain", 0))
    return found
