"""Where the configuration file is and how it is read as TOML: nothing of the settings themselves, so
that gpujobctl can look for its [client] table without importing every section's definitions."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from gpujobd.shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/gpujobd/gpujobd.toml")
CONFIG_ENV = "GPUJOBD_CONFIG"
DROP_IN_SUFFIX = ".d"


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



def read_config_files(path: Path, explicit: bool) -> Tuple[Optional[Dict[str, Any]], str]:
    """(data, source): the main file with its drop-ins merged over it, or (None, "") when there is
    neither. `source` names every file read, for error messages."""
    data = read_toml(path, explicit)
    drop_ins = drop_in_files(path)
    if data is None and not drop_ins:
        return None, ""
    merged: Dict[str, Any] = {}
    sources = [str(path)] if data is not None else []
    _merge(merged, data or {})
    for drop_in in drop_ins:
        _merge(merged, read_toml(drop_in, True) or {})
        sources.append(str(drop_in))
    return merged, " + ".join(sources)


def drop_in_files(path: Path) -> List[Path]:
    """`<path>.d/*.toml`, in lexical order (as systemd orders drop-ins): each one is merged over the
    main file and the ones before it, key by key, so an admin adds a [gpu] block without editing the
    shipped file."""
    directory = path.with_name(path.name + DROP_IN_SUFFIX)
    try:
        names = sorted(entry.name for entry in os.scandir(directory)
                       if entry.name.endswith(".toml") and not entry.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot list the drop-in directory: {exc.strerror or exc}") from None
    return [directory / name for name in names]


def _merge(into: Dict[str, Any], data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into[key] = dict(value) if isinstance(value, dict) else value
