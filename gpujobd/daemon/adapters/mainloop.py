"""The GLib main loop, as the daemon's core needs it: a way to run a callable on the loop from
another thread (the GPU worker's `post`). main injects it; the core never imports gi."""

from __future__ import annotations

from typing import Callable


def glib_post(callback: Callable[[], None]) -> None:
    """Run `callback` on the GLib main loop (GLib.idle_add is safe to call from any thread)."""
    from gi.repository import GLib

    def once() -> bool:
        callback()
        return False

    GLib.idle_add(once)
