"""How many runs of what: the full benchmark (`make bench`) and the quick one (`make bench QUICK=1`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Params:
    mode: str
    stop_timeout_s: float
    submit_runs: int
    submit_warmup: int
    burst_jobs: int
    burst_runs: int
    burst_clients: int
    burst_warmup_jobs: int
    stop_runs: int
    stop_warmup: int
    tree_levels: int  # 10 processes a level
    history_sizes: Tuple[int, ...]
    history_runs: int
    history_all_runs: int  # `list --all` gets fewer runs: at 100 000 jobs each takes seconds
    log_bytes: int  # what the job writes, if following it fits log_budget_s at the probed rate
    log_runs: int
    log_probe_bytes: int  # the warm-up follow, which also measures the rate
    log_budget_s: float  # longest a measured follow may take: the size is halved until it fits
    idle_window_s: float
    idle_windows: int
    load_jobs: int
    get_calls: int
    get_runs: int
    get_clients: int
    gpu_devices: int
    gpu_processes: int  # per device
    gpu_ticks: int


FULL = Params(
    mode="full", stop_timeout_s=1.0,
    submit_runs=40, submit_warmup=5,
    burst_jobs=1000, burst_runs=3, burst_clients=4, burst_warmup_jobs=100,
    stop_runs=5, stop_warmup=1, tree_levels=50,
    history_sizes=(100, 10_000, 100_000), history_runs=10, history_all_runs=5,
    log_bytes=1 << 30, log_runs=3, log_probe_bytes=1 << 20, log_budget_s=60.0,
    idle_window_s=5.0, idle_windows=12, load_jobs=100,
    get_calls=500, get_runs=10, get_clients=4,
    gpu_devices=8, gpu_processes=100, gpu_ticks=20,
)

QUICK = Params(
    mode="quick", stop_timeout_s=1.0,
    submit_runs=5, submit_warmup=2,
    burst_jobs=200, burst_runs=1, burst_clients=4, burst_warmup_jobs=20,
    stop_runs=1, stop_warmup=0, tree_levels=50,
    history_sizes=(100, 1_000, 10_000), history_runs=3, history_all_runs=1,
    log_bytes=1 << 30, log_runs=1, log_probe_bytes=1 << 20, log_budget_s=10.0,
    idle_window_s=1.0, idle_windows=3, load_jobs=100,
    get_calls=200, get_runs=3, get_clients=4,
    gpu_devices=8, gpu_processes=100, gpu_ticks=5,
)
