"""The D-Bus contract, frozen: introspection XML, field signatures, job encoding, spec/filter decoding.

A failure here means clients built against version 1 may break. If the change is deliberate, update
tests/unit/snapshots/introspection-v1.xml (or the tables below) in the same change, and say so.
"""

from __future__ import annotations

import datetime
import difflib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, Mapping

import pytest
from gi.repository import Gio, GLib

from gpujobd.daemon import scheduler
from gpujobd.daemon.adapters import dbus_service as service
from gpujobd.daemon.adapters.dbus_service import ManagerService, decode_filter
from gpujobd.daemon.manager import Caller
from gpujobd.shared import api
from gpujobd.shared.errors import InvalidArgument, NotFound
from gpujobd.shared.jobspec import decode as decode_spec
from gpujobd.shared.model import Job, JobSpec, Outcome
from gpujobd.shared.states import EndReason, JobState

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "introspection-v1.xml"
NOW = 1_750_000_000.25
OWNER = Caller(uid=1000, user="alice", gid=1000, admin=lambda: False)


# ---------------------------------------------------------------------------------------------------
# Introspection XML.


def test_introspection_xml_matches_the_committed_snapshot() -> None:
    frozen = SNAPSHOT.read_text(encoding="utf-8").rstrip("\n")
    current = api.INTROSPECTION_XML.rstrip("\n")
    if current != frozen:
        diff = "\n".join(difflib.unified_diff(frozen.splitlines(), current.splitlines(),
                                              str(SNAPSHOT), "api.INTROSPECTION_XML", lineterm=""))
        where = SNAPSHOT.relative_to(SNAPSHOT.parents[3])
        pytest.fail(f"the D-Bus API changed: if deliberate, update the snapshot ({where}), e.g. with\n"
                    f"  python -c 'from gpujobd import api; print(api.INTROSPECTION_XML)' > {where}\n"
                    f"{diff}")


def _interface() -> ET.Element:
    root = ET.fromstring(api.INTROSPECTION_XML)
    assert root.tag == "node"
    (interface,) = root.findall("interface")
    return interface


def _args(element: ET.Element) -> list:
    return [(arg.get("name"), arg.get("type"), arg.get("direction")) for arg in element.findall("arg")]


# The members of the interface. Adding one is a deliberate change: update this and the snapshot.
METHODS = ("Submit", "Validate", "Stop", "Prune", "Get", "List", "Runs", "ReadLog", "Gpus", "SubmitAll",
           "Resubmit", "Drain", "Undrain")
SIGNALS = ("JobChanged", "StrayFound", "StrayCleared")

# What clients of version 1 call: these may never change (a new member or field may be added).
V1_METHOD_ARGS = {
    "Submit": [("spec", "a{sv}", "in"), ("job", "a{sv}", "out")],
    "Stop": [("id", "t", "in"), ("result", "s", "out")],
    "Get": [("id", "t", "in"), ("job", "a{sv}", "out")],
    "List": [("filter", "a{sv}", "in"), ("jobs", "aa{sv}", "out")],
    "ReadLog": [("id", "t", "in"), ("offset", "t", "in"), ("max_bytes", "u", "in"),
                ("data", "ay", "out"), ("next_offset", "t", "out"), ("job_ended", "b", "out")],
}


def test_xml_declares_exactly_the_methods_and_signal() -> None:
    interface = _interface()
    assert interface.get("name") == api.INTERFACE == "org.gpujobd1.Manager"
    assert sorted(m.get("name") for m in interface.findall("method")) == sorted(METHODS)
    assert [s.get("name") for s in interface.findall("signal")] == list(SIGNALS)
    assert {child.tag for child in interface} == {"method", "signal", "property"}


def test_v1_members_keep_their_signatures() -> None:
    interface = _interface()
    methods = {m.get("name"): _args(m) for m in interface.findall("method")}
    for name, args in V1_METHOD_ARGS.items():
        assert methods.get(name) == args, name
    signals = {s.get("name"): _args(s) for s in interface.findall("signal")}
    assert signals["JobChanged"] == [("id", "t", None), ("state", "s", None)]
    properties = {p.get("name"): (p.get("type"), p.get("access")) for p in interface.findall("property")}
    assert properties["Version"] == ("s", "read")


def test_every_xml_type_is_one_complete_dbus_type() -> None:
    for arg in _interface().iter("arg"):
        assert GLib.VariantType.string_is_valid(arg.get("type")), arg.attrib


def test_gio_accepts_the_xml_as_pydbus_will() -> None:
    info = Gio.DBusNodeInfo.new_for_xml(api.INTROSPECTION_XML)
    interface = info.lookup_interface(api.INTERFACE)
    assert interface is not None
    for name in ("Submit", "Stop", "Get", "List", "ReadLog"):
        assert interface.lookup_method(name) is not None, name
    assert interface.lookup_signal("JobChanged") is not None


def test_the_service_implements_every_declared_member() -> None:
    interface = _interface()
    for method in interface.findall("method"):
        assert callable(getattr(ManagerService, method.get("name"))), method.get("name")
    assert hasattr(ManagerService, "JobChanged")
    assert isinstance(ManagerService.Version, property)
    assert ManagerService.dbus == api.INTROSPECTION_XML


def test_names() -> None:
    assert (api.BUS_NAME, api.OBJECT_PATH) == ("org.gpujobd1", "/org/gpujobd1")
    assert (api.STOP_STOPPING, api.STOP_ALREADY_ENDED) == ("stopping", "already-ended")


# ---------------------------------------------------------------------------------------------------
# Field tables.


FIELD_TABLES = sorted(name for name in dir(api) if name.endswith("_FIELDS")
                      and isinstance(getattr(api, name), Mapping))


def test_the_field_tables_are_found() -> None:
    assert {"JOB_FIELDS", "SPEC_FIELDS", "FILTER_FIELDS"} <= set(FIELD_TABLES)


@pytest.mark.parametrize("table", FIELD_TABLES)
def test_every_field_has_a_valid_dbus_signature(table: str) -> None:
    fields: Mapping[str, str] = getattr(api, table)
    assert fields
    for name, signature in fields.items():
        assert GLib.VariantType.string_is_valid(signature), (table, name, signature)


V1_JOB_FIELDS = {
    "id": "t", "name": "s", "user": "s", "uid": "u", "state": "s", "unit": "s", "argv": "as",
    "cwd": "s", "env": "a{ss}", "properties": "a{ss}", "timeout_s": "d", "pid": "u",
    "created_at": "d", "started_at": "d", "ended_at": "d", "elapsed_s": "d", "reason": "s",
    "detail": "s", "exit_code": "i", "signal": "i", "leftover_processes": "u", "stopped_by": "s",
    "log_path": "s",
}
V1_SPEC_FIELDS = {"argv": "as", "cwd": "s", "env": "a{ss}", "name": "s", "properties": "a{ss}",
                  "timeout_s": "d"}
V1_FILTER_FIELDS = {"all": "b", "user": "s", "state": "s", "limit": "u"}


@pytest.mark.parametrize(("table", "v1"), [("JOB_FIELDS", V1_JOB_FIELDS), ("SPEC_FIELDS", V1_SPEC_FIELDS),
                                           ("FILTER_FIELDS", V1_FILTER_FIELDS)])
def test_v1_fields_keep_their_names_and_signatures(table: str, v1: Dict[str, str]) -> None:
    fields: Mapping[str, str] = getattr(api, table)
    changed = {name: (signature, fields.get(name)) for name, signature in v1.items()
               if fields.get(name) != signature}
    assert not changed, f"api.{table}: v1 fields removed or retyped (v1 signature, now): {changed}"


def test_every_json_field_comes_from_the_wire() -> None:
    assert set(api.JSON_FIELDS) <= set(api.JOB_FIELDS)
    assert len(set(api.JSON_FIELDS)) == len(api.JSON_FIELDS)
    assert set(api.TIME_FIELDS) <= set(api.JSON_FIELDS)


# ---------------------------------------------------------------------------------------------------
# Encoding jobs.


def _spec(**fields: Any) -> JobSpec:
    base: Dict[str, Any] = {"argv": ("python", "train.py", "--lr", "0.1"), "cwd": "/home/alice/run"}
    base.update(fields)
    return JobSpec(**base)


def starting_job() -> Job:
    return Job(id=7, user="alice", uid=1000, gid=1000, spec=_spec(), state=JobState.STARTING,
               created_at=NOW, unit="gpujob-7.scope")


def ended_job(**outcome: Any) -> Job:
    fields: Dict[str, Any] = {"reason": EndReason.EXIT_CODE, "exit_code": 3, "signal": None,
                              "detail": "", "leftover_processes": 2}
    fields.update(outcome)
    return Job(id=8, user="alice", uid=1000, gid=1000,
               spec=_spec(name="sweep-3", env={"SEED": "3"}, properties={"MemoryMax": "4G"},
                          timeout_s=3600.0),
               state=JobState.FAILED, created_at=NOW, unit="gpujob-8.scope", started_at=NOW + 1.5,
               ended_at=NOW + 61.75, outcome=Outcome(**fields), stopped_by=None)


def _variants(wire: Mapping[str, Any]) -> Dict[str, GLib.Variant]:
    return {key: GLib.Variant(signature, value) for key, (signature, value) in wire.items()}


UNSET_WHILE_STARTING = {"timeout_s", "pid", "started_at", "ended_at", "elapsed_s", "reason", "detail",
                        "exit_code", "signal", "leftover_processes", "stopped_by", "log_path"}


def test_encode_job_leaves_out_unset_fields() -> None:
    wire = api.encode_job(starting_job())
    assert not UNSET_WHILE_STARTING & set(wire), "unset optional fields are left out (D-Bus has no null)"
    assert {"id", "name", "user", "uid", "state", "unit", "argv", "cwd", "env", "properties",
            "created_at"} <= set(wire)
    assert wire["state"] == ("s", "starting")
    assert wire["name"] == ("s", "")  # empty, not unset: a string is always there
    assert all(value is not None for _, value in wire.values())
    assert all(signature == api.JOB_FIELDS[key] for key, (signature, _) in wire.items())


def test_encode_job_of_an_ended_job() -> None:
    wire = api.encode_job(ended_job(), log_path="/var/log/gpujobd/jobs/8.log")
    values = {key: value for key, (_, value) in wire.items() if key in V1_JOB_FIELDS}
    assert values == {
        "id": 8, "name": "sweep-3", "user": "alice", "uid": 1000, "state": "failed",
        "unit": "gpujob-8.scope", "argv": ["python", "train.py", "--lr", "0.1"],
        "cwd": "/home/alice/run", "env": {"SEED": "3"}, "properties": {"MemoryMax": "4G"},
        "timeout_s": 3600.0, "created_at": NOW, "started_at": NOW + 1.5, "ended_at": NOW + 61.75,
        "elapsed_s": 60.25, "reason": "exit-code", "detail": "", "exit_code": 3,
        "leftover_processes": 2, "log_path": "/var/log/gpujobd/jobs/8.log",
    }
    assert all(signature == api.JOB_FIELDS[key] for key, (signature, _) in wire.items())


def test_fields_at_their_default_are_left_out_and_read_back_as_it() -> None:
    plain_job = starting_job()
    wire = api.encode_job(plain_job)
    assert api.JOB_DEFAULTS and not set(api.JOB_DEFAULTS) & set(wire)
    back = api.job_from_wire({key: value for key, (_, value) in wire.items()})
    assert {key: back[key] for key in api.JOB_DEFAULTS} == {
        "background": plain_job.spec.background, "max_runs": 1,
        "stop_on_failure": plain_job.spec.stop_on_failure, "gpus": list(plain_job.gpus),
        "gpus_requested": plain_job.spec.gpus, "priority": plain_job.spec.priority,
        "after": list(plain_job.spec.after), "after_any": list(plain_job.spec.after_any)}


def test_fields_off_their_default_are_sent() -> None:
    loop = Job(id=9, user="alice", uid=1000, gid=1000, state=JobState.QUEUED, created_at=NOW,
               unit="gpujob-9.scope", gpus=("GPU-a",),
               spec=_spec(background=True, max_runs=5, restart_delay_s=1.0, stop_on_failure=True,
                          gpus=1, priority=-3, after=(4,), after_any=(5, 6)))
    wire = api.encode_job(loop)
    assert {key: wire[key][1] for key in api.JOB_DEFAULTS} == {
        "background": True, "max_runs": 5, "stop_on_failure": True, "gpus": ["GPU-a"],
        "gpus_requested": 1, "priority": -3, "after": [4], "after_any": [5, 6]}
    assert api.job_from_wire({key: value for key, (_, value) in wire.items()})["after_any"] == [5, 6]


def test_a_zero_that_is_not_the_default_is_sent() -> None:
    wire = api.encode_job(ended_job(exit_code=0, leftover_processes=0))
    assert (wire["exit_code"], wire["leftover_processes"]) == (("i", 0), ("u", 0))  # set, not unset


def test_the_defaults_are_post_v1_fields_that_fit_their_signatures() -> None:
    assert not set(api.JOB_DEFAULTS) & set(V1_JOB_FIELDS)  # a v1 client finds every v1 field
    for key, default in api.JOB_DEFAULTS.items():
        assert GLib.Variant(api.JOB_FIELDS[key], default).unpack() == default


def test_defaults_read_back_are_fresh_objects() -> None:
    api.job_from_wire({"id": 1})["after"].append(3)
    assert api.job_from_wire({"id": 2})["after"] == [] and api.JOB_DEFAULTS["after"] == []


def test_a_signal_end_has_a_signal_and_no_exit_code() -> None:
    wire = api.encode_job(ended_job(reason=EndReason.SIGNAL, exit_code=None, signal=9))
    assert "exit_code" not in wire
    assert wire["signal"] == ("i", 9)


def test_encoded_values_fit_their_signatures() -> None:
    for job in (starting_job(), ended_job(), ended_job(reason=EndReason.SIGNAL, exit_code=None, signal=9)):
        variants = _variants(api.encode_job(job, log_path="/x.log"))
        assert GLib.Variant("a{sv}", variants).get_type_string() == "a{sv}"


def _parse_iso(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.datetime.fromisoformat(text[:-1] + "+00:00").timestamp()


def test_a_job_round_trips_through_dbus_values_to_json() -> None:
    job = ended_job()
    variants = _variants(api.encode_job(job, log_path="/var/log/gpujobd/jobs/8.log"))
    received = GLib.Variant("a{sv}", variants).unpack()  # what a client gets off the wire
    out = api.job_to_json(received)

    assert list(out) == list(api.JSON_FIELDS)
    assert out["created_at"] == "2025-06-15T15:06:40.250Z"
    assert out["started_at"] == "2025-06-15T15:06:41.750Z"
    assert out["ended_at"] == "2025-06-15T15:07:42.000Z"
    for key, original in (("created_at", job.created_at), ("started_at", job.started_at),
                          ("ended_at", job.ended_at)):
        assert _parse_iso(out[key]) == pytest.approx(original, abs=0.001)
    assert out["argv"] == list(job.spec.argv)
    assert (out["exit_code"], out["signal"], out["reason"]) == (3, None, "exit-code")
    assert out["elapsed_s"] == pytest.approx(60.25)
    assert out["stopped_by"] is None and out["pid"] is None  # absent on the wire -> null
    assert json.loads(json.dumps(out)) == out


def test_json_of_a_starting_job_has_nulls_for_what_is_unknown() -> None:
    out = api.job_to_json(GLib.Variant("a{sv}", _variants(api.encode_job(starting_job()))).unpack())
    assert out["state"] == "starting"
    assert out["started_at"] is None and out["ended_at"] is None and out["exit_code"] is None
    assert out["created_at"].endswith("Z")


def test_iso_utc() -> None:
    assert api.iso_utc(None) is None
    assert api.iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert api.iso_utc(1.0005) == "1970-01-01T00:00:01.000Z"


@pytest.mark.parametrize("state, active", [
    ("queued", True), ("starting", True), ("running", True), ("stopping", True),
    ("succeeded", False), ("failed", False), ("stopped", False), ("timed-out", False), ("lost", False),
])
def test_is_active(state: str, active: bool) -> None:
    assert api.is_active({"state": state}) is active


def test_is_active_covers_every_state() -> None:
    assert {s.value for s in JobState} == {"queued", "starting", "running", "stopping", "succeeded", "failed",
                                           "stopped", "timed-out", "lost"}


def test_the_service_hides_env_from_other_users() -> None:
    class Files:
        @staticmethod
        def log_path(job_id: int) -> str:
            return f"/var/log/gpujobd/jobs/{job_id}.log"

    svc = ManagerService(Files(), None)  # type: ignore[arg-type]
    job = ended_job()
    mine = svc._encode(job, OWNER)
    theirs = svc._encode(job, Caller(uid=1001, user="bob", gid=1001, admin=lambda: False))
    admins = svc._encode(job, Caller(uid=1002, user="carol", gid=1002, admin=lambda: True))
    assert mine["env"].unpack() == {"SEED": "3"} and admins["env"].unpack() == {"SEED": "3"}
    assert "env" not in theirs
    assert set(mine) - set(theirs) == {"env"}
    assert mine["log_path"].unpack() == "/var/log/gpujobd/jobs/8.log"


def test_errors_cross_the_wire_under_their_stable_names() -> None:
    @service.on_the_wire
    def not_found() -> None:
        raise NotFound("there is no job 9")

    @service.on_the_wire
    def broken() -> None:
        raise KeyError("secret internal detail")

    with pytest.raises(Exception) as caught:
        not_found()
    assert type(caught.value).__name__ == "org.gpujobd1.Error.NotFound"
    assert str(caught.value) == "there is no job 9"
    with pytest.raises(Exception) as caught:
        broken()
    assert type(caught.value).__name__ == "org.gpujobd1.Error.Internal"
    assert "secret" not in str(caught.value) and "journalctl" in str(caught.value)


# ---------------------------------------------------------------------------------------------------
# Decoding a Submit spec.


def test_decode_a_minimal_spec() -> None:
    assert decode_spec({"argv": ["true"], "cwd": "/"}) == JobSpec(argv=("true",), cwd="/")


def test_decode_a_full_spec() -> None:
    spec = decode_spec({"argv": ["python", "x.py"], "cwd": "/srv", "env": {"A": "1"}, "name": "n",
                        "properties": {"MemoryMax": "4G"}, "timeout_s": 60.5})
    assert spec == JobSpec(argv=("python", "x.py"), cwd="/srv", env={"A": "1"}, name="n",
                           properties={"MemoryMax": "4G"}, timeout_s=60.5)


def test_an_integer_timeout_is_taken_as_seconds() -> None:
    spec = decode_spec({"argv": ["true"], "cwd": "/", "timeout_s": 60})
    assert spec.timeout_s == 60.0 and isinstance(spec.timeout_s, float)


def test_decode_spec_refuses_unknown_keys_naming_them() -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_spec({"argv": ["true"], "cwd": "/", "gpu_count": 2, "urgency": "high"})
    message = str(caught.value)
    assert "'gpu_count'" in message and "'urgency'" in message
    assert "known:" in message and "timeout_s" in message


@pytest.mark.parametrize(("spec", "missing"), [({"cwd": "/"}, ["argv (the command)"]),
                                               ({"argv": ["true"]}, ["cwd (--cwd)"]),
                                               ({}, ["argv (the command)", "cwd (--cwd)"])])
def test_decode_spec_needs_argv_and_cwd(spec: Dict[str, Any], missing: list) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_spec(spec)
    assert all(f"{label} is missing" in str(caught.value) for label in missing)
    assert str(caught.value).count("is missing") == len(missing)


@pytest.mark.parametrize(("change", "field"), [
    ({"argv": "python train.py"}, "argv"),
    ({"argv": ["python", 3]}, "argv"),
    ({"argv": [b"python"]}, "argv"),
    ({"cwd": ["/"]}, "cwd"),
    ({"cwd": None}, "cwd"),
    ({"env": {"A": 1}}, "env"),
    ({"env": {"A": None}}, "env"),
    ({"env": {1: "a"}}, "env"),
    ({"env": ["A=1"]}, "env"),
    ({"env": "A=1"}, "env"),
    ({"properties": {"MemoryMax": 4}}, "properties"),
    ({"properties": "MemoryMax=4G"}, "properties"),
    ({"name": 7}, "name"),
    ({"timeout_s": "60"}, "timeout_s"),
    ({"timeout_s": True}, "timeout_s"),
    ({"timeout_s": None}, "timeout_s"),
])
def test_decode_spec_refuses_wrong_types_naming_the_field(change: Dict[str, Any], field: str) -> None:
    spec: Dict[str, Any] = {"argv": ["true"], "cwd": "/"}
    spec.update(change)
    with pytest.raises(InvalidArgument) as caught:
        decode_spec(spec)
    assert f"spec field {field!r}: expected" in str(caught.value)


class CallerBus:
    """The bus as the service asks it who a caller is: uid 1000."""

    def call_sync(self, *args: Any) -> GLib.Variant:
        return GLib.Variant("(u)", (1000,))


class CallerContext:
    sender = ":1.7"


def test_the_service_decodes_a_submit_spec_with_the_declaration() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.specs: list = []

        def caller_from_uid(self, uid: int) -> Caller:
            return Caller(uid=uid, user="alice", gid=uid, admin=lambda: False)

        def submit(self, caller: Caller, spec: JobSpec) -> Job:
            self.specs.append(spec)
            return Job(id=1, user="alice", uid=caller.uid, gid=caller.gid, spec=spec,
                       state=JobState.STARTING, created_at=0.0, unit="gpujob-1.scope")

        def log_path(self, job_id: int) -> str:
            return ""

    manager = Recorder()
    service = ManagerService(manager, CallerBus())  # type: ignore[arg-type]
    reply = service.Submit({"argv": ["true"], "cwd": "/", "max_runs": 3, "background": True,
                            "gpu_check": "wait"}, dbus_context=CallerContext())
    assert manager.specs == [JobSpec(argv=("true",), cwd="/", max_runs=3, background=True, gpu_check="wait")]
    assert reply.unpack()[0]["max_runs"] == 3  # the whole (a{sv}) reply, built by the service
    with pytest.raises(Exception) as refused:
        service.Submit({"argv": ["true"], "cwd": "/", "max_runs": "3"}, dbus_context=CallerContext())
    assert type(refused.value).__name__ == "org.gpujobd1.Error.InvalidArgument"
    assert "spec field 'max_runs': expected a whole number" in str(refused.value)
    assert len(manager.specs) == 1


def test_a_submit_reply_does_not_plan_the_queue_and_a_get_does() -> None:
    """The queue's places are planned when a client asks; a Submit's reply does not ask (its job is
    placed after the reply), or every submit would place every queued job."""
    queued = Job(id=4, user="alice", uid=1000, gid=1000, spec=_spec(), state=JobState.QUEUED,
                 created_at=NOW, unit="gpujob-4.scope")

    class Queue:
        def __init__(self) -> None:
            self.asked: list = []

        def wait_of(self, job_id: int) -> Any:
            self.asked.append(job_id)
            return scheduler.Wait(job_id, 3, "a start slot")

    class Manager:
        queue = Queue()

        def caller_from_uid(self, uid: int) -> Caller:
            return Caller(uid=uid, user="alice", gid=uid, admin=lambda: False)

        def submit(self, caller: Caller, spec: JobSpec) -> Job:
            return queued

        def get(self, job_id: int) -> Job:
            return queued

        def log_path(self, job_id: int) -> str:
            return ""

    manager = Manager()
    service = ManagerService(manager, CallerBus())  # type: ignore[arg-type]
    submitted = service.Submit({"argv": ["true"], "cwd": "/"}, dbus_context=CallerContext()).unpack()[0]
    assert submitted["state"] == "queued" and "position" not in submitted and manager.queue.asked == []
    got = service.Get(4, dbus_context=CallerContext()).unpack()[0]
    assert (got["position"], got["waiting_for"]) == (3, "a start slot") and manager.queue.asked == [4]


# ---------------------------------------------------------------------------------------------------
# Decoding a List filter.


def test_decode_the_empty_filter() -> None:
    assert decode_filter({}) == (False, None, None, api.LIST_PAGE_MAX, None)


def test_decode_a_full_filter() -> None:
    assert decode_filter({"all": True, "user": "alice", "state": "running", "limit": 10,
                          "after_id": 3}) == (True, "alice", JobState.RUNNING, 10, 3)


@pytest.mark.parametrize(("filters", "expected"), [
    ({"limit": 0}, (False, None, None, api.LIST_PAGE_MAX, None)),  # 0: no limit asked
    ({"limit": api.LIST_PAGE_MAX + 1}, (False, None, None, api.LIST_PAGE_MAX, None)),
    ({"user": "", "state": ""}, (False, None, None, api.LIST_PAGE_MAX, None)),
    ({"after_id": 7, "limit": 5}, (False, None, None, 5, 7)),
])
def test_decode_filter_defaults_and_caps(filters: Dict[str, Any], expected: tuple) -> None:
    assert decode_filter(filters) == expected


def test_decode_filter_refuses_unknown_keys() -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_filter({"all": True, "owner": "alice"})
    assert "'owner'" in str(caught.value) and "known:" in str(caught.value)


@pytest.mark.parametrize("state", ["done", "RUNNING", "timed_out"])
def test_decode_filter_refuses_unknown_states_listing_the_known_ones(state: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_filter({"state": state})
    message = str(caught.value)
    assert repr(state) in message
    assert all(s.value in message for s in JobState)


@pytest.mark.parametrize("filters", [{"limit": "ten"}, {"all": "false"}, {"user": 5}])
def test_decode_filter_refuses_wrong_types_naming_the_field(filters: Dict[str, Any]) -> None:
    (field,) = filters
    with pytest.raises(InvalidArgument, match=repr(field)):
        decode_filter(filters)
