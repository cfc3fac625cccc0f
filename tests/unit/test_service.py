"""The D-Bus service's own duties: who is calling, and errors on the wire."""

from __future__ import annotations

import pytest
from gi.repository import GLib

from gpujobd.daemon.adapters.dbus_service import ManagerService, on_the_wire
from gpujobd.daemon.manager import Caller
from gpujobd.shared.errors import NotFound, PermissionDenied


class FakeBus:
    """Answers GetConnectionUnixUser from a table; an unknown sender is an error, as on a real bus."""

    def __init__(self, uids):
        self.uids = uids
        self.calls = 0
        self.timeouts = []

    def call_sync(self, _name, _path, _iface, method, params, _reply_type, _flags, timeout, _cancel):
        assert method == "GetConnectionUnixUser"
        self.calls += 1
        self.timeouts.append(timeout)
        sender = params.unpack()[0]
        if sender not in self.uids:
            raise GLib.Error.new_literal(GLib.quark_from_string("g-dbus-error-quark"),
                                         "GDBus.Error:org.freedesktop.DBus.Error.NameHasNoOwner: gone", 1)
        return GLib.Variant("(u)", (self.uids[sender],))


class FakeManager:
    def caller_from_uid(self, uid):
        return Caller(uid=uid, user=f"user{uid}", gid=uid, admin=lambda: False)


class Context:
    def __init__(self, sender):
        self.sender = sender


def test_the_caller_comes_from_the_bus_and_is_cached():
    bus = FakeBus({":1.5": 1001})
    service = ManagerService(FakeManager(), bus)
    assert service._caller(Context(":1.5")).uid == 1001
    assert service._caller(Context(":1.5")).uid == 1001
    assert bus.calls == 1


def test_the_caller_lookup_waits_the_configured_time():
    from gpujobd.shared.config import DaemonConfig

    bus = FakeBus({":1.5": 1001, ":1.6": 1002})
    ManagerService(FakeManager(), bus, caller_lookup_timeout_s=0.75)._caller(Context(":1.5"))
    ManagerService(FakeManager(), bus)._caller(Context(":1.6"))
    assert bus.timeouts == [750, int(DaemonConfig.caller_lookup_timeout_s * 1000)]


@pytest.mark.parametrize("sender", [None, "", ":1.99"])
def test_a_caller_whose_uid_cannot_be_established_is_denied(sender):
    service = ManagerService(FakeManager(), FakeBus({}))
    with pytest.raises(PermissionDenied, match="could not establish"):
        service._caller(Context(sender))


def test_errors_cross_the_wire_with_their_stable_names_and_no_traceback():
    @on_the_wire
    def missing():
        raise NotFound("there is no job 5")

    @on_the_wire
    def broken():
        raise KeyError("internal detail")

    with pytest.raises(Exception) as not_found:
        missing()
    assert type(not_found.value).__name__ == "org.gpujobd1.Error.NotFound"
    assert str(not_found.value) == "there is no job 5"
    with pytest.raises(Exception) as internal:
        broken()
    assert type(internal.value).__name__ == "org.gpujobd1.Error.Internal"
    assert "internal detail" not in str(internal.value) and "journalctl" in str(internal.value)


class LogManager(FakeManager):
    def __init__(self, data):
        self.data = data

    def read_log(self, caller, job_id, offset, max_bytes):
        chunk = self.data[offset:offset + max_bytes]
        return chunk, offset + len(chunk), True


def test_read_log_builds_its_reply_as_one_byte_string_not_a_variant_per_byte():
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    service = ManagerService(LogManager(data), FakeBus({":1.5": 1001}))
    reply = service.ReadLog(1, 0, 1 << 20, dbus_context=Context(":1.5"))
    assert isinstance(reply, GLib.Variant) and reply.get_type_string() == "(aytb)"
    assert reply.get_child_value(0).get_data_as_bytes().get_data() == data
    assert reply.get_child_value(1).get_uint64() == len(data)
    assert ManagerService.ReadLog.replies_with_variant


# --- a job's a{sv}: built with GLib's constructors, kept while the job does not change ----------------

WIRE_SAMPLES = [("s", "x"), ("s", ""), ("b", True), ("b", 0), ("d", 3), ("d", 1.5), ("i", -3), ("u", 7),
                ("t", 2**63), ("x", -5), ("as", []), ("as", ["a", "b"]), ("at", []), ("at", [1, 2]),
                ("a{ss}", {}), ("a{ss}", {"A": "b"}), ("a{st}", {"g": 5}), ("aa{sv}", []),
                ("aa{sv}", [{"a": ("s", "x"), "n": ("t", 3)}]), ("a(ss)", [("k", "v")])]


@pytest.mark.parametrize(("signature", "value"), WIRE_SAMPLES, ids=lambda sample: repr(sample))
def test_each_field_is_the_variant_glib_s_generic_constructor_makes(signature, value):
    from gpujobd.daemon.adapters.dbus_service import variants

    generic_value = value
    if signature == "aa{sv}":
        generic_value = [{key: GLib.Variant(sig, item) for key, (sig, item) in record.items()}
                         for record in value]
    expected = GLib.Variant(signature, generic_value)
    made = variants({"field": (signature, value)})["field"]
    assert made.get_type_string() == signature and made.equal(expected), (made, expected)


def test_every_job_field_signature_has_a_direct_constructor():
    from gpujobd.daemon.adapters import dbus_service
    from gpujobd.shared import api

    direct = {*dbus_service._SCALARS, "as", *dbus_service._ARRAY_TYPES, *dbus_service._ENTRY_TYPES}
    generic = sorted(set(api.JOB_FIELDS.values()) - direct)
    assert api.JOB_FIELDS and generic == []  # a new field type: give it a constructor in _variant


def test_a_job_asked_again_unchanged_gets_the_same_reply_and_a_changed_one_a_new_one():
    from gpujobd.daemon.adapters.dbus_service import JobReplies

    replies = JobReplies(size=2)
    wire = {"id": ("t", 1), "state": ("s", "running"), "env": ("a{ss}", {"A": "1"})}
    first = replies.vardict(1, wire)
    assert first.unpack() == {"id": 1, "state": "running", "env": {"A": "1"}}
    assert replies.vardict(1, dict(wire)) is first  # an equal wire form, decoded afresh
    ended = replies.vardict(1, {**wire, "state": ("s", "succeeded")})
    assert ended is not first and ended.unpack()["state"] == "succeeded"
    assert replies.vardict(1, {**wire, "env": ("a{ss}", {"A": "2"})}).unpack()["env"] == {"A": "2"}


def test_the_kept_replies_are_bounded_least_recently_asked_first():
    from gpujobd.daemon.adapters.dbus_service import JobReplies

    replies = JobReplies(size=2)
    wires = {job_id: {"id": ("t", job_id)} for job_id in (1, 2, 3)}
    one, two = replies.vardict(1, wires[1]), replies.vardict(2, wires[2])
    assert replies.vardict(1, wires[1]) is one  # 1 is now the most recently asked
    replies.vardict(3, wires[3])  # evicts 2
    assert replies.vardict(1, wires[1]) is one
    assert replies.vardict(2, wires[2]) is not two


def test_the_same_version_of_a_job_in_the_same_context_is_not_encoded_again():
    import dataclasses

    from gpujobd.daemon.adapters.dbus_service import JobReplies
    from gpujobd.shared import api
    from gpujobd.shared.jobspec import JobSpec
    from gpujobd.shared.model import Job
    from gpujobd.shared.states import JobState

    job = Job(id=5, user="alice", uid=1000, gid=1000, state=JobState.RUNNING, created_at=1.0,
              unit="gpujob-5.scope", spec=JobSpec(argv=("true",), cwd="/", env={"TOKEN": "secret"}))
    encoded = []

    def encode(version, shows_env):
        def run():
            encoded.append(version)
            wire = api.encode_job(version)
            if not shows_env:
                wire.pop("env")
            return wire
        return run

    replies = JobReplies(size=4)
    first = replies.of_job(job, (None, None, True), encode(job, True))
    assert replies.of_job(job, (None, None, True), encode(job, True)) is first and encoded == [job]
    # Another context (a caller who may not see the environment) is encoded, and sent without it.
    assert "env" not in replies.of_job(job, (None, None, False), encode(job, False)).unpack()
    assert len(encoded) == 2
    # A new version of the job (the store reads one after each write) is encoded.
    ended = dataclasses.replace(job, state=JobState.SUCCEEDED, ended_at=2.0)
    assert replies.of_job(ended, (None, None, True), encode(ended, True)).unpack()["state"] == "succeeded"
    assert encoded[-1] is ended
    # An equal version read afresh is encoded, but its reply is the one kept (the repr key).
    again = dataclasses.replace(ended)
    assert again is not ended
    reply = replies.of_job(again, (None, None, True), encode(again, True))
    assert encoded[-1] is again and reply is replies.of_job(again, (None, None, True), encode(again, True))
    assert len(encoded) == 4


class AsyncBus(FakeBus):
    """GetConnectionUnixUser asked asynchronously: held until the test answers it, as a busy bus."""

    def __init__(self, uids):
        super().__init__(uids)
        self.asked = []  # (sender, callback), in order

    def call(self, _name, _path, _iface, method, params, _reply_type, _flags, timeout, _cancel, callback):
        assert method == "GetConnectionUnixUser"
        self.timeouts.append(timeout)
        self.asked.append((params.unpack()[0], callback))

    def answer(self):
        sender, callback = self.asked.pop(0)
        callback(self, sender)

    def call_finish(self, sender):
        return self.call_sync(None, None, None, "GetConnectionUnixUser", GLib.Variant("(s)", (sender,)),
                              None, None, None, None)


def test_a_new_callers_calls_wait_for_one_lookup_and_then_run_in_order():
    bus = AsyncBus({":1.7": 1001})
    service = ManagerService(FakeManager(), bus, caller_lookup_timeout_s=0.75)
    ran, denied = [], []
    for name in ("first", "second"):
        service.resolve_caller(":1.7", lambda name=name: ran.append(name), denied.append)
    assert ran == [] and len(bus.asked) == 1, "nothing runs before the bus answered, and it is asked once"
    assert bus.timeouts == [750]
    bus.answer()
    assert ran == ["first", "second"] and denied == []
    assert service._caller(Context(":1.7")).uid == 1001
    service.resolve_caller(":1.7", lambda: ran.append("third"), denied.append)
    assert ran[-1] == "third" and bus.asked == [] and bus.calls == 1, "known now: no second lookup"


def test_a_caller_the_bus_cannot_name_is_denied_every_waiting_call():
    bus = AsyncBus({})  # the sender left: NameHasNoOwner
    service = ManagerService(FakeManager(), bus)
    ran, denied = [], []
    for _ in range(2):
        service.resolve_caller(":1.9", lambda: ran.append(1), denied.append)
    bus.answer()
    assert ran == [] and len(denied) == 2
    assert all(isinstance(err, PermissionDenied) and "could not establish your user id" in str(err)
               for err in denied)
    service.resolve_caller(None, lambda: ran.append(1), denied.append)
    assert ran == [] and "could not establish who is calling" in str(denied[-1])


class BrokenManager(FakeManager):
    def caller_from_uid(self, uid):
        raise KeyError("nss")


def test_a_lookup_that_breaks_still_answers_every_waiting_call():
    bus = AsyncBus({":1.8": 1001})
    service = ManagerService(BrokenManager(), bus)
    denied = []
    service.resolve_caller(":1.8", lambda: None, denied.append)
    bus.answer()
    assert len(denied) == 1 and "failed internally" in str(denied[0])
