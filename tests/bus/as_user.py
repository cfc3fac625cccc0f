"""`python tests/bus/as_user.py USER BUS_ADDRESS GPUJOBCTL_ARG...`: gpujobctl's main() as USER, talking to
the bus at BUS_ADDRESS.

Started as root: everything it needs is imported first (USER may not be able to read this checkout,
e.g. under root's 0700 home), then it drops to USER's ids, so the bus (and the service behind it)
sees USER as the caller. Exits with gpujobctl's exit code.
"""

from __future__ import annotations

import os
import pwd
import sys

from gpujobd.cli import gpus, render
from gpujobd.cli.main import main
from gpujobd.client import Client

PRELOADED = (gpus, render)  # some verbs import these lazily: import them while still root


def become(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)


if __name__ == "__main__":
    user, address, *argv = sys.argv[1:]
    become(user)
    sys.exit(main(argv, client_factory=lambda: Client(address, call_timeout_s=10)))
