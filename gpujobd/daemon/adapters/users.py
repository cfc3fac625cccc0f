"""The system's user and group databases (pwd, grp): the only module of the daemon that reads them."""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Account:
    """A passwd entry, as much of it as gpujobd uses."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def user_name(uid: int) -> str:
    """The name of `uid`; the number itself, as text, when it has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_by_name(name: str) -> Optional[Account]:
    """The account called `name`; None when there is none."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir,
                   shell=entry.pw_shell)


def group_gid(name: str) -> Optional[int]:
    """The gid of group `name`; None when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
