"""The only homes of system libraries in the daemon: D-Bus (gi/pydbus), systemd, NVML, /proc, users."""
