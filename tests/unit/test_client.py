"""gpujobd.client without a bus: error mapping, the a{sv} it sends, and its calls against a fake
transport (a small stateful daemon that answers calls with plain values, as the jeepney transport
returns them; tests/bus runs the real transport against the real service)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from jeepney.low_level import Endianness, parse_signature

from gpujobd import client
from gpujobd.client import transport
from gpujobd.shared import api, errors


def on_the_wire(signature: str, value: Any) -> Any:
    """A value serialised as jeepney sends it and parsed back, variants unwrapped."""
    kind = parse_signature(list(signature))
    parsed, _end = kind.parse_data(kind.serialise(value, 0, Endianness.little), 0, Endianness.little)
    return transport.plain(parsed, signature)


def dbus_error(name: str, text: str, what: str = "Get", timeout_s: float = 30.0) -> errors.GpujobdError:
    return client.error_from_dbus(name, text, what, timeout_s)


# --- error mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [
    ("org.gpujobd1.Error.InvalidArgument", errors.InvalidArgument),
    ("org.gpujobd1.Error.NotFound", errors.NotFound),
    ("org.gpujobd1.Error.PermissionDenied", errors.PermissionDenied),
    ("org.gpujobd1.Error.Unavailable", errors.Unavailable),
    ("org.gpujobd1.Error.Internal", errors.Internal),
    ("org.gpujobd1.Error.ConfigError", errors.ConfigError),
    ("org.gpujobd1.Error.Failed", errors.GpujobdError),
    ("org.gpujobd1.Error.SomethingNewer", errors.GpujobdError),
])
def test_gpujobd_errors_keep_their_class_and_text(name, cls):
    error = dbus_error(name, "no job 7: see `gpujobctl list`")
    assert type(error) is cls
    assert str(error) == "no job 7: see `gpujobctl list`"


def test_multiline_remote_text_is_kept_whole():
    error = dbus_error("org.gpujobd1.Error.Internal", "a\nb")
    assert str(error) == "a\nb"


@pytest.mark.parametrize("name", ["org.freedesktop.DBus.Error.ServiceUnknown",
                                  "org.freedesktop.DBus.Error.NameHasNoOwner"])
def test_no_daemon_is_unavailable(name):
    error = dbus_error(name, "The name org.gpujobd1 was not provided by any .service files")
    assert type(error) is errors.Unavailable
    assert str(error) == ("gpujobd is not running or the system bus is unreachable (The name org.gpujobd1 "
                          "was not provided by any .service files): check `systemctl status gpujobd`")


def test_no_bus_socket_is_unavailable():
    error = transport.error_from_os(FileNotFoundError(2, "No such file or directory"),
                                    "connecting to the bus")
    assert type(error) is errors.Unavailable
    assert "(connecting to the bus: [Errno 2] No such file or directory)" in str(error)
    assert "systemctl status gpujobd" in str(error)


def test_access_denied_is_permission_denied():
    error = dbus_error("org.freedesktop.DBus.Error.AccessDenied", "Rejected send message", "Stop")
    assert type(error) is errors.PermissionDenied
    assert "Stop" in str(error) and "Rejected send message" in str(error)


def test_local_timeout_is_unavailable_and_says_what_timed_out():
    error = transport.error_from_os(TimeoutError(), "Submit", 30.0)
    assert type(error) is errors.Unavailable
    assert str(error).startswith("gpujobd did not answer Submit within 30s")


def test_no_reply_is_unavailable():
    error = dbus_error("org.freedesktop.DBus.Error.NoReply", "Message recipient disconnected", "Get", 5.0)
    assert type(error) is errors.Unavailable
    assert "did not answer Get within 5s (Message recipient disconnected)" in str(error)


def test_invalid_args_is_invalid_argument():
    error = dbus_error("org.freedesktop.DBus.Error.InvalidArgs", "Type of message, '(s)', does not match")
    assert type(error) is errors.InvalidArgument


def test_unknown_method_hints_at_a_version_mismatch():
    error = dbus_error("org.freedesktop.DBus.Error.UnknownMethod", "No such method 'ReadLog'", "ReadLog")
    assert type(error) is errors.GpujobdError
    assert "different versions" in str(error)


def test_other_errors_become_the_base_class_with_their_text():
    error = dbus_error("com.example.Weird", "hm", "List")
    assert type(error) is errors.GpujobdError
    assert str(error) == "List failed: com.example.Weird: hm"


# --- what is sent -----------------------------------------------------------------------------------


def test_spec_has_the_contract_types():
    spec = client.build_spec(["python", "train.py"], cwd="/srv", env={"A": "1"}, name="n",
                             properties={"CPUQuota": "50%"}, timeout_s=60, caller_environ={})
    assert set(spec) == {"argv", "cwd", "env", "name", "properties", "timeout_s"}
    assert all(signature == api.SPEC_FIELDS[key] for key, (signature, _value) in spec.items())
    assert on_the_wire("a{sv}", spec) == {"argv": ["python", "train.py"], "cwd": "/srv", "env": {"A": "1"},
                                  "name": "n", "properties": {"CPUQuota": "50%"}, "timeout_s": 60.0}


def test_spec_leaves_unset_options_out_and_defaults_cwd():
    spec = client.spec_values(["true"], caller_environ={})
    assert spec == {"argv": ["true"], "cwd": os.getcwd()}


def test_relative_cwd_is_made_absolute():
    assert client.spec_values(["true"], cwd="sub", caller_environ={})["cwd"] == os.path.abspath("sub")


def test_env_is_the_callers_environment_less_its_session_with_the_explicit_env_over_it():
    caller = {"LANG": "de_DE.UTF-8", "HOME": "/home/a", "PATH": "/venv/bin:/bin", "VIRTUAL_ENV": "/venv",
              "DISPLAY": ":0", "SSH_AUTH_SOCK": "/tmp/agent", "TERM": "xterm", "GPUJOB_ID": "7",
              "USER": "a", "A": "0"}
    sent = client.spec_values(["true"], env={"A": "1"}, caller_environ=caller)["env"]
    assert sent == {"LANG": "de_DE.UTF-8", "HOME": "/home/a", "PATH": "/venv/bin:/bin",
                    "VIRTUAL_ENV": "/venv", "A": "1"}


def test_env_clear_sends_only_the_explicit_env_plus_the_callers_lang():
    caller = {"LANG": "de_DE.UTF-8", "HOME": "/root", "PATH": "/bin"}
    assert client.spec_values(["true"], env={"A": "1"}, env_clear=True, caller_environ=caller)["env"] == \
        {"A": "1", "LANG": "de_DE.UTF-8"}
    assert client.spec_values(["true"], env={"LANG": "C"}, env_clear=True,
                              caller_environ=caller)["env"] == {"LANG": "C"}
    assert "env" not in client.spec_values(["true"], env_clear=True, caller_environ={"HOME": "/root"})


@pytest.mark.parametrize("argv, options, needle", [
    ("python train.py", {}, r"argv \(the command\): expected a list of strings \(as\), not a single string"),
    (["a\0b"], {}, "NUL"),
    (["\udcff"], {}, "not valid UTF-8"),
    (["true"], {"env": {"A": 1}}, r"env \(--env\): expected a string \(s\), not 1"),
    (["true"], {"env": ["A=1"]}, r"env \(--env\): expected a map of strings"),
    (["true"], {"timeout_s": "1h"}, r"timeout_s \(--timeout\): expected a number of seconds \(d\)"),
    (["true"], {"name": 7}, r"name \(--name\): expected a string"),
    (["true"], {"gpu_count": 2}, r"unknown keyword 'gpu_count'; known: argv, cwd, env"),
    (["true"], {"timeout": 60}, r"unknown keyword 'timeout' \(did you mean 'timeout_s'\?\)"),
])
def test_what_cannot_be_sent_is_refused_before_any_call(argv, options, needle):
    with pytest.raises(errors.InvalidArgument, match=needle):
        client.spec_values(argv, caller_environ={}, **options)


def test_every_value_that_cannot_be_sent_is_named_at_once():
    with pytest.raises(errors.InvalidArgument) as caught:
        client.spec_values(["true"], caller_environ={}, max_runs=-1, background="yes", bind_to="4")
    message = str(caught.value)
    assert "max_runs (--max-runs): expected a whole number from 0 to 4294967295 (u), not -1" in message
    assert "background (--background): expected True or False (b), not 'yes'" in message
    assert "bind_to (--bind-to): expected a whole number from 0 to 18446744073709551615 (t)" in message


@pytest.mark.parametrize("argv, options", [
    ([], {}),
    ([""], {}),
    (["true"], {"env": {"A=B": "1"}}),
    (["true"], {"name": "x" * (api.MAX_NAME_LENGTH + 1)}),
    (["true"], {"timeout_s": 0}),
    (["true"], {"timeout_s": -5}),
    (["x"] * (api.MAX_ARGV_ITEMS + 1), {}),
    (["true"], {"background": True, "max_runs": 0}),
    (["true"], {"background": True, "restart_delay_s": -1}),
    (["true"], {"max_runs": 5}),
    (["true"], {"gpu_check": "later"}),
])
def test_what_only_the_daemon_can_judge_is_sent_for_it_to_judge(argv, options):
    """Validation happens once, in the daemon: the client encodes these values unjudged."""
    sent = client.spec_values(argv, caller_environ={}, **options)
    assert sent["argv"] == argv
    assert all(sent[key] == value for key, value in options.items())


def test_spec_with_loop_options_has_the_contract_types():
    spec = client.build_spec(["python", "eval.py"], cwd="/srv", background=True, max_runs=5,
                             restart_delay_s=0, stop_on_failure=True, bind_to=4, caller_environ={})
    assert set(spec) == {"argv", "cwd", "background", "max_runs", "restart_delay_s",
                         "stop_on_failure", "bind_to"}
    assert all(signature == api.SPEC_FIELDS[key] for key, (signature, _value) in spec.items())
    assert on_the_wire("a{sv}", spec) == {
        "argv": ["python", "eval.py"], "cwd": "/srv", "background": True, "max_runs": 5,
        "restart_delay_s": 0.0, "stop_on_failure": True, "bind_to": 4}


def test_spec_sends_only_the_loop_options_that_are_set():
    assert set(client.spec_values(["x"], background=False, stop_on_failure=False, caller_environ={})) == \
        {"argv", "cwd"}
    assert set(client.spec_values(["x"], background=True, caller_environ={})) == \
        {"argv", "cwd", "background"}  # max_runs and restart_delay_s: the server's defaults
    assert client.spec_values(["x"], bind_to=0, caller_environ={})["bind_to"] == 0
    assert client.spec_values(["x"], max_runs=1, caller_environ={})["max_runs"] == 1  # as gpujobd allows


def test_filter_sends_only_what_is_given():
    assert client.build_filter() == {}
    query = client.build_filter(all=True, user="bob", state="running", limit=10, after_id=4)
    assert {key: signature for key, (signature, _value) in query.items()} == dict(api.FILTER_FIELDS)
    assert on_the_wire("a{sv}", query) == {"all": True, "user": "bob", "state": "running",
                                                     "limit": 10, "after_id": 4}
    with pytest.raises(errors.InvalidArgument, match="unknown state 'sleeping'"):
        client.build_filter(state="sleeping")
    with pytest.raises(errors.InvalidArgument, match="limit"):
        client.build_filter(limit=0)


# --- calls, against a fake connection ---------------------------------------------------------------


def wire_job(job_id: int, state: str, **fields: Any) -> Dict[str, Any]:
    job = {"id": job_id, "name": "", "user": "alice", "uid": 1000, "state": state,
           "unit": f"gpujob-{job_id}.scope", "argv": ["true"], "cwd": "/", "env": {}, "properties": {},
           "created_at": 1700000000.0}
    job.update(fields)
    return job


def variant_job(job: Dict[str, Any]) -> Dict[str, Tuple[str, Any]]:
    return {key: (api.JOB_FIELDS[key], value) for key, value in job.items()}


class FakeTransport:
    """Answers calls like gpujobd would, with plain values as the jeepney transport returns them;
    records calls, subscriptions and signals in `events`. Signals queued with `emit_later` are
    delivered, in order, by the next `sleep` of a `watch`, and wake it as the real transport decides
    (`transport.wakes`)."""

    def __init__(self) -> None:
        self.call_timeout_s = 30.0
        self.jobs: Dict[int, Dict[str, Any]] = {}
        self.log = b""
        self.log_ended = False
        self.events: List[Tuple[Any, ...]] = []
        self.pending: List[Tuple[str, Tuple[Any, ...], Callable[[], None]]] = []
        self.on_get: Optional[Callable[[int], None]] = None
        self.raise_on_call: Optional[BaseException] = None
        self.submit_errors: Dict[int, errors.GpujobdError] = {}  # Submit call number (1-based) -> raised
        self.stop_error: Optional[errors.GpujobdError] = None
        self.validate_error: Optional[errors.GpujobdError] = None
        self.runs: Dict[int, List[Dict[str, Any]]] = {}
        self.submits = 0
        self.away = False  # the daemon's name has no owner: every call is Unavailable
        self.bus_down = False  # nothing can be subscribed to either

    def call(self, method: str, signature: Optional[str], args: Tuple[Any, ...], reply_type: str) -> Any:
        plain_args = on_the_wire(signature, args) if signature else ()
        self.events.append(("call", method, signature, plain_args, int(self.call_timeout_s * 1000)))
        if isinstance(self.raise_on_call, TimeoutError):
            raise transport.error_from_os(self.raise_on_call, method, self.call_timeout_s)
        if self.away:
            raise dbus_error("org.freedesktop.DBus.Error.ServiceUnknown", "org.gpujobd1 is not owned")
        reply = getattr(self, "_" + method)(*plain_args)
        return on_the_wire(reply_type, reply)

    def read_log(self, job_id: int, offset: int, max_bytes: int) -> Tuple[bytes, int, bool]:
        return self.call("ReadLog", "(ttu)", (job_id, offset, max_bytes), "(aytb)")

    @contextlib.contextmanager
    def watch(self, job_id: Optional[int]) -> Any:
        if self.bus_down:
            raise transport.error_from_os(ConnectionRefusedError("no bus"), "subscribing")
        if job_id is not None:
            self.events.append(("subscribe", "JobChanged"))
        self.events.append(("subscribe", "NameOwnerChanged"))

        def sleep(seconds: float) -> None:
            while self.pending:
                member, body, before = self.pending.pop(0)
                self.events.append(("emit", member))
                before()
                if transport.wakes(member, body, job_id):
                    return
            time.sleep(seconds)

        try:
            yield sleep
        finally:
            if job_id is not None:
                self.events.append(("unsubscribe", "JobChanged"))
            self.events.append(("unsubscribe", "NameOwnerChanged"))

    def emit_later(self, member: str, body: Tuple[Any, ...], before: Callable[[], None] = lambda: None,
                   ) -> None:
        self.pending.append((member, body, before))

    def _Submit(self, spec: Dict[str, Any]) -> Tuple[Any, ...]:
        self.submits += 1
        if self.submits in self.submit_errors:
            raise self.submit_errors[self.submits]
        job = wire_job(len(self.jobs) + 1, "running", started_at=1700000001.5,
                       **{key: value for key, value in spec.items() if key in api.JOB_FIELDS})
        if spec.get("background"):
            job.setdefault("max_runs", 10)
            job.update(runs=0)
        self.jobs[job["id"]] = job
        return (variant_job(job),)

    def _Validate(self, spec: Dict[str, Any]) -> Tuple[Any, ...]:
        if self.validate_error is not None:
            raise self.validate_error
        return ()

    def _Runs(self, job_id: int, limit: int) -> Tuple[Any, ...]:
        runs = self.runs.get(job_id, [])
        runs = runs[-limit:] if limit else runs
        return ([{key: (api.RUN_FIELDS[key], value) for key, value in run.items()} for run in runs],)

    def _Get(self, job_id: int) -> Tuple[Any, ...]:
        if self.on_get is not None:
            self.on_get(job_id)
        if job_id not in self.jobs:
            raise dbus_error("org.gpujobd1.Error.NotFound", f"no job {job_id}")
        return (variant_job(self.jobs[job_id]),)

    def _Stop(self, job_id: int) -> Tuple[Any, ...]:
        if self.stop_error is not None:
            raise self.stop_error
        return (api.STOP_STOPPING,)

    def _List(self, query: Dict[str, Any]) -> Tuple[Any, ...]:
        """As the daemon pages: ids above after_id, at most `limit` (capped at LIST_PAGE_MAX)."""
        limit = min(query.get("limit") or api.LIST_PAGE_MAX, api.LIST_PAGE_MAX)
        ids = sorted(i for i in self.jobs if i > query.get("after_id", -1))
        chosen = ids[:limit] if "after_id" in query else ids[-limit:]
        return ([variant_job(self.jobs[i]) for i in chosen],)

    def _ReadLog(self, job_id: int, offset: int, max_bytes: int) -> Tuple[Any, ...]:
        data = self.log[offset:offset + max_bytes]
        return (data, offset + len(data), self.log_ended)


@pytest.fixture
def bus() -> FakeTransport:
    return FakeTransport()


def test_submit_sends_the_spec_and_returns_json_shaped_jobs(bus, monkeypatch):
    monkeypatch.setattr(os, "environ", {"LANG": "C.UTF-8", "DISPLAY": ":0"})
    gpujobd = client.Client(transport=bus, call_timeout_s=7)
    job = gpujobd.submit(["python", "-c", "1"], cwd="/srv", env={"A": "1"}, timeout_s=5)
    _, method, signature, (spec,), timeout_ms = bus.events[0]
    assert (method, signature, timeout_ms) == ("Submit", "(a{sv})", 7000)
    assert spec == {"argv": ["python", "-c", "1"], "cwd": "/srv", "env": {"A": "1", "LANG": "C.UTF-8"},
                    "timeout_s": 5.0}
    assert list(job) == list(api.JSON_FIELDS)
    assert job["started_at"] == "2023-11-14T22:13:21.500Z"
    assert job["exit_code"] is None
    assert gpujobd.get(1, raw=True)["started_at"] == 1700000001.5


def test_get_stop_list_send_the_contract_signatures(bus):
    bus.jobs[3] = wire_job(3, "running")
    gpujobd = client.Client(transport=bus)
    assert gpujobd.get(3)["id"] == 3
    assert gpujobd.stop(3) == api.STOP_STOPPING
    assert [job["id"] for job in gpujobd.list(all=True, state="running")] == [3]
    signatures = [(event[1], event[2], event[3]) for event in bus.events]
    assert signatures == [("Get", "(t)", (3,)), ("Stop", "(t)", (3,)),  # list() pages from the oldest
                          ("List", "(a{sv})", ({"all": True, "state": "running", "limit": api.LIST_PAGE_MAX,
                                                "after_id": 0},))]


def test_list_pages_through_a_long_history_and_stops_when_the_reader_does(bus):
    for job_id in range(1, 2 * api.LIST_PAGE_MAX + 6):
        bus.jobs[job_id] = wire_job(job_id, "succeeded")
    gpujobd = client.Client(transport=bus)
    assert [job["id"] for job in gpujobd.list(all=True)] == list(range(1, 2 * api.LIST_PAGE_MAX + 6))
    asked = [event[3][0].get("after_id") for event in bus.events if event[1] == "List"]
    assert asked == [0, api.LIST_PAGE_MAX, 2 * api.LIST_PAGE_MAX]
    bus.events.clear()
    first_page = next(gpujobd.pages(all=True))
    assert len(first_page) == api.LIST_PAGE_MAX
    assert len([event for event in bus.events if event[1] == "List"]) == 1  # no more asked for
    assert [job["id"] for job in gpujobd.list(all=True, limit=3)] == [2 * api.LIST_PAGE_MAX + 3,
                                                                     2 * api.LIST_PAGE_MAX + 4,
                                                                     2 * api.LIST_PAGE_MAX + 5]


def test_submit_sends_the_loop_options(bus):
    bus.jobs[1] = wire_job(1, "running")
    job = client.Client(transport=bus).submit(["./eval.sh"], cwd="/srv", background=True, max_runs=3,
                                        restart_delay_s=1.5, bind_to=1)
    (spec,) = bus.events[0][3]
    assert {key: spec[key] for key in ("background", "max_runs", "restart_delay_s", "bind_to")} == \
        {"background": True, "max_runs": 3, "restart_delay_s": 1.5, "bind_to": 1}
    assert "stop_on_failure" not in spec
    assert (job["background"], job["max_runs"], job["bind_to"], job["runs"]) == (True, 3, 1, 0)


def test_unsendable_options_are_refused_before_any_call(bus):
    with pytest.raises(errors.InvalidArgument, match="max_runs"):
        client.Client(transport=bus).submit(["./eval.sh"], background=True, max_runs=-3)
    with pytest.raises(errors.InvalidArgument, match="unknown keyword 'maxruns'"):
        client.Client(transport=bus).submit(["./eval.sh"], maxruns=3)
    assert bus.events == []


RUNS = [
    {"run": 1, "started_at": 1700000000.0, "ended_at": 1700000012.25, "exit_code": 0,
     "reason": "exit-code", "detail": ""},
    {"run": 2, "started_at": 1700000014.0, "ended_at": 1700000015.0, "signal": 9, "reason": "signal",
     "detail": "killed by SIGKILL"},
    {"run": 3, "started_at": 1700000017.0, "ended_at": 1700000017.5, "reason": "exec-failed",
     "detail": "No such file or directory"},
]


def test_runs_returns_json_shaped_runs_oldest_first(bus):
    bus.runs[7] = RUNS
    runs = client.Client(transport=bus).runs(7)
    assert bus.events[0][1:4] == ("Runs", "(tu)", (7, 0))
    assert [run["run"] for run in runs] == [1, 2, 3]
    assert all(list(run) == list(api.RUN_FIELDS) for run in runs)
    assert runs[0] == {"run": 1, "started_at": "2023-11-14T22:13:20.000Z",
                       "ended_at": "2023-11-14T22:13:32.250Z", "exit_code": 0, "signal": None,
                       "reason": "exit-code", "detail": ""}
    assert (runs[1]["signal"], runs[1]["exit_code"]) == (9, None)


def test_runs_limit_keeps_the_last_ones_and_raw_keeps_the_wire_dicts(bus):
    bus.runs[7] = RUNS
    runs = client.Client(transport=bus).runs(7, limit=2, raw=True)
    assert bus.events[0][3] == (7, 2)
    assert runs == RUNS[1:]


@pytest.mark.parametrize("limit", [-1, 1 << 32, True, 2.0])
def test_bad_runs_limits_are_refused_before_any_call(bus, limit):
    with pytest.raises(errors.InvalidArgument, match="runs limit"):
        client.Client(transport=bus).runs(7, limit)
    assert bus.events == []


def test_submit_with_background_submits_the_pair(bus, monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    foreground, background = client.Client(transport=bus).submit_with_background(
        ["python", "train.py"], ["python", "eval.py"], cwd="/srv", env={"A": "1"}, name="exp1",
        timeout_s=3600, properties={"MemoryMax": "8G"}, max_runs=50, restart_delay_s=0,
        stop_on_failure=True)
    checked, *sent = [event[3][0] for event in bus.events]
    assert [event[1] for event in bus.events] == ["Validate", "Submit", "Submit"]
    loop = {"argv": ["python", "eval.py"], "cwd": "/srv", "env": {"A": "1"}, "name": "exp1-bg",
            "properties": {"MemoryMax": "8G"}, "background": True, "max_runs": 50,
            "restart_delay_s": 0.0, "stop_on_failure": True}
    assert checked == loop  # the daemon judged the loop before the foreground started
    assert sent[0] == {"argv": ["python", "train.py"], "cwd": "/srv", "env": {"A": "1"}, "name": "exp1",
                       "properties": {"MemoryMax": "8G"}, "timeout_s": 3600.0}
    assert sent[1] == dict(loop, bind_to=1)
    assert list(foreground) == list(background) == list(api.JSON_FIELDS)
    assert (foreground["id"], background["id"], background["bind_to"]) == (1, 2, 1)
    assert foreground["background"] is False and background["background"] is True  # left out: its default


def test_submit_with_background_without_a_name_or_loop_options(bus):
    pair = client.Client(transport=bus).submit_with_background(["./train.sh"], ["./eval.sh"], raw=True)
    sent = bus.events[2][3][0]
    assert "name" not in sent and "max_runs" not in sent and "restart_delay_s" not in sent
    assert (sent["background"], sent["bind_to"]) == (True, 1)
    assert pair[0]["created_at"] == 1700000000.0  # raw: the wire dicts


def test_submit_with_background_starts_nothing_when_the_daemon_refuses_the_loop(bus):
    bus.validate_error = dbus_error("org.gpujobd1.Error.InvalidArgument", "max_runs (--max-runs) "
                                    "is 5000: give 1 to this server's limit of 1000 (jobs.max_runs_limit)")
    with pytest.raises(errors.InvalidArgument, match=r"max_runs \(--max-runs\) is 5000"):
        client.Client(transport=bus).submit_with_background(["./train.sh"], ["./eval.sh"], max_runs=5000)
    assert [event[1] for event in bus.events] == ["Validate"]  # no foreground was started


def test_submit_with_background_stops_the_foreground_when_the_loop_is_refused(bus):
    # Validate passed, but the loop's Submit is refused (its bound-to job already ended, say).
    bus.submit_errors[2] = dbus_error("org.gpujobd1.Error.InvalidArgument", "bind_to (--bind-to) "
                                      "1: that job is succeeded")
    with pytest.raises(errors.InvalidArgument, match=r"that job is succeeded") as raised:
        client.Client(transport=bus).submit_with_background(["./train.sh"], ["./eval.sh"])
    assert "failed too" not in str(raised.value)
    assert [event[1:4] for event in bus.events][2:] == [
        ("Submit", "(a{sv})", bus.events[2][3]), ("Stop", "(t)", (1,))]


def test_submit_with_background_stops_the_foreground_when_interrupted(bus, monkeypatch):
    gpujobd = client.Client(transport=bus)
    real_submit = gpujobd.submit

    def interrupted_second(argv: Any, **options: Any) -> Dict[str, Any]:
        if options.get("background"):
            raise KeyboardInterrupt
        return real_submit(argv, **options)

    monkeypatch.setattr(gpujobd, "submit", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        gpujobd.submit_with_background(["./train.sh"], ["./eval.sh"])
    assert [event[1:4] for event in bus.events][-1] == ("Stop", "(t)", (1,))


def test_submit_with_background_says_when_the_foreground_could_not_be_stopped(bus):
    bus.submit_errors[2] = dbus_error("org.gpujobd1.Error.PermissionDenied", "no")
    bus.stop_error = dbus_error("org.freedesktop.DBus.Error.NoReply", "gone", "Stop")
    with pytest.raises(errors.PermissionDenied) as raised:
        client.Client(transport=bus, call_timeout_s=1).submit_with_background(["./train.sh"], ["./eval.sh"])
    message = str(raised.value)
    assert message.startswith("no; stopping the foreground job 1 failed too (gpujobd did not answer Stop")
    assert message.endswith("stop it with `gpujobctl stop 1`")


@pytest.mark.parametrize("background_argv, options, needle", [
    (["./eval.sh"], {"max_runs": -1}, "max_runs"),
    (["./eval.sh"], {"restart_delay_s": "soon"}, "restart_delay_s"),
    ("./eval.sh --all", {}, "not a single string"),
    (["./eval.sh"], {"bind_to": 3}, "bind_to: set by submit_with_background itself"),
    (["./eval.sh"], {"background": True}, "background: set by submit_with_background itself"),
    (["./eval.sh"], {"max_run": 3}, "unknown keyword 'max_run'"),
])
def test_submit_with_background_refuses_what_cannot_be_sent_before_submitting_anything(
        bus, background_argv, options, needle):
    with pytest.raises(errors.InvalidArgument, match=needle):
        client.Client(transport=bus).submit_with_background(["./train.sh"], background_argv, **options)
    assert bus.events == []


def test_submit_with_background_sends_gpu_check_to_both_jobs(bus):
    client.Client(transport=bus).submit_with_background(["./train.sh"], ["./eval.sh"], gpu_check="wait",
                                                  timeout_s=60)
    foreground, loop = (event[3][0] for event in bus.events if event[1] == "Submit")
    assert foreground["gpu_check"] == loop["gpu_check"] == "wait"
    assert foreground["timeout_s"] == 60.0 and "timeout_s" not in loop


def test_remote_errors_are_raised_as_gpujobd_errors(bus):
    with pytest.raises(errors.NotFound, match="no job 9"):
        client.Client(transport=bus).get(9)
    bus.raise_on_call = TimeoutError()
    with pytest.raises(errors.Unavailable, match="did not answer Get within 2s"):
        client.Client(transport=bus, call_timeout_s=2).get(1)


def test_bad_ids_are_refused_before_any_call(bus):
    for bad in (-1, True, "5", 1 << 64):
        with pytest.raises(errors.InvalidArgument):
            client.Client(transport=bus).get(bad)
    assert bus.events == []


def test_read_log_returns_bytes(bus):
    bus.log = b"\x00binary\xffdata"
    data, next_offset, ended = client.Client(transport=bus).read_log(1, 1, 6)
    assert (data, next_offset, ended) == (b"binary", 7, False)
    assert bus.events[0][1:4] == ("ReadLog", "(ttu)", (1, 1, 6))


def test_logs_without_follow_reads_to_the_current_end(bus):
    bus.log = b"x" * 2500
    chunks = list(client.Client(transport=bus).logs(1))
    assert b"".join(chunks) == bus.log
    assert [event[3][1] for event in bus.events] == [0, 2500]


def test_logs_follow_confirms_the_end_with_one_more_read(bus):
    bus.log, bus.log_ended = b"all of it\n", True
    assert b"".join(client.Client(transport=bus, follow_poll_interval_s=0).logs(1, follow=True)) == bus.log
    assert [event[3][1] for event in bus.events] == [0, 10]


def test_wait_subscribes_before_the_first_get_and_wakes_on_the_signal(bus):
    bus.jobs[4] = wire_job(4, "running", started_at=1.0)
    gets = []

    def end(job_id: int = 4) -> None:
        bus.jobs[4] = wire_job(4, "failed", started_at=1.0, ended_at=2.0, exit_code=3)

    def end_after_the_first_get(job_id: int) -> None:
        gets.append(job_id)
        if len(gets) == 1:  # the job ends once the first Get was answered
            bus.emit_later("JobChanged", (4, "failed"), before=end)

    bus.on_get = end_after_the_first_get
    started = time.monotonic()
    job = client.Client(transport=bus).wait(4, timeout_s=10)
    assert time.monotonic() - started < 5  # the signal, not the resync timer, woke it
    assert (job["state"], job["exit_code"]) == ("failed", 3)
    kinds = [event[:2] for event in bus.events]
    assert kinds == [("subscribe", "JobChanged"), ("subscribe", "NameOwnerChanged"), ("call", "Get"),
                     ("emit", "JobChanged"), ("call", "Get"),
                     ("unsubscribe", "JobChanged"), ("unsubscribe", "NameOwnerChanged")]


def test_wait_returns_at_once_for_an_ended_job(bus):
    bus.jobs[4] = wire_job(4, "succeeded", exit_code=0, ended_at=2.0)
    assert client.Client(transport=bus).wait(4, raw=True)["state"] == "succeeded"
    assert [event[:2] for event in bus.events if event[0] == "call"] == [("call", "Get")]


def test_wait_ignores_other_jobs_and_non_final_states(bus):
    bus.jobs[4] = wire_job(4, "running")

    def signal_others(job_id: int) -> None:
        bus.on_get = None
        bus.emit_later("JobChanged", (5, "succeeded"))
        bus.emit_later("JobChanged", (4, "stopping"))

    bus.on_get = signal_others
    with pytest.raises(client.WaitTimedOut, match="job 4: it is still running"):
        client.Client(transport=bus).wait(4, timeout_s=0.2)
    assert [event[1] for event in bus.events if event[0] in ("call", "emit")] == \
        ["Get", "JobChanged", "JobChanged", "Get"]  # woken only by the timeout
    assert [event for event in bus.events if event[0] == "unsubscribe"]


def test_wait_wakes_when_the_daemon_comes_back(bus):
    bus.jobs[4] = wire_job(4, "running")

    def restart(job_id: int) -> None:
        bus.on_get = None
        bus.emit_later("NameOwnerChanged", (api.BUS_NAME, ":1.5", ""),
                       before=lambda: bus.jobs.update({4: wire_job(4, "lost", ended_at=2.0)}))
        bus.emit_later("NameOwnerChanged", (api.BUS_NAME, "", ":1.9"))

    bus.on_get = restart
    assert client.Client(transport=bus).wait(4, timeout_s=10)["state"] == "lost"
    assert [event[1] for event in bus.events if event[0] in ("call", "emit")] == \
        ["Get", "NameOwnerChanged", "NameOwnerChanged", "Get"]


def test_wait_timeout_is_a_gpujobd_error(bus):
    bus.jobs[4] = wire_job(4, "running")
    with pytest.raises(errors.GpujobdError, match=r"timed out after 0\.1s waiting for job 4"):
        client.Client(transport=bus).wait(4, timeout_s=0.1)


def test_unreachable_bus_address_is_unavailable():
    gpujobd = client.Client(bus="unix:path=/nonexistent/gpujobd-test-bus")
    with pytest.raises(errors.Unavailable, match="gpujobd is not running or the system bus is unreachable"):
        gpujobd.get(1)


def test_every_option_value_of_a_spec_serialises_with_jeepney() -> None:
    """Dependencies given as tuples (as the CLI parses them) reach the wire as arrays: jeepney takes
    only lists for `at` (a tuple once failed with "Not suitable for array")."""
    from jeepney import new_method_call

    from gpujobd.client import outgoing

    wire = outgoing.spec_wire(["true"], cwd="/", after=(1, 2), after_any=[3], gpus=1, priority=-1,
                              env={"A": "1"}, properties={"MemoryMax": "1G"})
    message = new_method_call(transport._SERVICE, "Submit", "a{sv}", (wire,))
    assert message.serialise(serial=1)  # raises TypeError for a value jeepney cannot put on the wire
    assert wire["after"] == ("at", [1, 2]) and wire["after_any"] == ("at", [3])


def test_wait_reads_the_job_again_every_resync_interval_without_a_signal(bus):
    bus.jobs[4] = wire_job(4, "running")
    gets = []

    def end_at_the_third_get(job_id: int) -> None:
        gets.append(job_id)
        if len(gets) == 3:
            bus.jobs[4] = wire_job(4, "succeeded", exit_code=0)
    bus.on_get = end_at_the_third_get
    # No signal ever comes: only the resync reads can see the end (the default, 60 s, outlasts the
    # 5 s timeout, and the wait would fail).
    waited = client.Client(transport=bus, wait_resync_interval_s=0.01).wait(4, timeout_s=5)
    assert waited["state"] == "succeeded" and gets == [4, 4, 4]


# --- riding out a daemon restart: woken by the bus name's new owner, not by a poll -----------------------


def _no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    def polled(seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s instead of waiting for the daemon's name")
    monkeypatch.setattr(time, "sleep", polled)


def test_logs_follow_rides_out_a_restart_woken_by_the_daemons_name(bus, monkeypatch):
    bus.log, bus.log_ended, bus.away = b"all of it\n", True, True
    bus.emit_later("NameOwnerChanged", (api.BUS_NAME, "", ":1.9"), before=lambda: setattr(bus, "away", False))
    _no_polling(monkeypatch)
    assert b"".join(client.Client(transport=bus).logs(1, follow=True)) == bus.log
    assert [event[:2] for event in bus.events] == [
        ("call", "ReadLog"), ("subscribe", "NameOwnerChanged"),
        ("call", "ReadLog"),  # once more at once: a restart before the subscription sent nothing to it
        ("emit", "NameOwnerChanged"), ("call", "ReadLog"), ("unsubscribe", "NameOwnerChanged"),
        ("call", "ReadLog")]  # the end confirmed


def test_wait_rides_out_a_restart_on_its_own_subscription(bus, monkeypatch):
    bus.jobs[4] = wire_job(4, "running")
    bus.away = True
    bus.emit_later("NameOwnerChanged", (api.BUS_NAME, "", ":1.9"),
                   before=lambda: (setattr(bus, "away", False), bus.jobs.update({4: wire_job(4, "lost")})))
    _no_polling(monkeypatch)
    assert client.Client(transport=bus).wait(4, timeout_s=10)["state"] == "lost"
    assert [event for event in bus.events if event[0] == "subscribe"] == [
        ("subscribe", "JobChanged"), ("subscribe", "NameOwnerChanged")], "no second subscription"


def test_without_a_bus_to_subscribe_on_a_restart_is_polled(bus, monkeypatch):
    bus.log, bus.log_ended, bus.away, bus.bus_down = b"x\n", True, True, True
    slept = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        bus.away = False
    monkeypatch.setattr(time, "sleep", sleep)
    assert b"".join(client.Client(transport=bus, follow_poll_interval_s=0.3).logs(1, follow=True)) == bus.log
    assert slept == [0.3]


def test_a_daemon_away_past_the_grace_is_unavailable(bus, monkeypatch):
    bus.away = True
    _no_polling(monkeypatch)
    with pytest.raises(errors.Unavailable, match="gpujobd is not running"):
        list(client.Client(transport=bus, restart_grace_s=0).logs(1, follow=True))
