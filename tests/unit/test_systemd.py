"""The systemd adapter's pure parts: scope properties and unit object paths."""

from __future__ import annotations

import pytest
from gi.repository import GLib

from gpujobd.daemon.adapters.systemd import _unit_name_from_path, scope_properties, unit_object_path


@pytest.mark.parametrize("pid", [0, 1, -5])
def test_a_scope_never_receives_pid_0_or_1(pid):
    with pytest.raises(ValueError, match="refusing"):
        scope_properties(pids=[pid], slice_name="gpujob.slice", description="x", stop_timeout_s=1,
                         runtime_max_s=None)


def test_scope_properties_carry_the_timeouts_in_microseconds_and_no_service_binding():
    props = dict(scope_properties(pids=[1234], slice_name="gpujob.slice", description="job",
                                  stop_timeout_s=2.5, runtime_max_s=60))
    assert props["PIDs"].unpack() == [1234]
    assert props["TimeoutStopUSec"].unpack() == 2_500_000
    assert props["RuntimeMaxUSec"].unpack() == 60_000_000
    assert props["Slice"].unpack() == "gpujob.slice"
    assert not {"PartOf", "BindsTo"} & set(props)


@pytest.mark.parametrize("unit", ["gpujob-12.scope", "a_b-c.d@e.service"])
def test_unit_paths_round_trip(unit):
    path = unit_object_path(unit)
    assert path.startswith("/org/freedesktop/systemd1/unit/")
    assert _unit_name_from_path(path) == unit
    assert unit_object_path("gpujob-12.scope").endswith("/gpujob_2d12_2escope")


def test_a_users_sub_slice_nests_under_the_jobs_slice() -> None:
    from gpujobd.daemon.adapters.systemd import job_slice
    assert job_slice("gpujob.slice", 1001) == "gpujob-u1001.slice"
    assert job_slice("gpu-a.slice", 7) == "gpu-a-u7.slice"


def test_the_description_escapes_control_characters() -> None:
    from gpujobd.daemon.adapters.systemd import scope_description
    from gpujobd.shared.model import Job, JobSpec, JobState
    job = Job(id=3, user="bob", uid=1001, gid=1001, spec=JobSpec(argv=("echo", "\x1b[2J\nevent=x"), cwd="/"),
              state=JobState.STARTING, created_at=0.0)
    assert scope_description(job) == "gpujob 3 of bob: echo \\x1b[2J\\x0aevent=x"


class _NoBus:
    def signal_subscribe(self, *args: object) -> int:
        return 1


def _properties_changed(interface: str, changed: dict) -> GLib.Variant:
    entries = {name: GLib.Variant(signature, value) for name, (signature, value) in changed.items()}
    return GLib.Variant("(sa{sv}as)", (interface, entries, []))


def test_a_unit_change_hands_on_only_the_state_properties_unpacked() -> None:
    from gpujobd.daemon.adapters.systemd import SCOPE_IFACE, UNIT_IFACE, Systemd

    seen: list = []
    adapter = Systemd(_NoBus(), "gpujob-")  # type: ignore[arg-type]
    adapter._on_unit_changed = lambda unit, changed: seen.append((unit, changed))
    adapter._watched["gpujob-7.scope"] = 1
    path = unit_object_path("gpujob-7.scope")
    adapter._properties_changed(path, _properties_changed(UNIT_IFACE, {
        "ActiveState": ("s", "deactivating"), "SubState": ("s", "stop-sigterm"),
        "InactiveExitTimestamp": ("t", 123), "Names": ("as", ["gpujob-7.scope"])}))
    adapter._properties_changed(path, _properties_changed(SCOPE_IFACE, {"Result": ("s", "timeout")}))
    adapter._properties_changed(path, _properties_changed(UNIT_IFACE, {"CPUUsageNSec": ("t", 5)}))
    adapter._properties_changed(path, _properties_changed("org.freedesktop.systemd1.Other",
                                                          {"ActiveState": ("s", "x")}))
    adapter._properties_changed(unit_object_path("gpujob-8.scope"), _properties_changed(
        UNIT_IFACE, {"ActiveState": ("s", "inactive")}))  # a unit not watched
    assert seen == [("gpujob-7.scope", {"ActiveState": "deactivating", "SubState": "stop-sigterm"}),
                    ("gpujob-7.scope", {"Result": "timeout"})]
