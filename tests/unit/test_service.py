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

    def call_sync(self, _name, _path, _iface, method, params, _reply_type, _flags, _timeout, _cancel):
        assert method == "GetConnectionUnixUser"
        self.calls += 1
        sender = params.unpack()[0]
        if sender not in self.uids:
            raise GLib.Error.new_literal(GLib.quark_from_string("g-dbus-error-quark"),
                                         "GDBus.Error:org.freedesktop.DBus.Error.NameHasNoOwner: gone", 1)
        return GLib.Variant("(u)", (self.uids[sender],))


class FakeManager:
    def caller_from_uid(self, uid):
        return Caller(uid=uid, user=f"user{uid}", gid=uid, is_admin=False)


class Context:
    def __init__(self, sender):
        self.sender = sender


def test_the_caller_comes_from_the_bus_and_is_cached():
    bus = FakeBus({":1.5": 1001})
    service = ManagerService(FakeManager(), bus)
    assert service._caller(Context(":1.5")).uid == 1001
    assert service._caller(Context(":1.5")).uid == 1001
    assert bus.calls == 1


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
