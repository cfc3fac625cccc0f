"""Every error gpujobd reports: a stable D-Bus name and a CLI exit code, mapped here and nowhere else.

The message of an error is for a human: it says what was wrong and what to do about it.
"""

from __future__ import annotations

from typing import Dict, Type

ERROR_PREFIX = "org.gpujobd1.Error."

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


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


class PermissionDenied(GpujobdError):
    short_name = "PermissionDenied"


class Unavailable(GpujobdError):
    """The daemon cannot be reached, or a resource it needs is missing."""

    short_name = "Unavailable"


class Internal(GpujobdError):
    short_name = "Internal"


class ConfigError(GpujobdError):
    short_name = "ConfigError"
    exit_code = EXIT_USAGE


_BY_DBUS_NAME: Dict[str, Type[GpujobdError]] = {
    cls.dbus_name(): cls
    for cls in (GpujobdError, InvalidArgument, NotFound, PermissionDenied, Unavailable, Internal,
                ConfigError)
}


def from_dbus_name(name: str, message: str) -> GpujobdError:
    """Turn a D-Bus error name back into its exception; an unknown name becomes the base class."""
    return _BY_DBUS_NAME.get(name, GpujobdError)(message)
