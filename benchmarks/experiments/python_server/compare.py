"""gpujobd's Get against two floors and systemd, in turn, ROUNDS times (inside the sandbox):
the daemon; floor_service.py (GDBus through PyGObject, the daemon's stack, a prebuilt reply);
jeepney_service.py (single-threaded, pure Python); systemd's Properties.Get. Same client code
(agent.py get), same job, same reply bytes.

    python3 tests/sandbox/sandbox.py run -- .venv/bin/python \
        benchmarks/experiments/python_server/compare.py [CALLS [ROUNDS]]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

CHECKOUT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(CHECKOUT))

from benchmarks.sections.daemon import instead_of_gpujobd, reply_of  # noqa: E402
from benchmarks.testbed import LIBDIR, SYSTEM_PYTHON, Testbed  # noqa: E402
from benchmarks.timing import run_timed  # noqa: E402

HERE = Path(__file__).resolve().parent


def rate(bed: Testbed, target: str, job_id: int, calls: int) -> float:
    argv = bed.agent("get", "--target", target, "--job", str(job_id), "--calls", str(calls),
                     "--warmup", str(calls // 8), "--barrier")
    agent = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             **bed.user.popen_kw())
    assert agent.stdin is not None and agent.stdout is not None
    assert agent.stdout.readline().strip() == "ready"
    agent.stdin.write("go\n")
    agent.stdin.flush()
    run = json.loads(agent.communicate()[0])["runs"][0]
    return calls / (run["finished"] - run["started"])


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    bed = Testbed(stop_timeout_s=5)
    bed.setup()
    try:
        job_id = int(run_timed(bed.ctl("submit", "--", "true"), bed.user).stdout.split()[0])
        bed.client().wait(job_id)
        reply = reply_of(job_id)
        print(f"job {job_id}: a reply of {len(json.loads(reply))} fields")
        jeepney = [SYSTEM_PYTHON, "-I", str(HERE / "jeepney_service.py"), "--lib", str(LIBDIR), reply]
        for round_index in range(rounds):
            rates: Dict[str, float] = {"gpujobd": rate(bed, "gpujobd", job_id, calls)}
            with instead_of_gpujobd(bed, bed.floor_service(reply)):
                rates["GDBus floor"] = rate(bed, "gpujobd", job_id, calls)
            with instead_of_gpujobd(bed, jeepney):
                rates["jeepney server"] = rate(bed, "gpujobd", job_id, calls)
            time.sleep(0.2)
            rates["systemd"] = rate(bed, "systemd", job_id, calls)
            print(f"round {round_index}: " + ", ".join(
                f"{name} {value:,.0f}/s ({value / rates['systemd']:.2f}x)" for name, value in rates.items()),
                flush=True)
    finally:
        bed.teardown()


if __name__ == "__main__":
    main()
