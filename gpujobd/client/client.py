"""The Client: gpujobd's methods for Python, on top of the transport (gpujobd.client.transport).

Jobs come back as plain dicts shaped like `api.job_to_json`; with `raw=True` as the wire dicts
(`api.job_from_wire`: the fields left out at their default put back).
Every failure is a `errors.GpujobdError`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple, TypeVar

from gpujobd.client import outgoing
from gpujobd.client.transport import DEFAULT_CALL_TIMEOUT_S, Transport
from gpujobd.shared import api, errors, spec
from gpujobd.shared.states import JobState

# The defaults of the [client] keys of gpujobd.shared.config, mirrored so that `import gpujobd.client`
# stays light (the config module costs ~17 ms to import); a unit test keeps them equal.
DEFAULT_FOLLOW_POLL_INTERVAL_S = 0.25  # client.follow_poll_interval_s
DEFAULT_RESTART_GRACE_S = 60.0  # client.restart_grace_s
# While waiting, the job is re-read this often even without a signal: a safety net for a signal that
# never arrives (a daemon restart, a bus that dropped it). One Get a minute costs nothing.
WAIT_RESYNC_INTERVAL_S = 60.0  # client.wait_resync_interval_s
DEFAULT_READ_BYTES = 1 << 20
T = TypeVar("T")
Sleep = Callable[[float], None]  # returns at a wakeup or after the seconds given


class WaitTimedOut(errors.GpujobdError):
    """`Client.wait` gave up: the job is still running (exit code 1, like any failed operation)."""


def is_final(wire: Mapping[str, Any]) -> bool:
    """Whether a job (a wire or JSON dict) is in a final state."""
    return JobState(wire["state"]).is_final


def _job(wire: Mapping[str, Any], raw: bool) -> Dict[str, Any]:
    return api.job_from_wire(wire) if raw else api.job_to_json(wire)


def _run(wire: Mapping[str, Any], raw: bool) -> Dict[str, Any]:
    return dict(wire) if raw else api.run_to_json(wire)


class Client:
    """A connection to gpujobd on the system bus, opened on first use.

    `bus`: None for the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured) or a bus address string such
    as "unix:path=/run/x/bus". One Client may be shared by threads: its calls take turns on one
    connection, and each `wait` listens on one of its own.
    """

    def __init__(
        self,
        bus: Any = None,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        follow_poll_interval_s: float = DEFAULT_FOLLOW_POLL_INTERVAL_S,
        restart_grace_s: float = DEFAULT_RESTART_GRACE_S,
        *,
        wait_resync_interval_s: float = WAIT_RESYNC_INTERVAL_S,
        transport: Any = None,
    ) -> None:
        # `transport`: another object with Transport's methods (a test's fake); `bus` is then unused.
        self._transport = Transport(bus, call_timeout_s) if transport is None else transport
        self._transport.call_timeout_s = float(call_timeout_s)
        self.follow_poll_interval_s = float(follow_poll_interval_s)
        self.restart_grace_s = float(restart_grace_s)
        self.wait_resync_interval_s = float(wait_resync_interval_s)

    def _riding_out_restarts(self, call: Callable[[], T], sleep: Sleep | None = None) -> T:
        """`call()`, tried again while the daemon is away (Unavailable: a restart, a crash and its
        automatic restart), for up to restart_grace_s: each time its bus name gets a new owner.

        `sleep`: a watch's, when the caller holds one (`wait`); else one is opened at the first
        Unavailable, and the call tried once more at once (a restart done meanwhile sent its signal
        before the subscription). A hung daemon, whose name keeps its owner, is tried again at the
        end of the grace."""
        deadline = time.monotonic() + self.restart_grace_s
        try:
            return call()
        except errors.Unavailable:
            if time.monotonic() >= deadline:
                raise
        with contextlib.ExitStack() as stack:
            if sleep is None:
                sleep = self._owner_changes(stack)
            while True:
                try:
                    return call()
                except errors.Unavailable:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise
                try:
                    sleep(remaining)
                except errors.Unavailable:  # the bus itself went away under the subscription
                    sleep = self._polling

    def _owner_changes(self, stack: contextlib.ExitStack) -> Sleep:
        """A sleep that returns when gpujobd's bus name gets a new owner. Without a bus to subscribe
        on (it is restarting too), nothing could say when to try again: then it polls."""
        try:
            return stack.enter_context(self._transport.watch(None))
        except errors.Unavailable:
            return self._polling

    def _polling(self, seconds: float) -> None:
        time.sleep(min(seconds, self.follow_poll_interval_s))

    @property
    def call_timeout_s(self) -> float:
        return self._transport.call_timeout_s

    @call_timeout_s.setter
    def call_timeout_s(self, seconds: float) -> None:
        self._transport.call_timeout_s = float(seconds)

    # -- methods of the contract --

    def submit(self, argv: Sequence[str], *, raw: bool = False, **options: Any) -> Dict[str, Any]:
        """Submit a job; return it as the daemon recorded it.

        `argv`: the command and its arguments (a list, not a shell string). The options are the
        keywords below (each declared in gpujobd.shared.spec.OPTIONS, with its type and rules):
        `cwd`: its working directory (default: the current one). `env`: variables set for the job,
        over your own environment, which the job inherits less its session variables (DISPLAY,
        SSH_AUTH_SOCK, ...: gpujobd.shared.environment); `env_clear=True`: the job gets only the
        daemon's safe base (PATH, HOME, USER, ...), your LANG and `env`. `name`: a
        label. `properties`: resource properties of the job's scope the daemon allows (e.g.
        {"MemoryMax": "8G"}). `timeout_s`: stop the job after this many seconds (it then ends
        `timed-out`).

        Background loops: `background=True` runs the command again after each run ends, up to
        `max_runs` times (default: the server's jobs.default_max_runs), `restart_delay_s` apart
        (default: the server's jobs.restart_delay_s), stopping after the first failed run with
        `stop_on_failure=True`. Each run sees GPUJOB_RUN (1, 2, ...) and GPUJOB_ID. `bind_to`: the id
        of a starting or running job of yours; when it ends, systemd stops this job, which then ends
        `stopped` with reason `bound-job-ended`. `gpu_check` ("off", "refuse", "wait"; default: the
        server's gpu.prestart_check): what to do when a stray process holds one of the job's GPUs.

        Only the options that are given are sent. Raises InvalidArgument for an unknown keyword or a
        value that cannot be sent (before any call) and for every problem the daemon finds, all in
        one message; PermissionDenied, Unavailable, ...
        """
        wire = outgoing.spec_wire(argv, **options)
        (job,) = self._transport.call("Submit", "(a{sv})", (wire,), "(a{sv})")
        return _job(job, raw)

    def submit_all(self, argv: Sequence[str], *, raw: bool = False, **options: Any) -> List[Dict[str, Any]]:
        """Like `submit`, returning every job it created: one per index with `array` (Slurm's syntax,
        "0-19%4": at most 4 at once; `stagger_s` spaces their starts), else the one job.

        Scheduling options (any submit): `gpus` (N whole GPUs for the job alone), `priority` (higher
        first; above 0 for admins only), `after` / `after_any` (job ids: start once they succeeded /
        ended; a failed `after` ends the job `failed`, reason `dependency-failed`)."""
        wire = outgoing.spec_wire(argv, **options)
        (ids,) = self._transport.call("SubmitAll", "(a{sv})", (wire,), "(at)")
        return [self.get(job_id, raw=raw) for job_id in ids]

    def resubmit(self, job_id: int, with_dependents: bool = False, *,
                 raw: bool = False) -> List[Dict[str, Any]]:
        """Submit an ended job's spec again as a new job (its `resubmit_of` says which); with
        with_dependents, also the jobs that depended on it and did not succeed, wired to the new ids
        (dependencies that succeeded count as met). Returns the new jobs, the resubmitted one first."""
        args = (outgoing.checked_id(job_id), bool(with_dependents))
        (ids,) = self._transport.call("Resubmit", "(tb)", args, "(at)")
        return [self.get(job_id, raw=raw) for job_id in ids]

    def drain(self) -> None:
        """Admins: start no new job (running ones go on, queued ones wait) until `undrain`."""
        self._transport.call("Drain", None, (), "()")

    def undrain(self) -> None:
        self._transport.call("Undrain", None, (), "()")

    def tasks(self, job_id: int, *, raw: bool = False) -> List[Dict[str, Any]]:
        """An array's tasks when job_id is an array's id (its first task's, as with Slurm), else
        [the job]. An array's tasks are created in one transaction, so their ids are consecutive."""
        first = self.get(job_id, raw=True)
        if first.get("array_id") != first["id"]:
            return [_job(first, raw)]
        found = [first]
        while True:
            try:
                task = self.get(int(found[-1]["id"]) + 1, raw=True)
            except errors.NotFound:
                break
            if task.get("array_id") != first["id"]:
                break
            found.append(task)
        return [_job(task, raw) for task in found]

    def validate(self, argv: Sequence[str], **options: Any) -> None:
        """Have the daemon check a job as `submit` would, creating nothing: returns None, or raises
        what `submit` would raise for it (InvalidArgument with every problem, PermissionDenied, ...)."""
        self._transport.call("Validate", "(a{sv})", (outgoing.spec_wire(argv, **options),), "()")

    def prune(self, older_than_days: int) -> int:
        """Admins: delete ended jobs (records, runs, logs) that ended more than that many days ago;
        returns how many. Jobs that have not ended are never pruned."""
        if isinstance(older_than_days, bool) or not isinstance(older_than_days, int) \
                or not 0 <= older_than_days < 2**32:
            raise errors.InvalidArgument(f"older_than_days is {older_than_days!r}: give a whole number "
                                         "of days from 0")
        (pruned,) = self._transport.call("Prune", "(u)", (older_than_days,), "(u)")
        return int(pruned)

    def stop(self, job_id: int) -> str:
        """Ask the daemon to stop a job: api.STOP_STOPPING, or api.STOP_ALREADY_ENDED.

        Stopping is asynchronous (SIGTERM to the job's whole cgroup, SIGKILL after the server's stop
        timeout): `wait` for the job to see it end `stopped`.
        """
        (result,) = self._transport.call("Stop", "(t)", (outgoing.checked_id(job_id),), "(s)")
        return result

    def get(self, job_id: int, *, raw: bool = False) -> Dict[str, Any]:
        """One job as the daemon knows it now; NotFound if there is no such job."""
        (wire,) = self._transport.call("Get", "(t)", (outgoing.checked_id(job_id),), "(a{sv})")
        return _job(wire, raw)

    def list(
        self,
        *,
        all: bool = False,
        user: str | None = None,
        state: str | None = None,
        limit: int | None = None,
        raw: bool = False,
    ) -> List[Dict[str, Any]]:
        """Jobs the daemon shows: active ones and those ended lately, or every one with all=True.

        `user` and `state` (a JobState value such as "running") filter; `limit` keeps the newest N.
        """
        if limit is not None and limit <= api.LIST_PAGE_MAX:
            query = outgoing.filter_wire(all=all, user=user, state=state, limit=limit)
            (wires,) = self._transport.call("List", "(a{sv})", (query,), "(aa{sv})")
            return [_job(wire, raw) for wire in wires]
        jobs = [job for page in self.pages(all=all, user=user, state=state, raw=raw) for job in page]
        return jobs[-limit:] if limit else jobs

    def pages(self, *, all: bool = False, user: str | None = None, state: str | None = None,
              raw: bool = False) -> Iterator[List[Dict[str, Any]]]:
        """The same jobs as list(), in pages of at most api.LIST_PAGE_MAX, oldest first: a reader
        that stops early (`gpujobctl list --all | head`) costs the daemon one page, not the history."""
        after_id = 0
        while True:
            query = outgoing.filter_wire(all=all, user=user, state=state, limit=api.LIST_PAGE_MAX,
                                         after_id=after_id)
            (wires,) = self._transport.call("List", "(a{sv})", (query,), "(aa{sv})")
            if wires:
                yield [_job(wire, raw) for wire in wires]
            if not api.page_may_continue(wires):  # a page may also end early by bytes
                return
            after_id = int(wires[-1]["id"])

    def runs(self, job_id: int, limit: int = 0, *, raw: bool = False) -> List[Dict[str, Any]]:
        """The ended runs of a job, oldest first: the last `limit` of them, or all with limit=0.

        A background loop has one record per ended run; any other job has one once it ended. Each is
        shaped like `api.run_to_json`: run (1-based), started_at, ended_at (ISO 8601 UTC), exit_code,
        signal, reason, detail; with raw=True the wire dict (times as float seconds, unset fields
        left out).
        """
        args = (outgoing.checked_id(job_id), outgoing.checked_run_limit(limit))
        (wires,) = self._transport.call("Runs", "(tu)", args, "(aa{sv})")
        return [_run(wire, raw) for wire in wires]

    def gpus(self, *, raw: bool = False) -> Dict[str, Any]:
        """The GPU report: availability (and NVML's reason when unavailable), every GPU with its
        processes and their owners (job, unit, stray, unknown), and the stray processes; shaped like
        `api.gpu_report_to_json`, or the wire dict with raw=True. See docs/gpu.md."""
        (wire,) = self._transport.call("Gpus", None, (), "(a{sv})")
        return dict(wire) if raw else api.gpu_report_to_json(wire)

    def read_log(
        self, job_id: int, offset: int = 0, max_bytes: int = DEFAULT_READ_BYTES
    ) -> Tuple[bytes, int, bool]:
        """Up to max_bytes of a job's log from offset: (data, next_offset, job_ended)."""
        outgoing.checked_log_range(offset, max_bytes)
        return self._transport.read_log(outgoing.checked_id(job_id), offset, max_bytes)

    # -- built on them --

    def logs(self, job_id: int, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """Yield a job's log in chunks, each byte once; with follow, until the job ended and all is read.

        Only what was not read yet is asked for (reads go forward from an offset), so following a
        long log costs only what is appended. Between reads that find nothing new, it sleeps
        follow_poll_interval_s.
        """
        ended_before = False
        while True:
            read = functools.partial(self.read_log, job_id, offset)
            data, offset, ended = self._riding_out_restarts(read) if follow else read()
            if data:
                yield data
            elif not follow or ended_before:
                return
            elif not ended:
                time.sleep(self.follow_poll_interval_s)  # no bus signal says a log grew (tail -f's way)
            # An empty read with job_ended set is confirmed by one more read: bytes written just
            # before the end are then read even if the daemon looked at the state after the file.
            ended_before = ended

    def wait(self, job_id: int, timeout_s: float | None = None, *, raw: bool = False) -> Dict[str, Any]:
        """Block until the job is in a final state and return it; WaitTimedOut after timeout_s.

        Event driven: subscribes to JobChanged (and to the daemon's name changing owner) before the
        first Get, so an end between the two is not missed.
        """
        outgoing.checked_id(job_id)
        if timeout_s is not None and not timeout_s >= 0:
            raise errors.InvalidArgument(f"the wait timeout must be >= 0 seconds, not {timeout_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._transport.watch(job_id) as sleep:
            job = self._riding_out_restarts(lambda: self.get(job_id, raw=True), sleep)
            while not is_final(job):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimedOut(f"timed out after {timeout_s:g}s waiting for job {job_id}: it is "
                                       f"still {job['state']}")
                resync = self.wait_resync_interval_s
                sleep(resync if remaining is None else min(remaining, resync))
                job = self._riding_out_restarts(lambda: self.get(job_id, raw=True), sleep)
        return _job(job, raw)

    def submit_with_background(
        self, foreground_argv: Sequence[str], background_argv: Sequence[str], *, raw: bool = False,
        **options: Any,
    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """The parallel experiment: a foreground job plus a background loop that lives only as long.

        Submits `foreground_argv`, then `background_argv` as a background loop bound to it
        (background=True, bind_to=the foreground's id, named `name + "-bg"` when a name is given):
        when the foreground job ends, systemd stops the loop. Returns (foreground, background), as
        JSON-shaped dicts (the wire dicts with raw=True).

        The options are those of `submit`, each going where its declaration says (`Option.pair`):
        `cwd`, `env`, `properties`, `name` and `gpu_check` apply to both jobs; `timeout_s` to the
        foreground only (the loop ends with it); `max_runs`, `restart_delay_s` and `stop_on_failure`
        to the loop only; `background` and `bind_to` are set here. Both specs are encoded before
        anything is submitted, and the daemon checks the loop's (`validate`) before the foreground
        starts, so a loop it would refuse never costs a started foreground. If the second submission
        still fails (Ctrl-C, a race), the foreground job is stopped and the error re-raised, so a
        call never leaves half a pair running.
        """
        foreground, loop = _split_pair(options)
        outgoing.spec_wire(foreground_argv, **foreground)  # what cannot be sent is refused before
        outgoing.spec_wire(background_argv, **loop, bind_to=0)  # anything starts
        self.validate(background_argv, **loop)  # the loop as the daemon judges it, bound to nothing yet
        first = self.submit(foreground_argv, **foreground, raw=True)
        try:
            second = self.submit(background_argv, **loop, bind_to=first["id"], raw=True)
        except BaseException as error:
            self._stop_after_failed_pair(first["id"], error)
            raise
        return _job(first, raw), _job(second, raw)

    def _stop_after_failed_pair(self, foreground_id: int, error: BaseException) -> None:
        try:
            self.stop(foreground_id)
        except errors.GpujobdError as stop_error:
            if isinstance(error, errors.GpujobdError):
                # Say both, keeping the first error's class (and so its exit code).
                error.args = (f"{error}; stopping the foreground job {foreground_id} failed too "
                              f"({stop_error}): stop it with `gpujobctl stop {foreground_id}`",)


def _split_pair(options: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """submit_with_background's options -> (the foreground's, the loop's)."""
    unknown = spec.unknown_problem(options, "keyword")
    fixed = [key for key in options if key in spec.BY_KEY and spec.BY_KEY[key].pair == "fixed"]
    if unknown or fixed:
        set_here = f"{', '.join(fixed)}: set by submit_with_background itself" if fixed else ""
        raise errors.InvalidArgument("; ".join(filter(None, [unknown, set_here])))
    roles = {key: spec.BY_KEY[key].pair for key in options}
    foreground = {key: value for key, value in options.items() if roles[key] in ("both", "foreground")}
    loop = {key: value for key, value in options.items() if roles[key] in ("both", "loop")}
    loop.update(background=True, name=f"{options['name']}-bg" if options.get("name") else "")
    return foreground, loop
