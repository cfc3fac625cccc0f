"""The executor's timings: the [submitit] section of gpujobd's configuration, as the submitting
process reads it (the defaults when the file is missing or unreadable: a client must work anywhere)."""

from __future__ import annotations

import functools
import warnings

from gpujobd.shared import errors
from gpujobd.shared.config import SubmititConfig


@functools.lru_cache(maxsize=1)
def settings() -> SubmititConfig:
    from gpujobd.shared.config_toml import load_config

    try:
        return load_config().submitit
    except (errors.ConfigError, OSError) as error:
        warnings.warn(f"gpujobd: cannot read its configuration ({error}); using the default submitit "
                      "settings", stacklevel=2)
        return SubmititConfig()
