"""The Python client of gpujobd: what users' scripts and `gpujobctl` call.

    from gpujobd.client import Client
    client = Client()
    job = client.submit(["python", "train.py"], name="train", timeout_s=3600)
    for chunk in client.logs(job["id"], follow=True):
        sys.stdout.buffer.write(chunk)
    print(client.wait(job["id"])["state"])

    # A parallel experiment: train in the foreground, evaluate in a loop until training ends.
    train, evaluate = client.submit_with_background(
        ["python", "train.py"], ["python", "eval.py"], name="exp1", timeout_s=3600, max_runs=100)
    print(client.runs(evaluate["id"], limit=5))

Jobs come back as plain dicts shaped like `api.job_to_json` (every `api.JSON_FIELDS` key present, None
where unset, times as ISO 8601 UTC strings); pass `raw=True` for the wire dict instead (only the fields
that are set, those at their default (`api.JOB_DEFAULTS`) put back; times as float seconds since the
epoch). Every failure is a `errors.GpujobdError`.

Modules: `client` (the Client's methods), `outgoing` (what is sent, as plain values; the submit
options come from gpujobd.shared.spec), `transport` (the D-Bus connection, calls, signal wakeups and
error mapping: the only module here that imports a D-Bus library).
"""

from __future__ import annotations

from gpujobd.client.client import (
    DEFAULT_FOLLOW_POLL_INTERVAL_S,
    DEFAULT_READ_BYTES,
    WAIT_RESYNC_INTERVAL_S,
    Client,
    WaitTimedOut,
    is_final,
)
from gpujobd.client.outgoing import spec_values, spec_wire
from gpujobd.client.transport import DEFAULT_CALL_TIMEOUT_S, build_filter, build_spec, error_from_dbus

__all__ = [
    "DEFAULT_CALL_TIMEOUT_S",
    "DEFAULT_FOLLOW_POLL_INTERVAL_S",
    "DEFAULT_READ_BYTES",
    "WAIT_RESYNC_INTERVAL_S",
    "Client",
    "WaitTimedOut",
    "build_filter",
    "build_spec",
    "error_from_dbus",
    "is_final",
    "spec_values",
    "spec_wire",
]
