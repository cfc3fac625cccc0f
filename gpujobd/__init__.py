"""gpujobd: every job on a shared GPU server in its own transient systemd scope."""

__version__ = "0.1.0"
