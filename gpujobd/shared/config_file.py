"""Where the configuration file is and how it is read as TOML: nothing of the settings themselves, so
that gpujobctl can look for its [client] table without importing every section's definitions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

from gpujobd.shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/gpujobd/gpujobd.toml")
CONFIG_ENV = "GPUJOBD_CONFIG"


def resolve_config_path(cli_value: str | None) -> Tuple[Path, bool]:
    """(path, explicit): the --config flag beats $GPUJOBD_CONFIG beats DEFAULT_CONFIG_PATH.

    An explicit path must exist; the default path may be missing (then the defaults apply).
    """
    if cli_value is not None:
        if not cli_value:
            raise ConfigError("--config: the path is empty")
        return Path(cli_value), True
    from_env = os.environ.get(CONFIG_ENV, "")
    if from_env:
        return Path(from_env), True
    return DEFAULT_CONFIG_PATH, False


def read_toml(path: Path, explicit: bool) -> Dict[str, Any] | None:
    """The parsed file, or None for a missing file that nobody named."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: configuration file not found") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
