"""`python -m benchmarks.report [RESULT.json] [--out docs/performance.md]`: render the performance page.

The page is benchmarks/performance.md.in (string.Template) filled from one results file (default: the
newest full run in benchmarks/results). Never edit docs/performance.md by hand: edit the template.

Placeholders: $table (the markdown table), $machine, $started_at, $mode, and for every row key
(dots become `__`, e.g. `burst.rate` -> `burst__rate`): ${KEY__p50}, ${KEY__p95}, ${KEY__max},
${KEY__runs}, ${KEY__peer0__p50} (...p95, max, label), ${KEY__ratio0}, ${KEY__note}, ${KEY__status}.
Sentences that judge a figure ("flat", "x1.8", "both cores busy") are placeholders too, computed in
benchmarks/prose.py. A placeholder the results cannot fill stops the rendering (KeyError), so the page
never shows one.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.prose import derived
from benchmarks.table import number, ratio, row_lines

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "performance.md.in"
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"


def latest(results: Path) -> Path:
    runs = sorted(p for p in results.glob("*.json") if not p.name.endswith("-quick.json"))
    if not runs:
        raise SystemExit(f"no full benchmark results in {results}: run `make bench` first")
    return max(runs, key=lambda p: json.loads(p.read_text())["started_at"])


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    header = ["section", "figure", "runs", "p50", "p95", "max", "peer or limit", "runs", "p50", "p95",
              "max", "ratio"]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * 4 + ["---"]
                                                            + ["--:"] * 5) + "|"]
    for row in rows:
        lines = row_lines(row)
        extra = [line[1] for line in lines if not any(line[2:]) and line[1]]
        cells = [line for line in lines if any(line[2:])] or lines[:1]
        for index, line in enumerate(cells):
            if index == 0 and extra:
                line = [line[0], line[1] + "<br>" + "<br>".join(f"<sub>{e}</sub>" for e in extra), *line[2:]]
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
    return "\n".join(out)


def machine_text(result: Dict[str, Any]) -> str:
    m = result["machine"]
    return (f"{m['cpus']} x {m['cpu_model']}, {m['memory_bytes'] / (1 << 30):.0f} GiB memory, "
            f"kernel {m['kernel']}, {m['os']}, {m['systemd']}, {m['python_daemon']} (daemon and CLI), "
            f"virtualization: {m['virtualization']}; measured in the {m['where']} "
            f"(host `{m['host']}`), gpujobd at {m['gpujobd_commit'] or 'an unknown commit'}"
            f"{' with local changes' if m.get('gpujobd_tree_dirty') else ''}")


def values(result: Dict[str, Any]) -> Dict[str, str]:
    found = {"table": markdown_table(result["rows"]), "machine": machine_text(result),
             "started_at": result["started_at"], "mode": result["mode"]}
    for row in result["rows"]:
        key = row["key"].replace(".", "__")
        found[f"{key}__status"] = row["status"]
        found[f"{key}__note"] = row.get("note", "")
        if "ours" not in row:
            for prefix in [key] + [f"{key}__peer{index}" for index in range(4)]:
                found.update({f"{prefix}__{stat}": "not measured"
                              for stat in ("p50", "p95", "max", "min", "runs", "label")})
            found.update({f"{key}__ratio{index}": "not measured" for index in range(4)})
        else:
            found.update(_dist_values(key, row["ours"]))
            for index, (peer, peer_ratio) in enumerate(zip(row["peers"], row["ratios"])):
                found.update(_dist_values(f"{key}__peer{index}", peer))
                found[f"{key}__ratio{index}"] = ratio(peer_ratio)
            for index in range(len(row["peers"]), 4):  # a peer an earlier run did not measure yet
                found.update({f"{key}__peer{index}__{stat}": "not measured"
                              for stat in ("p50", "p95", "max", "min", "runs", "label")})
                found[f"{key}__ratio{index}"] = "not measured"
    found.update(derived(result))
    return found


def _dist_values(key: str, dist: Dict[str, Any]) -> Dict[str, str]:
    unit = dist["unit"]
    found = {f"{key}__{stat}": number(dist[stat], unit) for stat in ("p50", "p95", "max", "min")}
    found[f"{key}__runs"] = str(dist["runs"])
    found[f"{key}__label"] = dist["label"]
    return found


def earlier_runs(results: Path, result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The full runs before `result`, oldest first."""
    older = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
             if not p.name.endswith("-quick.json")]
    older = [r for r in older if r.get("mode") == "full" and r["started_at"] < result["started_at"]]
    return sorted(older, key=lambda r: r["started_at"])


def earlier_run(results: Path, result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The newest full run before `result` (what "before" means on this page), if there is one."""
    older = earlier_runs(results, result)
    return older[-1] if older else None


def first_run(results: Path, result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The oldest full run kept, when it is not also the newest before `result`: the figures the
    work since started from (the first run is what issue 13 was filed with)."""
    older = earlier_runs(results, result)
    return older[0] if len(older) > 1 else None


def before_after_table(before: Optional[Dict[str, Any]], after: Dict[str, Any]) -> str:
    """Each figure's p50 and its ratio to its first peer, in the earlier run and in this one."""
    if before is None:
        return "There is no earlier full run in benchmarks/results to compare with."
    earlier = {row["key"]: row for row in before["rows"] if "ours" in row}
    out = [f"Before: the run of {before['started_at']} (gpujobd at "
           f"{before['machine'].get('gpujobd_commit') or 'an unknown commit'}); after: this run. A figure "
           "whose definition changed between the two says so in its own row above.", "",
           "| figure | before p50 | before ratio | after p50 | after ratio |", "|---|--:|--:|--:|--:|"]
    for row in after["rows"]:
        if "ours" not in row:
            continue
        old = earlier.get(row["key"])
        cells = [row["figure"].replace("|", "\\|"),
                 number(old["ours"]["p50"], old["ours"]["unit"]) if old else "new",
                 _first_ratio(old) if old else "-",
                 number(row["ours"]["p50"], row["ours"]["unit"]), _first_ratio(row)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _first_ratio(row: Dict[str, Any]) -> str:
    ratios = row.get("ratios") or [None]
    return ratio(ratios[0], row.get("ratio_of", "p50"))


def render(result: Dict[str, Any], template: Path = TEMPLATE, results: Path = RESULTS) -> str:
    found = values(result)
    found["before_after"] = before_after_table(earlier_run(results, result), result)
    first = first_run(results, result)
    found["since_first"] = (before_after_table(first, result) if first is not None else
                            "The run before this one is the first kept in benchmarks/results.")
    return string.Template(template.read_text()).substitute(found)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", nargs="?", type=Path, help="a results file (default: the newest full run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to look for the newest run")
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    source = args.result or latest(args.results)
    page = render(json.loads(source.read_text()), results=args.results)
    args.out.write_text(page)
    print(f"{args.out} rendered from {source}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
