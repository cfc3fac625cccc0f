"""`python -m benchmarks [--quick] [--out DIR] [--only SECTION]...`: run the benchmarks, print the table,
write the JSON.

It must run where gpujobd can be installed as a service: inside the sandbox (`make bench`), or on a
host whose PID 1 is systemd when GPUJOBD_BENCH_HOST_SYSTEMD=1 says so. A failed correctness check (a
job lost or recorded twice, a process surviving a stop) fails the run (exit 1) after the figures
measured so far are written.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks import table
from benchmarks.params import FULL, QUICK, Params
from benchmarks.stats import Row
from benchmarks.testbed import CHECKOUT, HOST_ENV, Testbed, machine, where

SECTIONS = ("submit", "burst", "stop", "logs", "daemon", "history", "gpu", "queue")
RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 1


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few runs each (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="directory of the JSON (default: %(default)s)")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable)")
    parser.add_argument("--source", type=Path, default=CHECKOUT,
                        help="install gpujobd from this checkout (default: this one)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    place = where()
    if place is None:
        print("benchmarks: run them with `make bench` (inside the sandbox), or set "
              f"{HOST_ENV}=1 on a host whose PID 1 is systemd", file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL
    result = _result(place, params)
    result["machine"]["gpujobd_source"] = str(args.source)
    failure = _run_sections(Testbed(params.stop_timeout_s, args.source), params,
                            args.only or list(SECTIONS), result)
    result["finished_at"] = _now()
    result["rows"].sort(key=lambda row: SECTIONS.index(row["section"]))
    path = write(result, args.out)
    print(table.render(result["rows"]))
    print(f"\nwritten: {path}")
    if failure:
        print(f"\nbenchmarks: FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def _result(place: str, params: Params) -> Dict[str, Any]:
    return {"schema": SCHEMA, "mode": params.mode, "started_at": _now(), "machine": machine(place),
            "params": params.__dict__, "config": {"jobs.stop_timeout_s": params.stop_timeout_s},
            "sections": {}, "rows": []}


def _run_sections(bed: Testbed, params: Params, names: List[str], result: Dict[str, Any]) -> str:
    """Run each section in order; returns the failure that stopped the run, or ''."""
    try:
        bed.setup()
        for name in names:
            _progress(f"{name} ...")
            started = time.perf_counter()
            rows: List[Row] = importlib.import_module(f"benchmarks.sections.{name}").run(bed, params)
            took = time.perf_counter() - started
            result["sections"][name] = {"seconds": round(took, 2)}
            result["rows"].extend(row.to_json() for row in rows)
            _progress(f"{name}: {len(rows)} figures in {took:.1f}s")
    except Exception as error:  # reported, and turned into the exit status
        traceback.print_exc()
        return f"{type(error).__name__}: {error}"
    finally:
        bed.teardown()
    return ""


def write(result: Dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if result["mode"] == "full" else f"-{result['mode']}"
    path = out / f"{datetime.date.today().isoformat()}-{socket.gethostname()}{suffix}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _progress(message: str) -> None:
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)
