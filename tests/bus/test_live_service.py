"""The published service, live: its introspection, the verbs through the real client, and its errors
by name, class and exit code."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Tuple

import pytest
from gi.repository import Gio, GLib

from gpujobd.cli import main as cli
from gpujobd.client import Client
from gpujobd.shared import api, errors
from gpujobd.shared.config import Config
from tests.bus.conftest import LiveService, gpujobctl_as

SNAPSHOT = Path(__file__).resolve().parents[1] / "unit" / "snapshots" / "introspection-v1.xml"
USER = "nobody"  # the service never runs a job for root: jobs are submitted as this user

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="submits as another user: must be root")


def call(address: str, interface: str, method: str, args: GLib.Variant | None, reply: str) -> GLib.Variant:
    """One raw call to the service on the bus at `address`, on a connection of its own."""
    flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    connection = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
    try:
        return connection.call_sync(api.BUS_NAME, api.OBJECT_PATH, interface, method, args,
                                    GLib.VariantType.new(reply), Gio.DBusCallFlags.NONE, 5000, None)
    finally:
        connection.close_sync(None)


def introspect(address: str) -> str:
    return call(address, "org.freedesktop.DBus.Introspectable", "Introspect", None, "(s)").unpack()[0]


def canonical(element: ET.Element) -> Tuple[Any, ...]:
    """An element as a comparable value: attributes unordered; members of an interface unordered
    (by kind and name); the args of a method or signal in their order, which is the signature."""
    children = [canonical(child) for child in element]
    if element.tag in ("node", "interface"):
        children.sort()
    return (element.tag, tuple(sorted(element.attrib.items())), tuple(children))


def interfaces(xml: str) -> dict:
    return {iface.get("name"): canonical(iface) for iface in ET.fromstring(xml).iter("interface")}


def test_the_published_object_introspects_as_the_snapshot(live_service: LiveService,
                                                            bus_address: str) -> None:
    live = interfaces(introspect(bus_address))
    frozen = interfaces(SNAPSHOT.read_text(encoding="utf-8"))
    assert api.INTERFACE in frozen, f"the snapshot has no {api.INTERFACE}"
    assert api.INTERFACE in live, f"the published object has no {api.INTERFACE}: {sorted(live)}"
    for name, expected in frozen.items():
        assert live.get(name) == expected, (
            f"{name} as published differs from {SNAPSHOT.name}: the D-Bus API changed; if deliberate, "
            "update the snapshot (see tests/unit/test_api.py)")
    # What GDBus adds itself: the standard interfaces, nothing else.
    standard = {"org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable",
                "org.freedesktop.DBus.Peer"}
    assert set(live) - set(frozen) <= standard


@needs_root
def test_submit_get_list_stop_through_the_real_client(live_service: LiveService, bus_address: str) -> None:
    submitted = gpujobctl_as(USER, bus_address, "submit", "--json", "--cwd", "/", "--name", "live",
                             "--", "sleep", "60")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert (job["user"], job["name"], job["argv"]) == (USER, "live", ["sleep", "60"])
    assert job["state"] == "queued"  # answered first; the queue's plan then starts it
    unit = job["unit"]
    client = Client(bus_address, call_timeout_s=10)  # root: an admin, who may look at and stop any job
    deadline = time.monotonic() + 10
    while client.get(job["id"])["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get(job["id"])["state"] == "starting"
    live_service.loop.call(live_service.systemd.finish_start_job, unit)  # systemd: the scope is active
    assert client.get(job["id"])["state"] == "running"
    listed = client.list()
    assert [(j["id"], j["state"]) for j in listed] == [(job["id"], "running")]
    mine = gpujobctl_as(USER, bus_address, "list", "--json")
    assert mine.returncode == 0, mine.stderr
    assert [j["id"] for j in json.loads(mine.stdout)] == [job["id"]]

    assert client.stop(job["id"]) == api.STOP_STOPPING
    assert live_service.loop.call(live_service.systemd.was_stopped, unit)
    live_service.loop.call(live_service.systemd.scope_ends, unit)  # systemd: the scope is gone
    ended = client.wait(job["id"], timeout_s=10)  # woken by the JobChanged signal on the bus
    assert (ended["state"], ended["reason"], ended["stopped_by"]) == ("stopped", "stopped", "root")
    assert client.stop(job["id"]) == api.STOP_ALREADY_ENDED


def test_no_such_job_crosses_the_bus_by_name_class_and_exit_code(
        live_service: LiveService, bus_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GLib.Error) as raw:
        call(bus_address, api.INTERFACE, "Get", GLib.Variant("(t)", (999,)), "(a{sv})")
    assert Gio.DBusError.get_remote_error(raw.value) == "org.gpujobd1.Error.NotFound"

    with pytest.raises(errors.NotFound, match="no job 999"):
        Client(bus_address).get(999)
    assert cli.main(["status", "999"], client_factory=lambda: Client(bus_address)) == 3
    assert "no job 999" in capsys.readouterr().err


def test_root_may_not_submit_and_exits_permission_denied(
        live_service: LiveService, bus_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the refusal is for root")
    code = cli.main(["submit", "--cwd", "/", "--", "true"], client_factory=lambda: Client(bus_address))
    assert code == 4
    assert "never runs a job as root" in capsys.readouterr().err
    assert Client(bus_address).list(all=True) == []  # nothing was created


def test_a_bus_where_gpujobd_is_not_running_exits_5(bus_address: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"], client_factory=lambda: Client(bus_address, call_timeout_s=5)) == 5
    assert "gpujobd is not running" in capsys.readouterr().err


@needs_root
def test_a_pair_whose_loop_the_daemon_refuses_starts_nothing(live_service: LiveService,
                                                             bus_address: str) -> None:
    limit = Config().jobs.max_runs_limit  # the live service runs with the defaults
    refused = gpujobctl_as(USER, bus_address, "submit", "--cwd", "/", "--max-runs", str(limit + 1),
                           "--with-background", "sleep 1", "--", "sleep", "60")
    assert refused.returncode == 2, refused.stderr
    assert "max_runs (--max-runs)" in refused.stderr and str(limit) in refused.stderr
    assert Client(bus_address).list(all=True) == []  # the foreground was never started


def test_validate_refuses_root_as_submit_would_and_creates_nothing(live_service: LiveService,
                                                                   bus_address: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("the refusal is for root")
    with pytest.raises(errors.PermissionDenied, match="never runs a job as root"):
        Client(bus_address).validate(["true"], cwd="/")
    assert Client(bus_address).list(all=True) == []


def test_one_client_serves_threads_calling_at_once(live_service: LiveService, bus_address: str) -> None:
    import threading

    client = Client(bus_address, call_timeout_s=10)
    answers: list = []
    failures: list = []

    def ask(n: int) -> None:
        try:
            for _ in range(30):
                with pytest.raises(errors.NotFound, match=f"no job {900 + n}"):
                    client.get(900 + n)
                answers.append(client.list(all=True))
        except BaseException as error:  # reported below, with the thread's number
            failures.append((n, error))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(answers) == 120 and all(isinstance(answer, list) for answer in answers)


@needs_root
def test_each_state_change_is_signalled_with_the_job_id_and_its_state(live_service: LiveService,
                                                                      bus_address: str) -> None:
    from jeepney import HeaderFields, MatchRule, MessageType
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    listener = open_dbus_connection(bus=bus_address)
    try:
        rule = MatchRule(type="signal", interface=api.INTERFACE, member="JobChanged", path=api.OBJECT_PATH)
        listener.send_and_get_reply(message_bus.AddMatch(rule), timeout=10)
        submitted = gpujobctl_as(USER, bus_address, "submit", "--json", "--cwd", "/", "--", "sleep", "60")
        assert submitted.returncode == 0, submitted.stderr
        job = json.loads(submitted.stdout)
        seen = []

        def until(state: str) -> None:
            while state not in [state for _, state in seen]:
                message = listener.receive(timeout=10)
                if message.header.message_type is MessageType.signal:
                    assert message.header.fields[HeaderFields.signature] == "ts"
                    seen.append(tuple(message.body))

        until("starting")  # the queue's plan, run after Submit was answered, started it
        live_service.loop.call(live_service.systemd.finish_start_job, job["unit"])
        until("running")
        assert seen and all(job_id == job["id"] for job_id, _ in seen)
        assert [state for _, state in seen][-1] == "running"
    finally:
        listener.close()
