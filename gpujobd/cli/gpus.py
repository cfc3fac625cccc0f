"""`gpujobctl gpus`: the GPU report as text, like nvidia-smi's process table but with owners; and the
one-line warning `gpujobctl status` prints while stray processes hold GPUs. Pure formatting of the
report as the client returns it with raw=True (the wire dict, see api.GPU_REPORT_FIELDS), and at the
end the verb's parser and handler."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

from gpujobd.cli import common
from gpujobd.shared import api, errors

COMMAND_CHARS = 60


def size(count: Optional[int]) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _command(process: Mapping[str, Any]) -> str:
    text = " ".join(process.get("command") or [])
    if not text:
        return f"({process['note']})" if process.get("note") else "-"
    return text if len(text) <= COMMAND_CHARS else text[:COMMAND_CHARS - 3] + "..."


def _owner(process: Mapping[str, Any]) -> str:
    owner = process.get("owner", "")
    if owner == "job":
        return f"job {process.get('job_id')}"
    if owner == "stray":
        return "STRAY"
    if owner == "unknown":
        return "?"
    return owner


def format_gpus(report: Mapping[str, Any]) -> List[str]:
    lines: List[str] = []
    if not report.get("available"):
        state = report.get("state", "unavailable")
        line = f"GPUs {state}: {report.get('reason') or 'no reason given'}"
        if report.get("retry_in_s") is not None:
            line += f" (next try in {report['retry_in_s']:g} s)"
        lines.append(line)
    devices = report.get("devices") or []
    if devices:
        rows = [["GPU", "UUID", "NAME", "MEMORY", "UTIL", "STATE"]]
        for device in devices:
            util = device.get("utilization_gpu_percent")
            state = device.get("state", "ok")
            if device.get("errors"):
                state += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(device["errors"].items())) + ")"
            memory = f"{size(device.get('memory_used_bytes'))} / {size(device.get('memory_total_bytes'))}"
            rows.append([str(device.get("index")), device.get("uuid") or "-", device.get("name") or "-",
                         memory, "-" if util is None else f"{util}%", state])
        lines += _table(rows)
        processes = [[str(device.get("index")), str(p.get("pid")), p.get("type", "-"),
                      size(p.get("used_memory_bytes")), _owner(p), p.get("user") or "-", age(p.get("age_s")),
                      p.get("unit") or p.get("cgroup") or "-", _command(p)]
                     for device in devices for p in device.get("processes") or []]
        lines.append("")
        if processes:
            lines += _table([["GPU", "PID", "TYPE", "MEMORY", "OWNER", "USER", "AGE", "UNIT", "COMMAND"],
                             *processes])
        else:
            lines.append("no processes on the GPUs")
    elif report.get("available"):
        lines.append("no GPUs")
    strays = report.get("strays") or []
    if strays:
        lines.append("")
        lines.append(f"{len(strays)} stray process{'es' if len(strays) != 1 else ''} (policy "
                     f"{report.get('policy', 'report')}):")
        for stray in strays:
            gpus = ",".join(str(index) for index in stray.get("gpu_indexes") or []) or "?"
            note = f"; {stray['note']}" if stray.get("note") else ""
            lines.append(f"  PID {stray.get('pid')} (parent {stray.get('ppid')}) of {stray.get('user')} "
                         f"on GPU {gpus}, {size(stray.get('used_memory_bytes'))}, up "
                         f"{age(stray.get('age_s'))}: {stray.get('action', '')}{note}")
    return lines


def stray_warning(report: Mapping[str, Any]) -> Optional[str]:
    """One line for `gpujobctl status` while strays hold GPUs; None when there are none."""
    strays = report.get("strays") or []
    if not strays:
        return None
    some = ", ".join(f"PID {s.get('pid')} of {s.get('user')} on GPU "
                     f"{','.join(str(i) for i in s.get('gpu_indexes') or []) or '?'}" for s in strays[:3])
    more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
    return (f"warning: {len(strays)} stray GPU process{'es' if len(strays) != 1 else ''} outside any job "
            f"({some}{more}): see `gpujobctl gpus`")


def gpu_memory_line(job: Mapping[str, Any]) -> Optional[str]:
    """`gpu memory: GPU-5ad1c0a4... 10.0 GiB` for `gpujobctl status` of a live job using GPUs."""
    used = job.get("gpu_memory_bytes")
    if not used:
        return None
    return "gpu memory: " + ", ".join(f"{gpu} {size(count)}" for gpu, count in sorted(used.items()))


# --- the verb ----------------------------------------------------------------------------------------


def add_parser(verbs: Any) -> None:
    sub = common.add_verb(verbs, "gpus", "show the GPUs, the processes on them and who owns each (job, "
                          "unit, STRAY)", "Stray processes hold GPU memory outside every job; see gpujobd's "
                          "docs/gpu.md.")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.set_defaults(handler=run)


def run(args: Any, client: Any) -> int:
    report = client.gpus(raw=True)
    if args.json:
        common.print_json(api.gpu_report_to_json(report))
    else:
        for line in format_gpus(report):
            print(line)
    return errors.EXIT_OK
