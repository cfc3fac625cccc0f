"""The daemon's end of the supervisor zygote (gpujobd/supervisor.py documents the protocol).

One `python3 -I .../gpujobd/supervisor.py --zygote`, started by the daemon and already importing what a
supervisor needs, forks one gated supervisor per request: a fork, not an interpreter start. A request
carries two descriptors (the read end of the job's gate pipe, the job's log); the zygote answers with
the child's PID, in the order of the requests.

Nothing here waits: `spawn` sends the request and returns; the answer is read when the socket is
readable (`watch_readable`, the main loop's), and `on_gate(gate)` or `on_error(text)` is called then.
Under load the zygote needs a few milliseconds to be scheduled and fork, and the daemon's one thread
serves other callers meanwhile.

Requests are sent as the socket takes them: a burst's plan may ask for hundreds of supervisors at
once, more than the socket's buffer holds, and a request it refuses (EAGAIN) waits, in order, until
an answer makes room.

A zygote that dies, or does not answer within `timeout_s`, is dropped and a new one started; each
request it had not answered is sent again once, on a new gate pipe (a child the dead zygote may have
forked finds its gate closed and runs nothing), and fails the second time. Jobs already forked are
unaffected: they are no longer the zygote's business.
"""

from __future__ import annotations

import array
import collections
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional

from gpujobd import supervisor
from gpujobd.daemon.spawner import SUPERVISOR_ENV, Gate, gated
from gpujobd.shared.log import guarded

OnGate = Callable[[Gate], None]
OnError = Callable[[str], None]
WatchReadable = Callable[[int, Callable[[], bool]], Callable[[], None]]  # (fd, callback) -> cancel
CallLater = Callable[[float, Callable[[], None]], Callable[[], None]]
ANSWER_MAX_BYTES = 32
SEND_ATTEMPTS = 2  # a request is sent to at most two zygotes


@dataclass
class _Request:
    spec: Dict[str, Any]
    log_fd: int  # the daemon's copy, closed once answered
    on_gate: OnGate
    on_error: OnError
    gate_read: int = -1
    gate_write: int = -1
    attempts: int = 0

    def new_gate_pipe(self) -> None:
        self.close_gate_pipe()
        self.gate_read, self.gate_write = os.pipe()

    def close_gate_pipe(self) -> None:
        for fd in (self.gate_read, self.gate_write):
            if fd >= 0:
                os.close(fd)
        self.gate_read = self.gate_write = -1

    def close(self) -> None:
        self.close_gate_pipe()
        os.close(self.log_fd)


class Zygote:
    """Asks the zygote for gated supervisors; see the module's docstring. `on_started(pid)` gets each
    zygote's PID, for the daemon to reap it when it ends."""

    def __init__(self, timeout_s: float, on_started: Callable[[int], None], watch_readable: WatchReadable,
                 call_later: CallLater):
        self._timeout_s = timeout_s
        self._on_started = on_started
        self._watch_readable = watch_readable
        self._call_later = call_later
        self._sock: Optional[socket.socket] = None
        self._unwatch: Optional[Callable[[], None]] = None
        self._cancel_timer: Optional[Callable[[], None]] = None
        self._pending: Deque[_Request] = collections.deque()  # sent, not answered yet, in order
        self._unsent: Deque[_Request] = collections.deque()  # not taken by the socket yet, in order
        self.pid: Optional[int] = None

    def spawn(self, spec: Dict[str, Any], log_fd: int, on_gate: OnGate, on_error: OnError) -> None:
        """Ask for a gated supervisor whose stdout and stderr are `log_fd` (the caller may close its
        own descriptor at once). A bad spec raises here; anything later reaches `on_error`."""
        supervisor.spec_from_dict(spec)
        request = _Request(spec, os.dup(log_fd), on_gate, on_error)
        try:
            request.new_gate_pipe()
        except OSError:
            request.close()
            raise
        self._unsent.append(request)
        if self._sock is None:
            self._start_zygote()
        else:
            self._send_unsent()

    def start(self) -> None:
        """Start the zygote now rather than at the first request."""
        if self._sock is None:
            self._start_zygote()

    def close(self) -> None:
        """Close the daemon's end: the zygote exits (its children live on). Requests not answered yet
        fail."""
        self._drop_zygote()
        for queue in (self._pending, self._unsent):
            while queue:
                self._fail(queue.popleft(), "gpujobd closed its end of the supervisor zygote")

    # -- the zygote process ------------------------------------------------------------------------
    def _start_zygote(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", supervisor.__file__, supervisor.ZYGOTE_ARG],
                SUPERVISOR_ENV, file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0)], setsid=True)
        except OSError as err:
            ours.close()
            self._give_up(f"the supervisor zygote could not be started: {err}")
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock, self.pid = ours, pid
        self._on_started(pid)
        self._unwatch = self._watch_readable(ours.fileno(), self._on_readable)
        self._send_unsent()

    def _drop_zygote(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        if self._cancel_timer is not None:
            self._cancel_timer()
        if self._sock is not None:
            self._sock.close()
        self._sock, self.pid, self._unwatch, self._cancel_timer = None, None, None, None

    def _replace_zygote(self, reason: str) -> None:
        """The zygote failed: each unanswered request goes once more to a new one, on a new gate."""
        self._drop_zygote()
        kept: Deque[_Request] = collections.deque()
        for request in self._pending:
            if request.attempts >= SEND_ATTEMPTS:
                self._fail(request, reason)
                continue
            try:
                request.new_gate_pipe()
            except OSError as err:
                self._fail(request, f"{reason}; no new gate pipe: {err}")
                continue
            kept.append(request)
        self._pending = collections.deque()
        self._unsent = kept + self._unsent
        if self._unsent:
            self._start_zygote()

    def _give_up(self, reason: str) -> None:
        for queue in (self._pending, self._unsent):
            while queue:
                self._fail(queue.popleft(), reason)

    # -- requests and answers ----------------------------------------------------------------------
    def _send_unsent(self) -> None:
        """Send what waits, in order, until the socket is full; the next answer makes room."""
        while self._unsent and self._sock is not None:
            request = self._unsent[0]
            fds = array.array("i", [request.gate_read, request.log_fd])
            reason = None
            try:
                self._sock.sendmsg([supervisor.ZYGOTE_REQUEST],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except BlockingIOError:
                if self._pending:
                    return  # full of requests the zygote has yet to answer
                reason = "the supervisor zygote's socket took no request while none was unanswered"
            except OSError as err:
                reason = f"the supervisor zygote could not be asked: {err}"
            # Sent, or failed to be: either way an attempt, which _replace_zygote counts.
            self._pending.append(self._unsent.popleft())
            request.attempts += 1
            if reason is not None:
                self._replace_zygote(reason)
                return
            if self._cancel_timer is None:
                self._cancel_timer = self._call_later(self._timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        self._cancel_timer = None
        self._replace_zygote(f"the supervisor zygote did not answer within {self._timeout_s:g} s "
                             "(daemon.zygote_timeout_s)")

    def _on_readable(self) -> bool:
        """Read every answer there is; False (stop watching) once this zygote is dropped."""
        sock = self._sock
        while sock is not None and sock is self._sock:
            try:
                answer = sock.recv(ANSWER_MAX_BYTES)
            except BlockingIOError:
                return True
            except OSError as err:
                self._replace_zygote(f"the supervisor zygote's socket failed: {err}")
                return False
            if not answer or not self._pending:
                self._replace_zygote("the supervisor zygote closed its socket" if not answer
                                     else "the supervisor zygote answered a request never made")
                return False
            self._answered(self._pending.popleft(), answer)
            self._send_unsent()
        return False

    def _answered(self, request: _Request, answer: bytes) -> None:
        if self._cancel_timer is not None:
            self._cancel_timer()
        self._cancel_timer = self._call_later(self._timeout_s, self._timed_out) if self._pending else None
        try:
            pid = int(answer)
        except ValueError:
            pid = 0
        if pid <= 1:
            self._fail(request, f"the supervisor zygote could not start {supervisor.PROGRAM} (answer "
                                f"{answer[:20]!r}; the daemon's journal has the zygote's reason)")
            return
        os.close(request.gate_read)
        os.close(request.log_fd)
        request.gate_read = -1
        write_end, request.gate_write = request.gate_write, -1
        try:
            gate = gated(pid, write_end, request.spec)
        except OSError as err:
            guarded(request.on_error, "zygote.error")(f"the job's spec could not be handed to its "
                                                      f"supervisor: {err}")
            return
        guarded(request.on_gate, "zygote.gate")(gate)

    @staticmethod
    def _fail(request: _Request, reason: str) -> None:
        request.close()
        guarded(request.on_error, "zygote.error")(reason)

