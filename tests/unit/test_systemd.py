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
    from gpujobd.shared.model import Job, JobSpec
    from gpujobd.shared.states import JobState
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
    unit = "gpujob-7.scope"
    adapter._properties_changed(unit, _properties_changed(UNIT_IFACE, {
        "ActiveState": ("s", "deactivating"), "SubState": ("s", "stop-sigterm"),
        "InactiveExitTimestamp": ("t", 123), "Names": ("as", ["gpujob-7.scope"])}))
    adapter._properties_changed(unit, _properties_changed(SCOPE_IFACE, {"Result": ("s", "timeout")}))
    adapter._properties_changed(unit, _properties_changed(UNIT_IFACE, {"CPUUsageNSec": ("t", 5)}))
    adapter._properties_changed(unit, _properties_changed("org.freedesktop.systemd1.Other",
                                                          {"ActiveState": ("s", "x")}))
    adapter._properties_changed("gpujob-8.scope", _properties_changed(
        UNIT_IFACE, {"ActiveState": ("s", "inactive")}))  # a unit not watched
    assert seen == [("gpujob-7.scope", {"ActiveState": "deactivating", "SubState": "stop-sigterm"}),
                    ("gpujob-7.scope", {"Result": "timeout"})]


class _PendingBus:
    """Holds each asynchronous call until the test answers it, as a slow systemd would."""

    def __init__(self) -> None:
        self.sent: list = []  # (method, args, callback), in the order sent

    def call(self, _dest, _path, _iface, method, args, _reply_type, _flags, _timeout, _cancel, callback):
        self.sent.append((method, args, callback))

    def answer(self, index: int, error: bool = False) -> None:
        _method, _args, callback = self.sent[index]
        callback(self, ("error", index) if error else ("ok", index))

    def call_finish(self, result):
        kind, _index = result
        if kind == "error":
            raise GLib.Error.new_literal(GLib.quark_from_string("g-dbus-error-quark"), "no", 1)
        return GLib.Variant("(o)", ("/org/freedesktop/systemd1/job/1",))


def test_calls_past_the_cap_wait_and_go_out_in_order_as_replies_come_back() -> None:
    from gpujobd.daemon.adapters.systemd import Systemd

    bus = _PendingBus()
    adapter = Systemd(bus, "gpujob-", max_calls_in_flight=2)  # type: ignore[arg-type]
    replies: list = []
    for n in range(5):
        adapter._call("d", "/p", "i", f"M{n}", None, "(o)", on_reply=lambda r, n=n: replies.append(n),
                      on_error=lambda text, n=n: replies.append(("error", n)))
    assert [method for method, _, _ in bus.sent] == ["M0", "M1"]  # the cap: two in flight
    bus.answer(1)
    assert [method for method, _, _ in bus.sent] == ["M0", "M1", "M2"]
    bus.answer(0, error=True)  # an error frees its place as a reply does
    assert [method for method, _, _ in bus.sent] == ["M0", "M1", "M2", "M3"]
    bus.answer(2)
    bus.answer(3)
    bus.answer(4)
    assert [method for method, _, _ in bus.sent] == ["M0", "M1", "M2", "M3", "M4"]
    assert replies == [1, ("error", 0), 2, 3, 4]
    assert adapter._in_flight == 0 and not adapter._waiting_calls


class _SignalBus:
    """Subscriptions as GDBus keeps them: a signal queues one callback per subscription matching when
    it arrives; a queued callback whose subscription is gone by the time it would run is skipped."""

    def __init__(self) -> None:
        self.subscriptions: dict = {}
        self.queued: list = []
        self._next = 0

    def signal_subscribe(self, _sender, _iface, member, path, _arg0, _flags, callback) -> int:
        self._next += 1
        self.subscriptions[self._next] = (member, path, callback)
        return self._next

    def signal_unsubscribe(self, subscription: int) -> None:
        del self.subscriptions[subscription]

    def call(self, *args) -> None:  # AddMatch and the like: not answered here
        pass

    def arrive(self, unit: str, active_state: str) -> None:
        path = unit_object_path(unit)
        params = _properties_changed("org.freedesktop.systemd1.Unit", {"ActiveState": ("s", active_state)})
        for number, (member, subscribed_path, _callback) in self.subscriptions.items():
            if member == "PropertiesChanged" and subscribed_path in (None, path):
                self.queued.append((number, path, params))

    def run(self, callbacks: int = -1) -> None:
        while self.queued and callbacks != 0:
            callbacks -= 1
            number, path, params = self.queued.pop(0)
            if number in self.subscriptions:
                self.subscriptions[number][2](self, "systemd", path, "props", "PropertiesChanged", params)


def _adapter_with_a_full_rule_budget(bus: _SignalBus, seen: list):
    from gpujobd.daemon.adapters.systemd import Systemd

    adapter = Systemd(bus, "gpujob-", max_unit_rules=2)  # type: ignore[arg-type]
    adapter.subscribe(lambda unit, changed: seen.append((unit, changed["ActiveState"])), lambda unit: None)
    adapter.watch_unit("gpujob-1.scope")
    adapter.watch_unit("gpujob-2.scope")  # both with a rule of their own: the budget is spent
    return adapter


def test_a_signal_queued_before_the_broad_subscription_came_is_still_handed_on() -> None:
    bus, seen = _SignalBus(), []
    adapter = _adapter_with_a_full_rule_budget(bus, seen)
    bus.arrive("gpujob-1.scope", "inactive")  # only its own subscription matches now
    adapter.watch_unit("gpujob-3.scope")  # past the budget: the broad subscription starts
    bus.run()
    assert seen == [("gpujob-1.scope", "inactive")]


def test_with_the_broad_subscription_each_signal_is_handed_on_once() -> None:
    bus, seen = _SignalBus(), []
    adapter = _adapter_with_a_full_rule_budget(bus, seen)
    adapter.watch_unit("gpujob-3.scope")
    bus.arrive("gpujob-1.scope", "deactivating")  # its own and the broad subscription match
    bus.arrive("gpujob-3.scope", "inactive")  # the broad one only
    bus.arrive("gpujob-9.scope", "inactive")  # not watched
    bus.run()
    assert seen == [("gpujob-1.scope", "deactivating"), ("gpujob-3.scope", "inactive")]


def test_a_signal_queued_before_the_broad_subscription_went_is_still_handed_on() -> None:
    bus, seen = _SignalBus(), []
    adapter = _adapter_with_a_full_rule_budget(bus, seen)
    adapter.watch_unit("gpujob-3.scope")
    bus.arrive("gpujob-1.scope", "inactive")  # its own subscription's callback, then the broad one's
    bus.run(callbacks=1)
    adapter.unwatch_unit("gpujob-3.scope")  # the broad subscription goes before its callback runs
    bus.run()
    assert seen == [("gpujob-1.scope", "inactive")]


class _TimedBus(_PendingBus):
    """Records each call's timeout (ms), synchronous or not."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list = []

    def call(self, _dest, _path, _iface, method, args, _reply_type, _flags, timeout, _cancel, callback):
        self.timeouts.append(timeout)
        super().call(_dest, _path, _iface, method, args, _reply_type, _flags, timeout, _cancel, callback)

    def call_sync(self, _dest, _path, _iface, _method, _args, _reply_type, _flags, timeout, _cancel):
        self.timeouts.append(timeout)
        return GLib.Variant("(o)", ("/org/freedesktop/systemd1/unit/x",))


def test_calls_to_systemd_carry_the_configured_timeout() -> None:
    from gpujobd.daemon.adapters.systemd import Systemd
    from gpujobd.shared.config import DaemonConfig

    bus = _TimedBus()
    Systemd(bus, "gpujob-", call_timeout_s=2.5)._call("d", "/p", "i", "M", None, "(o)")  # type: ignore[arg-type]
    Systemd(bus, "gpujob-", call_timeout_s=2.5)._call_sync("/p", "i", "M", None, "(o)")  # type: ignore[arg-type]
    Systemd(bus, "gpujob-")._call("d", "/p", "i", "M", None, "(o)")  # type: ignore[arg-type]
    assert bus.timeouts == [2500, 2500, int(DaemonConfig.systemd_call_timeout_s * 1000)]
