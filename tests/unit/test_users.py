"""adapters.users: the user and group look-ups, against this machine's own databases (read only)."""

from __future__ import annotations

import grp
import pwd

from gpujobd.daemon.adapters.users import group_gid, user_by_name, user_name


def _unused_uid() -> int:
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    return next(uid for uid in range(59999, 40000, -1) if uid not in taken)


def test_user_name_is_the_passwd_name_else_the_number() -> None:
    assert user_name(0) == pwd.getpwuid(0).pw_name == "root"
    uid = _unused_uid()
    assert user_name(uid) == str(uid)


def test_user_by_name_gives_the_account_or_none() -> None:
    root = user_by_name("root")
    assert root is not None
    assert (root.uid, root.gid, root.home) == (0, 0, pwd.getpwnam("root").pw_dir)
    assert user_by_name("no-such-user-gpujobd-test") is None


def test_group_gid_gives_the_gid_or_none() -> None:
    assert group_gid("root") == grp.getgrnam("root").gr_gid == 0
    assert group_gid("no-such-group-gpujobd-test") is None
