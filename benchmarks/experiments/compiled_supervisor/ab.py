"""Inside the sandbox: bursts of the checkout (A) and of side B (the patched zygote spawning the probe
supervisor), alternated, with the raw pystemd loop of benchmarks/scopes.py measured after each A, all
in one sandbox session. Prints one line a burst: rate and CPU per job (ms) by process.

    python ab.py SIDE_A SIDE_B [JOBS [ROUNDS]]     (run.sh here calls it)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout's root, for the imports below

from benchmarks import scopes
from benchmarks.sections import burst
from benchmarks.testbed import Testbed

WARMUP_JOBS = 100


def line(label: str, result: Dict[str, Any], jobs: int) -> str:
    cpu = {key: round(seconds * 1e3 / jobs, 2) for key, seconds in result["cpu_s"].items()}
    return f"{label} rate {result['rate']:.1f}/s cpu ms/job {cpu}"


def main() -> None:
    sides = {"A": Path(sys.argv[1]), "B": Path(sys.argv[2])}
    jobs = int(sys.argv[3]) if len(sys.argv) > 3 else 600
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    for round_no in range(rounds):
        for side, source in sides.items():
            bed = Testbed(stop_timeout_s=1.0, source=source)
            bed.setup()
            try:
                burst._burst(bed, WARMUP_JOBS, 4, "warm")
                print(line(f"{side} {round_no}", burst._burst(bed, jobs, 4, f"m{round_no}{side}"), jobs),
                      flush=True)
                if side == "A":
                    scopes.burst(WARMUP_JOBS, f"w{round_no}")
                    print(line(f"raw {round_no}", burst._limit(bed, jobs, f"p{round_no}"), jobs), flush=True)
            finally:
                bed.teardown()


if __name__ == "__main__":
    main()
