"""gpujobd.daemon.adapters.users, against this host's own user and group database (read only)."""

from __future__ import annotations

import grp
import os
import pwd
from typing import Set

from gpujobd.daemon.adapters import users


def _unused_uid() -> int:
    for uid in range(40000, 60000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("every uid in 40000..59999 has a passwd entry")


def _unused_name(prefix: str, known: Set[str]) -> str:
    return next(f"{prefix}{n}" for n in range(1000) if f"{prefix}{n}" not in known)


def test_user_name_is_the_login_name() -> None:
    assert users.user_name(0) == pwd.getpwuid(0).pw_name


def test_user_name_of_a_uid_without_an_entry_is_the_number() -> None:
    uid = _unused_uid()
    assert users.user_name(uid) == str(uid)


def test_user_by_name_gives_the_entry_and_group_ids_its_groups() -> None:
    nobody = pwd.getpwnam("nobody")
    user = users.user_by_name("nobody")
    assert user is not None
    assert (user.name, user.uid, user.gid, user.home, user.shell) == (
        "nobody", nobody.pw_uid, nobody.pw_gid, nobody.pw_dir, nobody.pw_shell)
    groups = users.group_ids(user.name, user.gid)
    assert set(groups) == set(os.getgrouplist("nobody", nobody.pw_gid))
    assert nobody.pw_gid in groups


def test_user_by_name_of_an_unknown_user_is_none() -> None:
    name = _unused_name("gpujobd-nouser-", {entry.pw_name for entry in pwd.getpwall()})
    assert users.user_by_name(name) is None


def test_group_gid() -> None:
    root_group = grp.getgrgid(0).gr_name
    assert users.group_gid(root_group) == 0
    name = _unused_name("gpujobd-nogroup-", {entry.gr_name for entry in grp.getgrall()})
    assert users.group_gid(name) is None
