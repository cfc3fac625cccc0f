"""The users adapter: the system's user and group database (pwd, grp, NSS), and nothing else.

The manager reaches it through gpujobd.daemon.ports.UsersPort (this module satisfies it as it is;
gpujobd.daemon.main passes the module in), so the core never imports pwd or grp.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Optional, Tuple

from gpujobd.daemon.ports import User


def user_name(uid: int) -> str:
    """The login name of `uid`, else the number as text (a process may belong to a uid that has
    no passwd entry)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_by_name(name: str) -> Optional[User]:
    """The passwd entry of `name`, or None."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir,
                shell=entry.pw_shell)


def group_ids(name: str, gid: int) -> Tuple[int, ...]:
    """Every group `name` is a member of, its primary group `gid` included. NSS walks the whole group
    database for it (2 ms in the sandbox), so it is asked only where membership matters."""
    return tuple(os.getgrouplist(name, gid))


def group_gid(name: str) -> Optional[int]:
    """The gid of group `name`, or None when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
