"""The one table: every figure of gpujobd, with each peer or limit and the ratio beside it.

Works on the JSON form of the rows, so the report renders the same table from a results file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

UNITS = {  # unit -> (scale, shown unit)
    "s": (1000.0, "ms"),
    "jobs/s": (1.0, "/s"),
    "calls/s": (1.0, "/s"),
    "B/B": (1.0, "B/B"),
    "cpu-s/GB": (1.0, "s/GB"),
    "MB/s": (1.0, "MB/s"),
    "%": (1.0, "%"),
    "MiB": (1.0, "MiB"),
}
HEADER = ("section", "figure", "runs", "p50", "p95", "max", "peer or limit", "runs", "p50", "p95", "max",
          "ratio")


def number(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    scale, shown = UNITS.get(unit, (1.0, unit))
    scaled = value * scale
    digits = 2 if abs(scaled) < 10 else 1 if abs(scaled) < 100 else 0
    return f"{scaled:,.{digits}f} {shown}"


def ratio(value: Optional[float], of: str = "p50") -> str:
    if value is None:
        return "-"
    if value < 0.1:
        text = f"{value:.2g}x"
    else:
        text = f"{value:.2f}x" if value < 10 else f"{value:.1f}x" if value < 100 else f"{value:,.0f}x"
    return text if of == "p50" else f"{text} ({of})"


def _dist_cells(dist: Optional[Dict[str, Any]]) -> List[str]:
    if dist is None:
        return ["", "", "", ""]
    unit = dist["unit"]
    return [str(dist["runs"]), number(dist["p50"], unit), number(dist["p95"], unit),
            number(dist["max"], unit)]


def row_lines(row: Dict[str, Any]) -> List[List[str]]:
    """One line per peer (at least one); gpujobd's cells only on the first."""
    if "ours" not in row:
        return [[row["section"], row["figure"], "", row["status"], "", "", "", "", "", "", "", ""]]
    peers = row["peers"] or [None]
    ratios = row["ratios"] or [None]
    lines = []
    for index, (peer, peer_ratio) in enumerate(zip(peers, ratios)):
        first = index == 0
        ours = _dist_cells(row["ours"]) if first else ["", "", "", ""]
        name = peer["label"] if peer else ""
        lines.append([row["section"] if first else "", row["figure"] if first else "", *ours, name,
                      *_dist_cells(peer), ratio(peer_ratio, row.get("ratio_of", "p50"))])
    if row["status"] != "measured":
        lines.append(["", "!! " + row["status"], "", "", "", "", "", "", "", "", "", ""])
    if row.get("note"):
        lines.append(["", "- " + row["note"], "", "", "", "", "", "", "", "", "", ""])
    return lines


def render(rows: Sequence[Dict[str, Any]], widths: Optional[Dict[int, int]] = None) -> str:
    """Plain text, fixed-width columns; long figure and peer names wrap at `widths`."""
    widths = widths or {1: 44, 6: 46}
    lines = [list(HEADER)]
    for row in rows:
        lines.extend(row_lines(row))
    wrapped = [_wrap(line, widths) for line in lines]
    flat = [part for block in wrapped for part in block]
    cols = [max(len(line[i]) for line in flat) for i in range(len(HEADER))]
    right = {2, 3, 4, 5, 7, 8, 9, 10, 11}
    out = []
    for index, line in enumerate(flat):
        cells = [c.rjust(cols[i]) if i in right else c.ljust(cols[i]) for i, c in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in cols))
    return "\n".join(out)


def _wrap(line: List[str], widths: Dict[int, int]) -> List[List[str]]:
    import textwrap

    parts = {i: textwrap.wrap(line[i], widths[i]) or [""] for i in widths if i < len(line)}
    height = max(len(p) for p in parts.values())
    block = []
    for k in range(height):
        block.append([parts[i][k] if i in parts and k < len(parts[i]) else (c if k == 0 else "")
                      for i, c in enumerate(line)])
    return block
