"""The GPU watcher: NVML reads off the main loop, attribution of GPU processes to jobs, strays."""
