"""The users adapter: the system's user and group database (pwd, grp, NSS), and nothing else.

The manager reaches it through gpujobd.daemon.ports.UsersPort (this module satisfies it as it is;
gpujobd.daemon.main passes the module in), so the core never imports pwd or grp.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Optional

from gpujobd.daemon.ports import User


def user_name(uid: int) -> str:
    """The login name of `uid`, else the number as text (a process may belong to a uid that has
    no passwd entry)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_by_name(name: str) -> Optional[User]:
    """The passwd entry of `name` with its group memberships (primary group included), or None."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir,
                shell=entry.pw_shell, groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))


def group_gid(name: str) -> Optional[int]:
    """The gid of group `name`, or None when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
