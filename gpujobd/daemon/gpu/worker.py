"""The GPU watcher's one extra thread, and the back-off between tries of a failing NVML.

- `Worker` runs one task at a time (an NVML read, /proc inspection, a verified kill) and hands the
  result to the main loop with `post` (in the daemon, gpujobd.daemon.adapters.mainloop.glib_post,
  injected by main). Before each call that may block, the task names the call (`step`): the main
  loop sees how long the current call has been running, without a lock and without waiting, and
  reports "nvml call hung" instead of starting a second call while one is stuck in the kernel.
- `Backoff`: the waits between tries of a failing NVML, doubling from gpu.retry_initial_s to
  gpu.retry_max_s.

See docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Tuple


class Steps(Protocol):
    """Where a task names the call it is about to make, so a hang is seen and named."""

    def step(self, what: str) -> contextlib.AbstractContextManager: ...


class NoSteps:
    """For running a task on the calling thread (the CLI's self-test, the benchmark)."""

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        yield


NO_STEPS = NoSteps()


@dataclass(frozen=True)
class Done:
    """What a task gave back: its value, or the exception it raised."""

    value: Any = None
    error: Optional[BaseException] = None


Post = Callable[[Callable[[], None]], None]  # runs a callable on the main loop, from any thread


class Worker:
    """One thread, one task at a time; results go to the main loop through `post`.

    Main-loop side: `submit()`, `busy`, `current()`. Worker side: the task, and `step()` around each
    call that may block. The only state shared between the two is `_current`, a tuple replaced
    whole (one atomic store), so neither side ever waits for the other.
    """

    def __init__(self, post: Post, name: str = "gpujobd-nvml",
                 monotonic: Callable[[], float] = time.monotonic):
        self._post = post
        self._name = name
        self._monotonic = monotonic
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._busy = False  # main loop only
        self._current: Optional[Tuple[str, float]] = None  # written by the worker only

    # -- main loop -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, task: Callable[[Steps], Any], on_done: Callable[[Done], None]) -> bool:
        """Queue `task` for the thread; False (and nothing queued) while a task is still running:
        a stuck call must never get a second one beside it."""
        if self._busy:
            return False
        self._busy = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._tasks.put((task, on_done))
        return True

    def current(self) -> Optional[Tuple[str, float]]:
        """(what, seconds so far) of the call the thread is in now, or None between calls."""
        current = self._current
        if current is None:
            return None
        return current[0], max(0.0, self._monotonic() - current[1])

    # -- the thread ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._current = (what, self._monotonic())
        try:
            yield
        finally:
            self._current = None

    def _run(self) -> None:
        while True:
            task, on_done = self._tasks.get()
            try:
                done = Done(value=task(self))
            except BaseException as err:  # the main loop decides; the thread goes on
                done = Done(error=err)
            self._current = None
            self._post(functools.partial(self._finish, on_done, done))

    def _finish(self, on_done: Callable[[Done], None], done: Done) -> None:
        self._busy = False
        on_done(done)


class Backoff:
    """initial, 2*initial, 4*initial, ... up to maximum; reset() after a success."""

    def __init__(self, initial_s: float, maximum_s: float):
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.maximum_s, self.initial_s * (2 ** min(self.failures, 62)))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0
