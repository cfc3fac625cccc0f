"""The D-Bus contract, version 1: names, introspection XML and the a{sv} encoding of jobs.

Changing anything here changes the wire protocol; tests/unit/test_api.py freezes the XML, so such a
change is a deliberate diff. Pure data: no D-Bus library is imported here (the service and the client
turn (signature, value) pairs into their library's variants).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from gpujobd.shared import spec
from gpujobd.shared.states import JobState

if TYPE_CHECKING:  # the daemon encodes Job records; the client and gpujobctl never build one
    from gpujobd.shared.model import Job

BUS_NAME = "org.gpujobd1"
OBJECT_PATH = "/org/gpujobd1"
INTERFACE = "org.gpujobd1.Manager"

# Limits on what one call may carry; larger input is refused with InvalidArgument before any work.
# A submission's limits are declared with its options, in gpujobd.shared.spec.
MAX_ARGV_ITEMS = spec.MAX_ARGV_ITEMS
MAX_ARG_BYTES = spec.MAX_ARG_BYTES
MAX_ENV_ITEMS = spec.MAX_ENV_ITEMS
MAX_NAME_LENGTH = spec.MAX_NAME_LENGTH
MAX_LIST_LIMIT = 100_000
LIST_PAGE_MAX = 1000  # jobs in one List reply; clients page with `after_id` for more
# Bytes of one List reply: far below dbus-daemon's message limit (32 MiB by default) whatever is
# stored; a page ends early when the next job would pass it (a client pages on until a page is empty).
LIST_REPLY_MAX_BYTES = 8 << 20
# One job's entry: larger entries (rows stored under larger bounds) are shown clipped.
LIST_ENTRY_MAX_BYTES = 2 << 20
CLIPPED_STRING_CHARS = 4096
# A page cut by bytes weighs more than LIST_REPLY_MAX_BYTES - LIST_ENTRY_MAX_BYTES (6 MiB) on the wire;
# of that, at most ~2 KiB per entry (2 MiB for a full page) is framing, and a character is at most 4
# bytes: such a page holds more than 1 MiB of characters. A client reading fewer may stop there.
LIST_CUT_MIN_CHARS = 1 << 20
CLIPPED_MARK = "...[clipped]"

INTROSPECTION_XML = f"""<node>
  <interface name="{INTERFACE}">
    <method name="Submit">
      <arg name="spec" type="a{{sv}}" direction="in"/>
      <arg name="job" type="a{{sv}}" direction="out"/>
    </method>
    <method name="Validate">
      <arg name="spec" type="a{{sv}}" direction="in"/>
    </method>
    <method name="Stop">
      <arg name="id" type="t" direction="in"/>
      <arg name="result" type="s" direction="out"/>
    </method>
    <method name="Prune">
      <arg name="older_than_days" type="u" direction="in"/>
      <arg name="pruned" type="u" direction="out"/>
    </method>
    <method name="Get">
      <arg name="id" type="t" direction="in"/>
      <arg name="job" type="a{{sv}}" direction="out"/>
    </method>
    <method name="List">
      <arg name="filter" type="a{{sv}}" direction="in"/>
      <arg name="jobs" type="aa{{sv}}" direction="out"/>
    </method>
    <method name="Runs">
      <arg name="id" type="t" direction="in"/>
      <arg name="limit" type="u" direction="in"/>
      <arg name="runs" type="aa{{sv}}" direction="out"/>
    </method>
    <method name="ReadLog">
      <arg name="id" type="t" direction="in"/>
      <arg name="offset" type="t" direction="in"/>
      <arg name="max_bytes" type="u" direction="in"/>
      <arg name="data" type="ay" direction="out"/>
      <arg name="next_offset" type="t" direction="out"/>
      <arg name="job_ended" type="b" direction="out"/>
    </method>
    <method name="SubmitAll">
      <arg name="spec" type="a{{sv}}" direction="in"/>
      <arg name="ids" type="at" direction="out"/>
    </method>
    <method name="Resubmit">
      <arg name="id" type="t" direction="in"/>
      <arg name="with_dependents" type="b" direction="in"/>
      <arg name="ids" type="at" direction="out"/>
    </method>
    <method name="Drain">
    </method>
    <method name="Undrain">
    </method>
    <method name="Gpus">
      <arg name="report" type="a{{sv}}" direction="out"/>
    </method>
    <signal name="JobChanged">
      <arg name="id" type="t"/>
      <arg name="state" type="s"/>
    </signal>
    <signal name="StrayFound">
      <arg name="stray" type="a{{sv}}"/>
    </signal>
    <signal name="StrayCleared">
      <arg name="stray" type="a{{sv}}"/>
    </signal>
    <property name="Version" type="s" access="read"/>
  </interface>
</node>"""

# Stop results.
STOP_STOPPING = "stopping"
STOP_ALREADY_ENDED = "already-ended"

# Submit spec keys and their D-Bus types: what a client may send. Each is declared, with its default,
# rules and CLI flag, in gpujobd.shared.spec.
SPEC_FIELDS: Mapping[str, str] = spec.SIGNATURES

# What a job may ask for when a stray GPU process holds one of its GPUs at submit (see docs/gpu.md).
GPU_CHECKS = spec.GPU_CHECKS

# Per-run records (the Runs method), newest last.
RUN_FIELDS: Mapping[str, str] = {
    "run": "u",
    "started_at": "d",
    "ended_at": "d",
    "exit_code": "i",
    "signal": "i",
    "reason": "s",
    "detail": "s",
}

# List filter keys.
FILTER_FIELDS: Mapping[str, str] = {
    "all": "b",  # include ended jobs (default: active ones and those ended in the last hour)
    "user": "s",
    "state": "s",
    "limit": "u",  # at most this many (and never more than LIST_PAGE_MAX): the newest ones
    "after_id": "t",  # page forward instead: the first `limit` jobs with a larger id
}

# Job fields on the wire. Optional values are left out of the dict when unset (D-Bus has no null).
JOB_FIELDS: Mapping[str, str] = {
    "id": "t",
    "name": "s",
    "user": "s",
    "uid": "u",
    "state": "s",
    "unit": "s",
    "argv": "as",
    "cwd": "s",
    "env": "a{ss}",
    "properties": "a{ss}",
    "timeout_s": "d",
    "pid": "u",
    "created_at": "d",
    "started_at": "d",
    "ended_at": "d",
    "elapsed_s": "d",
    "reason": "s",
    "detail": "s",
    "exit_code": "i",
    "signal": "i",
    "leftover_processes": "u",
    "stopped_by": "s",
    "log_path": "s",
    "timeout_fraction": "d",
    "background": "b",
    "max_runs": "u",
    "runs": "u",
    "restart_delay_s": "d",
    "stop_on_failure": "b",
    "bind_to": "t",
    "gpu_memory_bytes": "a{st}",  # live jobs: GPU memory per GPU UUID (`index:N` without one)
    "gpus": "as",  # the allocated GPUs' UUIDs: empty while queued or when none were asked for
    "gpus_requested": "u",  # --gpus N
    "priority": "i",
    "after": "at",
    "after_any": "at",
    "waiting_for": "s",  # queued jobs: what it waits for, one sentence
    "position": "u",  # queued jobs: 1 = the next to start
    "array_id": "t",
    "array_index": "u",
    "array": "s",
    "stagger_s": "d",
    "resubmit_of": "t",
}

# Fields added after v1 that nearly every job has at one value (a job that is no loop, asks for no
# GPU and waits for nothing): left out of the wire at that value, and read as it when absent. Every
# other absent field is unset (null in JSON). An ordinary job's Get reply carries 20 fields, not
# 28, and a client's pure-Python parse of it costs a quarter less (docs/performance.md, Get).
JOB_DEFAULTS: Mapping[str, Any] = {
    "background": False,
    "max_runs": 1,
    "stop_on_failure": False,
    "gpus": [],
    "gpus_requested": 0,
    "priority": 0,
    "after": [],
    "after_any": [],
}


def job_from_wire(wire: Mapping[str, Any]) -> Dict[str, Any]:
    """A job as received (plain values) with every field left out at its default put back, each
    default a fresh object."""
    job = {key: (list(value) if isinstance(value, list) else value) for key, value in JOB_DEFAULTS.items()}
    job.update(wire)
    return job


_NO_DEFAULT = object()


def _at_default(key: str, value: Any) -> bool:
    default = JOB_DEFAULTS.get(key, _NO_DEFAULT)
    return type(value) is type(default) and value == default  # False is no 0, [] is no ()


def encode_job(job: Job, log_path: str = "", gpu_memory: Optional[Mapping[str, int]] = None,
               wait: Optional[Tuple[str, int]] = None) -> Dict[str, Tuple[str, Any]]:
    """Job -> {field: (dbus signature, value)}, leaving out unset optional fields and fields at
    their default (JOB_DEFAULTS)."""
    values: Dict[str, Any] = {
        "id": job.id,
        "name": job.spec.name,
        "user": job.user,
        "uid": job.uid,
        "state": job.state.value,
        "unit": job.unit,
        "argv": list(job.spec.argv),
        "cwd": job.spec.cwd,
        "env": dict(job.spec.env),
        "properties": dict(job.spec.properties),
        "timeout_s": job.spec.timeout_s,
        "pid": job.pid,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "elapsed_s": job.elapsed_s,
        "stopped_by": job.stopped_by,
        "log_path": log_path or None,
        "timeout_fraction": job.timeout_fraction,
        "background": job.spec.background,
        "max_runs": job.spec.max_runs or 1,
        "runs": job.runs_done,
        "restart_delay_s": job.spec.restart_delay_s if job.spec.background else None,
        "stop_on_failure": job.spec.stop_on_failure,
        "bind_to": job.spec.bind_to,
        "gpu_memory_bytes": dict(gpu_memory) if gpu_memory is not None else None,
        "gpus": list(job.gpus),
        "gpus_requested": job.spec.gpus,
        "priority": job.spec.priority,
        "after": list(job.spec.after),
        "after_any": list(job.spec.after_any),
        "waiting_for": wait[0] if wait is not None else None,
        "position": wait[1] if wait is not None else None,
        "array_id": job.array_id,
        "array_index": job.array_index,
        "array": job.spec.array or None,
        "stagger_s": job.spec.stagger_s,
        "resubmit_of": job.resubmit_of,
    }
    if job.outcome is not None:
        values.update(
            reason=job.outcome.reason.value,
            detail=job.outcome.detail,
            exit_code=job.outcome.exit_code,
            signal=job.outcome.signal,
            leftover_processes=job.outcome.leftover_processes,
        )
    return {key: (JOB_FIELDS[key], value) for key, value in values.items()
            if value is not None and not _at_default(key, value)}


def page_may_continue(wires: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a List page may have been cut short (by count or by bytes): then the client asks for
    the next page; otherwise the page was the last one."""
    if len(wires) >= LIST_PAGE_MAX:
        return True
    chars = sum(_chars(value) for wire in wires for value in wire.values())
    return len(wires) > 0 and chars >= LIST_CUT_MIN_CHARS


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_chars(key) + _chars(item) for key, item in value.items())
    return 0


def clipped_job_wire(wire: Mapping[str, Tuple[str, Any]]) -> Dict[str, Tuple[str, Any]]:
    """A job's wire fields with every long string cut to CLIPPED_STRING_CHARS and marked, and lists
    and maps cut to their first entries: an entry that always fits a reply."""
    return {key: (signature, _clipped(value)) for key, (signature, value) in wire.items()}


def _clipped(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= CLIPPED_STRING_CHARS else value[:CLIPPED_STRING_CHARS] + CLIPPED_MARK
    if isinstance(value, list):
        return [_clipped(item) for item in value[:256]]
    if isinstance(value, dict):
        return {_clipped(key): _clipped(item) for key, item in list(value.items())[:256]}
    return value


def iso_utc(timestamp: Optional[float]) -> Optional[str]:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


TIME_FIELDS = ("created_at", "started_at", "ended_at")
JSON_FIELDS: Tuple[str, ...] = (
    "id", "name", "user", "state", "unit", "argv", "cwd", "exit_code", "signal", "reason", "detail",
    "created_at", "started_at", "ended_at", "elapsed_s", "timeout_s", "leftover_processes",
    "stopped_by", "pid", "env", "properties", "log_path", "timeout_fraction", "background", "runs",
    "max_runs", "restart_delay_s", "stop_on_failure", "bind_to", "gpu_memory_bytes", "gpus",
    "gpus_requested", "priority", "after", "after_any", "waiting_for", "position", "array_id",
    "array_index", "array", "stagger_s", "resubmit_of",
)


def encode_run(run: Mapping[str, Any]) -> Dict[str, Tuple[str, Any]]:
    values = {key: run.get(key) for key in RUN_FIELDS}
    if values.get("reason") is not None:
        values["reason"] = getattr(values["reason"], "value", values["reason"])
    return {key: (RUN_FIELDS[key], value) for key, value in values.items() if value is not None}


def run_to_json(wire: Mapping[str, Any]) -> Dict[str, Any]:
    out = {key: wire.get(key) for key in RUN_FIELDS}
    out["started_at"] = iso_utc(out["started_at"])
    out["ended_at"] = iso_utc(out["ended_at"])
    return out


def job_to_json(wire: Mapping[str, Any]) -> Dict[str, Any]:
    """A job as received over D-Bus (plain values) -> the documented JSON object (ISO 8601 UTC)."""
    job = job_from_wire(wire)
    out: Dict[str, Any] = {}
    for key in JSON_FIELDS:
        value = job.get(key)
        out[key] = iso_utc(value) if key in TIME_FIELDS else value
    return out


def is_active(wire: Mapping[str, Any]) -> bool:
    return not JobState(wire["state"]).is_final


def unknown_keys(given: Iterable[str], known: Mapping[str, str]) -> list:
    return sorted(set(given) - set(known))


# --- the GPU report (the Gpus method) and the strays (StrayFound, StrayCleared) ----------------------
# Every value is optional: what NVML or /proc could not tell is left out.

GPU_REPORT_FIELDS: Mapping[str, str] = {
    "state": "s",  # ok, unavailable, hung, starting, disabled
    "available": "b",
    "reason": "s",  # why not available: NVML's own reason, or the call that hung
    "retry_in_s": "d",  # when unavailable: the back-off wait before the next try
    "policy": "s",  # gpu.stray_policy
    "updated_at": "d",  # when the latest good reading was taken
    "driver_version": "s",
    "devices": "aa{sv}",  # GPU_DEVICE_FIELDS
    "strays": "aa{sv}",  # STRAY_FIELDS
}

GPU_DEVICE_FIELDS: Mapping[str, str] = {
    "index": "u",
    "uuid": "s",
    "name": "s",
    "minor": "u",  # the N of /dev/nvidiaN
    "state": "s",  # ok, lost (fell off the bus), error (no handle)
    "memory_total_bytes": "t",
    "memory_used_bytes": "t",
    "utilization_gpu_percent": "u",
    "utilization_memory_percent": "u",
    "errors": "a{ss}",  # field -> why NVML did not give it (NOT_SUPPORTED fields are just absent)
    "processes": "aa{sv}",  # GPU_PROCESS_FIELDS
}

GPU_PROCESS_FIELDS: Mapping[str, str] = {
    "pid": "u",  # as NVML gave it: untrusted
    "type": "s",  # C, G or C+G
    "used_memory_bytes": "t",
    "owner": "s",  # job, unit, stray, unknown
    "job_id": "t",
    "unit": "s",
    "note": "s",
    "user": "s",
    "uid": "u",
    "ppid": "u",
    "command": "as",
    "cgroup": "s",
    "started_at": "d",
    "age_s": "d",
}

STRAY_FIELDS: Mapping[str, str] = {
    "pid": "u",
    "ppid": "u",
    "user": "s",
    "uid": "u",
    "command": "as",
    "cgroup": "s",
    "unit": "s",
    "gpus": "a{st}",  # GPU UUID -> memory used there
    "gpu_indexes": "au",
    "used_memory_bytes": "t",
    "started_at": "d",
    "age_s": "d",
    "first_seen_at": "d",
    "ticks": "u",  # polls in a row it has been seen stray
    "action": "s",  # what the policy does about it, in words
    "note": "s",
    "cleared_because": "s",  # StrayCleared only
}

GPU_TIME_FIELDS = ("updated_at", "started_at", "first_seen_at")
_NESTED = {"devices": GPU_DEVICE_FIELDS, "processes": GPU_PROCESS_FIELDS, "strays": STRAY_FIELDS}


def _encode_table(values: Mapping[str, Any], table: Mapping[str, str]) -> Dict[str, Tuple[str, Any]]:
    """{field: (signature, value)}; a list of records (aa{sv}) holds such dicts in turn."""
    out: Dict[str, Tuple[str, Any]] = {}
    for key, signature in table.items():
        value = values.get(key)
        if value is None:
            continue
        if key in _NESTED:
            value = [_encode_table(item, _NESTED[key]) for item in value]
        out[key] = (signature, value)
    return out


def encode_gpu_report(report: Mapping[str, Any]) -> Dict[str, Tuple[str, Any]]:
    return _encode_table(report, GPU_REPORT_FIELDS)


def encode_stray(stray: Mapping[str, Any]) -> Dict[str, Tuple[str, Any]]:
    return _encode_table(stray, STRAY_FIELDS)


def _table_to_json(wire: Mapping[str, Any], table: Mapping[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in table:
        value = wire.get(key)
        if key in _NESTED:
            value = [_table_to_json(item, _NESTED[key]) for item in (value or [])]
        elif key in GPU_TIME_FIELDS:
            value = iso_utc(value)
        out[key] = value
    return out


def gpu_report_to_json(wire: Mapping[str, Any]) -> Dict[str, Any]:
    """The Gpus report as received (plain values) -> the documented JSON object (docs/gpu.md)."""
    return _table_to_json(wire, GPU_REPORT_FIELDS)


def stray_to_json(wire: Mapping[str, Any]) -> Dict[str, Any]:
    return _table_to_json(wire, STRAY_FIELDS)
