"""Issue 15's defences at the unit level: per-user caps, the disk reserve, the log's owner, wire
ranges, admin ceilings on properties, escapes, byte-bounded List pages, retention, a lost database."""
# ruff: noqa: F811  (the rig fixtures of test_manager are imported and used as parameters)

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import List

import pytest
from test_manager import OTHER, OWNER, MakeRig, Rig, make_rig, rig  # noqa: F401  (fixtures)

from gpujobd.daemon import retention
from gpujobd.daemon.properties import UINT64_MAX, parse_properties, with_admin_limits
from gpujobd.daemon.spawner import JobFiles
from gpujobd.daemon.store import Store
from gpujobd.shared import api, text
from gpujobd.shared.errors import InvalidArgument, PermissionDenied, Refused
from gpujobd.shared.model import Outcome
from gpujobd.shared.states import EndReason, JobState


def test_a_user_at_the_active_job_cap_is_refused_naming_it(make_rig: MakeRig) -> None:
    rig = make_rig(limits={"max_active_jobs_per_user": 2})
    rig.start()
    rig.submit()
    with pytest.raises(Refused, match=r"limits.max_active_jobs_per_user = 2"):
        rig.submit()
    assert rig.submit(OTHER).id  # another user has a cap of their own
    assert rig.store.count_active_jobs(OWNER.uid) == 2


def test_the_cap_counts_only_jobs_that_have_not_ended(make_rig: MakeRig) -> None:
    rig = make_rig(limits={"max_active_jobs_per_user": 1})
    job = rig.start()
    rig.files.write_record(job.id)
    rig.systemd.scope_ends(job.unit)
    assert rig.job(job.id).state is JobState.SUCCEEDED
    assert rig.submit().state is JobState.STARTING


def test_submits_are_refused_below_the_disk_reserve(make_rig: MakeRig) -> None:
    rig = make_rig(limits={"min_free_mib": 100})
    rig.files.free["/var/log/gpujobd/jobs"] = 10 << 20
    with pytest.raises(Refused, match=r"/var/log/gpujobd/jobs has 10 MiB free.*limits.min_free_mib"):
        rig.submit()
    assert rig.store.count_jobs() == 0, "a refused submit creates nothing"


def test_a_log_that_is_not_the_job_users_is_not_served(rig: Rig) -> None:
    job = rig.start()
    rig.files.log_owners[job.id] = (OTHER.uid, OTHER.gid)  # a file left from a lost database
    with pytest.raises(PermissionDenied, match="not its user's"):
        rig.manager.read_log(OWNER, job.id, 0, 100)


def test_an_offset_beyond_any_file_is_an_invalid_argument(rig: Rig) -> None:
    job = rig.start()
    with pytest.raises(InvalidArgument, match="log offset 18446744073709551615"):
        rig.manager.read_log(OWNER, job.id, 2**64 - 1, 100)


def test_job_files_check_the_owner_by_fstat(tmp_path: Path) -> None:
    log_dir, records = tmp_path / "jobs", tmp_path / "exits"
    log_dir.mkdir(mode=0o755)
    records.mkdir(mode=0o700)
    files = JobFiles(log_dir, records)
    try:
        os.close(files.create_log(7, os.getuid(), os.getgid()))
        (log_dir / "7.log").write_bytes(b"mine\n")
        assert files.read_log(7, 0, 100, owner_uid=os.getuid()) == (b"mine\n", 5)
        with pytest.raises(PermissionDenied, match="belongs to uid"):
            files.read_log(7, 0, 100, owner_uid=os.getuid() + 1)
        (records / "12.json").write_text("{}")
        assert files.highest_job_id() == 12
        assert set(files.free_space()) == {str(log_dir), str(records)}
    finally:
        files.close()


def test_after_a_lost_database_ids_start_above_every_file(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        assert store.ensure_ids_above(41) is True
        assert store.ensure_ids_above(10) is False
        assert store.create("u", 1000, 1000, _spec(), 0.0).id == 42


def test_the_reserve_is_given_up_when_the_disk_is_full(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        assert store.keep_reserve(1 << 20) and store.reserve_path.stat().st_size == 1 << 20
        job = store.create("u", 1000, 1000, _spec(), 0.0)
        failures: List[int] = [1]
        real = store._save

        def full_once(saved):  # type: ignore[no-untyped-def]
            if failures:
                failures.pop()
                from gpujobd.shared.errors import Unavailable
                raise Unavailable("full") from sqlite3.OperationalError("database or disk is full")
            real(saved)
        monkeypatch.setattr(store, "_save", full_once)
        import dataclasses
        store.save(dataclasses.replace(job, state=JobState.RUNNING))
        assert not store.reserve_path.exists(), "the reserve made room for the end"
        assert store.get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]


def test_admin_ceilings_refuse_infinity_and_fill_unset_ceilings() -> None:
    maxima = ("TasksMax=4096", "MemoryMax=64G")
    given = {"TasksMax": "infinity"}
    with pytest.raises(InvalidArgument, match=r"TasksMax=infinity: above this server's ceiling "
                                              r"TasksMax=4096"):
        with_admin_limits(given, parse_properties(given, ["TasksMax"]), (), maxima)
    chosen = with_admin_limits({}, [], ("CPUWeight=50",), maxima)
    assert sorted(chosen) == sorted([("CPUWeight", "t", 50), ("TasksMax", "t", 4096),
                                     ("MemoryMax", "t", 64 << 30)])
    ok = {"MemoryMax": "8G"}
    assert with_admin_limits(ok, parse_properties(ok, ["MemoryMax"]), (), maxima)[0] == (
        "MemoryMax", "t", 8 << 30)
    assert UINT64_MAX > 64 << 30


def test_submit_applies_the_admins_ceilings(make_rig: MakeRig) -> None:
    rig = make_rig(jobs={"max_properties": ["TasksMax=512"]})
    with pytest.raises(InvalidArgument, match=r"jobs\.max_properties"):
        rig.submit(properties={"TasksMax": "infinity"})
    job = rig.submit()
    assert ("TasksMax", "t", 512) in rig.systemd.scopes[job.unit][1]


def test_control_characters_are_escaped_for_admins() -> None:
    assert text.escaped("a\x1b[2Jb\nevent=job.finished\u202e") == "a\\x1b[2Jb\\x0aevent=job.finished\\u202e"


def test_a_page_cut_by_bytes_tells_the_client_to_go_on() -> None:
    small = [{"id": 1, "cwd": "/x"}]
    assert not api.page_may_continue(small)
    assert api.page_may_continue([{"id": i, "cwd": "x" * 300_000} for i in range(4)])
    clipped = api.clipped_job_wire({"cwd": ("s", "x" * 20_000_000), "argv": ("as", ["y"] * 100_000)})
    assert len(clipped["cwd"][1]) < 5000 and len(clipped["argv"][1]) == 256


def test_retention_prunes_only_final_jobs_and_their_logs(rig: Rig) -> None:
    old = rig.start()
    rig.files.write_record(old.id)
    rig.systemd.scope_ends(old.unit)
    live = rig.start()
    removed: List[int] = []

    class Files:
        def remove_log(self, job_id: int) -> bool:
            removed.append(job_id)
            return True

        def discard_records(self, job_id: int) -> None:
            pass

    assert retention.prune(rig.store, Files(), ended_before=1e12) == 1
    assert removed == [old.id] and rig.store.get(old.id) is None
    assert rig.job(live.id).state is JobState.RUNNING


def _spec():  # type: ignore[no-untyped-def]
    from gpujobd.shared.model import JobSpec
    return JobSpec(argv=("true",), cwd="/")


assert EndReason and Outcome  # imported for the readers of this file's cases


def test_the_record_says_when_the_log_was_truncated_or_not_written() -> None:
    from gpujobd.daemon.outcome import decide_outcome
    base = {"reason": "exit-code", "exit_code": 0, "signal": None, "detail": "exited with code 0",
            "leftover_processes": 0, "runs": 1, "terminated_by_signal": None}
    truncated = decide_outcome({**base, "log_truncated": True, "log_bytes": 5000}, None, "success")
    assert truncated.detail == "exited with code 0; its log was truncated at 5000 bytes (jobs.log_max_bytes)"
    failed = decide_outcome({**base, "log_error": "No space left on device", "log_bytes": 0}, None, "success")
    assert "its log could not be written (No space left on device)" in failed.detail
    assert decide_outcome(base, None, "success").detail == "exited with code 0"


def test_only_admins_prune_and_never_an_active_job(rig: Rig) -> None:
    from test_manager import ADMIN
    done = rig.start()
    rig.files.write_record(done.id)
    rig.systemd.scope_ends(done.unit)
    live = rig.start()
    with pytest.raises(PermissionDenied, match="may prune"):
        rig.manager.prune(OWNER, 0)
    rig.clock.advance(100)  # past the end its record gives (NOW + 60)
    assert rig.manager.prune(ADMIN, 0) == 1
    assert rig.store.get(done.id) is None and rig.job(live.id).state is JobState.RUNNING


def test_the_reserve_is_given_up_on_a_full_state_disk_and_taken_again_with_room() -> None:
    from gpujobd.daemon.protection import MIB, guard_reserve
    from gpujobd.shared.config import LimitsConfig

    class Ballast:
        def __init__(self) -> None:
            self.size = 8 * MIB

        def keep_reserve(self, size: int) -> bool:
            self.size = size
            return True

        def release_reserve(self) -> bool:
            had, self.size = self.size, 0
            return had > 0

    ballast, limits = Ballast(), LimitsConfig(min_free_mib=256, db_reserve_mib=8)
    assert guard_reserve(100, ballast, limits) == "released" and ballast.size == 0
    assert guard_reserve(100, ballast, limits) is None, "released once"
    guard_reserve(200 * MIB, ballast, limits)
    assert ballast.size == 0, "not taken again while the disk is below the submit reserve"
    guard_reserve(300 * MIB, ballast, limits)
    assert ballast.size == 8 * MIB
