"""Every error gpujobd reports: a stable D-Bus name and a CLI exit code, mapped here and nowhere else.

The message of an error is for a human: it says what was wrong and what to do about it.

The exit codes are part of the interface (scripts test them): once released, a code keeps its
meaning. `EXIT_CODES` lists them for `gpujobctl --help` and the man page (a test keeps the page in
step). `gpujobctl submit --wait` and `gpujobctl wait` exit with the job's own code instead when the
job ended; their errors (no such job, daemon unreachable, ...) still exit with these codes, which a
job may also use: the one-line message on stderr (or `--json` on stdout) tells them apart.
"""

from __future__ import annotations

from typing import Dict, Tuple, Type

ERROR_PREFIX = "org.gpujobd1.Error."

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PERMISSION_DENIED = 4
EXIT_UNAVAILABLE = 5
EXIT_REFUSED = 6
EXIT_INTERRUPTED = 130  # gpujobctl only: Ctrl-C
EXIT_BROKEN_PIPE = 141  # gpujobctl only: what a shell reports for a command killed by SIGPIPE

# (code, meaning), in order: what --help and the man page show.
EXIT_CODES: Tuple[Tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "the operation or the job failed (an internal error, a wait that timed out, ...)"),
    (EXIT_USAGE, "usage error: a bad option or value, or a bad configuration file"),
    (EXIT_NOT_FOUND, "no such job"),
    (EXIT_PERMISSION_DENIED, "permission denied: not your job, or a caller gpujobd does not serve"),
    (EXIT_UNAVAILABLE, "gpujobd is not running, not answering, or cannot reach its state"),
    (EXIT_REFUSED, "refused by the server's policy (e.g. a stray process holds the job's GPU)"),
    (EXIT_INTERRUPTED, "interrupted by Ctrl-C (a job keeps running)"),
    (EXIT_BROKEN_PIPE, "stdout was closed early (e.g. `gpujobctl logs 17 | head`)"),
)


class GpujobdError(Exception):
    """Base of every error that crosses the D-Bus boundary or ends the CLI."""

    short_name = "Failed"
    exit_code = EXIT_FAILED

    @classmethod
    def dbus_name(cls) -> str:
        return ERROR_PREFIX + cls.short_name


class InvalidArgument(GpujobdError):
    short_name = "InvalidArgument"
    exit_code = EXIT_USAGE


class NotFound(GpujobdError):
    short_name = "NotFound"
    exit_code = EXIT_NOT_FOUND


class PermissionDenied(GpujobdError):
    short_name = "PermissionDenied"
    exit_code = EXIT_PERMISSION_DENIED


class Unavailable(GpujobdError):
    """The daemon cannot be reached, or a resource it needs is missing."""

    short_name = "Unavailable"
    exit_code = EXIT_UNAVAILABLE


class Refused(GpujobdError):
    """A valid request the server's policy refuses (e.g. gpu_check refuse while a stray holds a GPU)."""

    short_name = "Refused"
    exit_code = EXIT_REFUSED


class Internal(GpujobdError):
    short_name = "Internal"


class ConfigError(GpujobdError):
    short_name = "ConfigError"
    exit_code = EXIT_USAGE


ERROR_CLASSES: Tuple[Type[GpujobdError], ...] = (
    GpujobdError, InvalidArgument, NotFound, PermissionDenied, Unavailable, Refused, Internal, ConfigError,
)
_BY_DBUS_NAME: Dict[str, Type[GpujobdError]] = {cls.dbus_name(): cls for cls in ERROR_CLASSES}


def from_dbus_name(name: str, message: str) -> GpujobdError:
    """Turn a D-Bus error name back into its exception; an unknown name becomes the base class."""
    return _BY_DBUS_NAME.get(name, GpujobdError)(message)

