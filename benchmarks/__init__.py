"""gpujobd benchmarks: gpujobd measured beside its peers and limits, as it scales.

`make bench` boots the test sandbox and runs `python -m benchmarks` inside it (against this host's
systemd only with GPUJOBD_BENCH_HOST_SYSTEMD=1 where PID 1 is systemd). It prints one table, writes
the figures with every raw sample to benchmarks/results/<date>-<host>.json, and `benchmarks.report`
renders docs/performance.md from that file. See docs/performance.md for what each figure means.
"""
