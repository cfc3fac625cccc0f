"""The quick benchmark end to end: `make bench QUICK=1` boots the sandbox, runs every section with a
few runs each, prints the table and writes the JSON. Checked here: it succeeds (its own correctness
checks pass: no job lost or recorded twice, no survivor of a stop) and the JSON has every section,
each figure with numbers. No timing is asserted.

Skipped unless root on a host that can boot the sandbox (it is not run from inside one). Takes about
two minutes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
SECTIONS = ("submit", "burst", "stop", "logs", "daemon", "history", "gpu", "queue")
MACHINE_KEYS = ("cpus", "memory_bytes", "kernel", "systemd", "python_daemon", "where")


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root (it boots the sandbox)"
    if os.environ.get("GPUJOBD_IN_SANDBOX"):
        return "runs from the host, not inside a sandbox"
    if not shutil.which("unshare") or not Path("/lib/systemd/systemd").exists():
        return "needs unshare and systemd installed to boot the sandbox"
    if "cgroup2" not in Path("/proc/self/mounts").read_text():
        return "needs a cgroup2 hierarchy for the sandbox"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "possible")


@pytest.fixture
def out_dir():
    # Inside the checkout (the sandbox sees only that), under a git-ignored name.
    path = CHECKOUT / "benchmarks" / "results" / f"pytest-{os.getpid()}.tmp"
    shutil.rmtree(path, ignore_errors=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_dist(dist: dict, where: str) -> None:
    for stat in ("p50", "p95", "max", "runs"):
        assert _is_number(dist[stat]), f"{where}: {stat} = {dist[stat]!r}"
    assert dist["samples"] and all(_is_number(s) for s in dist["samples"]), where


def test_quick_benchmark_writes_every_section(out_dir):
    done = subprocess.run(["make", "-s", "-C", str(CHECKOUT), "bench", "QUICK=1",
                           f"BENCH_OUT={out_dir}"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "peer or limit" in done.stdout  # the table was printed
    (path,) = out_dir.glob("*-quick.json")
    result = json.loads(path.read_text())
    assert result["mode"] == "quick"
    for key in MACHINE_KEYS:
        assert result["machine"][key], key
    for section in SECTIONS:
        rows = [row for row in result["rows"] if row["section"] == section]
        assert rows, f"no figures for section {section}"
        for row in rows:
            if row["status"].startswith("not measured"):
                assert row["key"] in ("gpu.tick", "gpu.idle_cpu", "queue.gpu_handoff"), \
                    f"{row['key']}: {row['status']}"
                continue
            _check_dist(row["ours"], row["key"])
            assert row["peers"], f"{row['key']} has no peer or limit beside it"
            for peer in row["peers"]:
                _check_dist(peer, f"{row['key']} / {peer['label']}")
