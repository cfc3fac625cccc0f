"""A job's environment: what of the submitter's is carried over, and what gpujobd sets itself.

A job runs the way the submitter's shell would run it (Slurm's `--export=ALL`, pueue and
task-spooler do the same): the client captures its environment (`inherited`) and sends it with the
job; the supervisor applies it only in the job's own process, after dropping privileges, so nothing a
user sets (LD_PRELOAD, PYTHONPATH, PATH) ever reaches a root process. docs/environment.md argues
each choice below.

Pure functions of plain dicts: the client and the daemon both use them.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

# Variables that belong to the submitting *session*, not to the work: carried into a job that
# outlives the session (and runs in a scope with no terminal, no desktop and no agent), they point
# at sockets, terminals and displays that are gone or wrong. Each is dropped from what the client
# captures; `--env NAME=VALUE` still sets one explicitly.
SESSION_VARIABLES: Tuple[str, ...] = (
    # the session's D-Bus bus and runtime directory (/run/user/UID is removed at logout)
    "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "XDG_SESSION_TYPE",
    "XDG_SESSION_CLASS", "XDG_SEAT", "XDG_VTNR",
    # agents: a job must not sign or log in with the submitter's forwarded keys
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO",
    # the SSH connection itself
    "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY",
    # displays: a job has none (an X or Wayland client would try to open the submitter's screen)
    "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY",
    # the terminal: a job writes to a log file, not a terminal (programs would emit colour codes)
    "TERM", "COLORTERM", "TERMCAP", "COLUMNS", "LINES", "TMUX", "TMUX_PANE", "STY", "WINDOW",
    # the submitter's service manager: a job would notify, log to or take sockets of the wrong unit
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "INVOCATION_ID", "JOURNAL_STREAM",
    "MANAGERPID", "SYSTEMD_EXEC_PID", "WATCHDOG_PID", "WATCHDOG_USEC",
    # the shell's own bookkeeping
    "OLDPWD", "PWD", "SHLVL", "_", "PS1", "PS2", "PROMPT_COMMAND", "MAIL", "HISTFILE",
    # the identity: gpujobd sets these from the job's owner
    "USER", "LOGNAME",
)
SESSION_PREFIXES: Tuple[str, ...] = ("LC_TERMINAL", "ITERM_", "KONSOLE_", "VTE_", "GNOME_TERMINAL_")

# gpujobd's own variables: the daemon and the supervisor set them, and they always win over the
# submitter's (a job submitted from inside another job carries that job's GPUJOB_ID).
OWN_PREFIX = "GPUJOB_"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
# Set unless the submitter set it: a job's output goes to a file, where Python would block-buffer
# print() and `gpujobctl logs -f` would show nothing until the buffer fills. `--env
# PYTHONUNBUFFERED=` (empty) turns it off: Python buffers again.
PYTHON_UNBUFFERED = "PYTHONUNBUFFERED"


def is_session_variable(name: str) -> bool:
    """Whether a variable belongs to the submitting session (never captured)."""
    return name in SESSION_VARIABLES or name.startswith(SESSION_PREFIXES)


def is_own_variable(name: str) -> bool:
    """Whether gpujobd sets this variable itself (never taken from the submitter)."""
    return name.startswith(OWN_PREFIX)


def inherited(environ: Mapping[str, str]) -> Dict[str, str]:
    """What a job takes of the submitter's environment: all but session and gpujobd variables
    (and names or values a job's environment cannot hold)."""
    return {name: value for name, value in environ.items()
            if name and "=" not in name and "\0" not in name + value
            and not is_session_variable(name) and not is_own_variable(name)}


def size_bytes(env: Mapping[str, str]) -> int:
    """The bytes an environment takes in execve's block: NAME=VALUE plus a NUL each."""
    return sum(len(name.encode("utf-8", "surrogateescape")) + len(value.encode("utf-8", "surrogateescape"))
               + 2 for name, value in env.items())
