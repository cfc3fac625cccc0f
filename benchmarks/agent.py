#!/usr/bin/python3
"""A warm client process for the benchmarks, run as the bench user with the system's python3.

    agent.py --lib LIBDIR submit --runs N --warmup W [--date]
    agent.py --lib LIBDIR burst --count N --token PREFIX [--sleep SECONDS]
    agent.py --lib LIBDIR get --target gpujobd|systemd --job ID --calls M --runs R --warmup W
             [--pause S] [--barrier]

It imports gpujobd from LIBDIR (the installed copy gpujobctl uses) and prints one JSON object on
stdout. With a barrier (burst, get --barrier) it first warms up, prints "ready", and starts only when
a line arrives on stdin, so several agents start together. Standard library and gpujobd only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List


def main() -> int:
    args = parse_args()
    sys.path.insert(0, args.lib)
    from gpujobd.client import Client

    client = Client(call_timeout_s=120)
    result = {"submit": submit, "burst": burst, "get": get}[args.mode](client, args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True)
    modes = parser.add_subparsers(dest="mode", required=True)
    one = modes.add_parser("submit")
    one.add_argument("--runs", type=int, required=True)
    one.add_argument("--warmup", type=int, default=0)
    one.add_argument("--date", action="store_true", help="run `date +%%s.%%N` and report when it ran")
    one.add_argument("--pause", type=float, default=0.0, help="seconds of quiet before each submit")
    many = modes.add_parser("burst")
    many.add_argument("--count", type=int, required=True)
    many.add_argument("--token", required=True)
    many.add_argument("--sleep", help="submit `sleep SECONDS` instead of `echo TOKEN`")
    reads = modes.add_parser("get")
    reads.add_argument("--target", choices=("gpujobd", "systemd"), required=True)
    reads.add_argument("--job", type=int, default=1)
    reads.add_argument("--calls", type=int, required=True)
    reads.add_argument("--runs", type=int, default=1)
    reads.add_argument("--warmup", type=int, default=0)
    reads.add_argument("--pause", type=float, default=0.0, help="seconds between two calls")
    reads.add_argument("--barrier", action="store_true")
    return parser.parse_args()


def barrier() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


# -- submit: one job at a time, each waited for (untimed) before the next -----------------------------
def submit(client: Any, args: argparse.Namespace) -> Dict[str, Any]:
    argv = ["date", "+%s.%N"] if args.date else ["true"]
    submit_s: List[float] = []
    to_running_s: List[float] = []
    for index in range(args.warmup + args.runs):
        time.sleep(args.pause)
        wall = time.time()
        started = time.perf_counter()
        job = client.submit(argv, raw=True)
        elapsed = time.perf_counter() - started
        client.wait(job["id"], raw=True)
        if index < args.warmup:
            continue
        submit_s.append(elapsed)
        if args.date:
            data, _offset, _ended = client.read_log(job["id"])
            to_running_s.append(float(data.decode().split()[0]) - wall)
    return {"submit_s": submit_s, "to_running_s": to_running_s}


# -- burst: submit as fast as this client can ---------------------------------------------------------
def burst(client: Any, args: argparse.Namespace) -> Dict[str, Any]:
    client.list(limit=1)  # connection, imports and the daemon's caller cache: warm
    barrier()
    started = time.time()
    jobs = []
    for index in range(args.count):
        token = f"{args.token}-{index}"
        sent = time.perf_counter()
        job = client.submit(["sleep", args.sleep] if args.sleep else ["echo", token], raw=True)
        jobs.append({"id": job["id"], "token": token, "submit_s": time.perf_counter() - sent})
    return {"started": started, "finished": time.time(), "jobs": jobs}


# -- get: D-Bus property reads, gpujobd's Get or systemd's Properties.Get ---------------------------
def get(client: Any, args: argparse.Namespace) -> Dict[str, Any]:
    call = _gpujobd_get(client, args.job) if args.target == "gpujobd" else _systemd_get(client)
    for _ in range(args.warmup):
        call()
    if args.barrier:
        barrier()
    runs = []
    for _ in range(args.runs):
        latencies = []
        started = time.time()
        for _ in range(args.calls):
            sent = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - sent)
            time.sleep(args.pause)
        runs.append({"started": started, "finished": time.time(), "latencies_s": latencies})
    return {"runs": runs}


def _gpujobd_get(client: Any, job_id: int) -> Any:
    return lambda: client.get(job_id, raw=True)


def _systemd_get(client: Any) -> Any:
    from jeepney import DBusAddress, new_method_call

    # A connection opened the way the gpujobd client opens its own (jeepney, blocking): the baseline
    # is the same library's round trip to systemd.
    connection = client._transport._open("the systemd baseline")
    address = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                          interface="org.freedesktop.DBus.Properties")

    def call() -> None:
        message = new_method_call(address, "Get", "ss", ("org.freedesktop.systemd1.Manager", "Version"))
        connection.send_and_get_reply(message, timeout=120)
    return call


if __name__ == "__main__":
    sys.exit(main())
