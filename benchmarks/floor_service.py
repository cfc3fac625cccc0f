#!/usr/bin/python3
"""The floor of gpujobd's D-Bus stack: a service that owns gpujobd's bus name on the daemon's stack
(GDBus through PyGObject, one GLib main loop) and answers every method with one reply built before
the first call. The daemon section measures gpujobd's Get against it: what is left between the two is
gpujobd's own work; what is left between it and systemd is the stack's.

Run as root (only root may own the name, by gpujobd's bus policy), with gpujobd stopped:
    floor_service.py --lib LIBDIR REPLY_JSON
REPLY_JSON: {"signature": "a{sv}", "value": {field: [signature, value], ...}}, the body of a real Get
reply; it prints "ready" once it owns the name and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any, Dict, List


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="where gpujobd is installed (its api module)")
    parser.add_argument("reply", help="the reply body as JSON (see the module's docstring)")
    args = parser.parse_args()
    sys.path.insert(0, args.lib)
    from gi.repository import Gio, GLib

    from gpujobd.shared import api

    fields: Dict[str, List[Any]] = json.loads(args.reply)
    reply = GLib.Variant.new_tuple(GLib.Variant("a{sv}", {
        key: GLib.Variant(signature, value) for key, (signature, value) in fields.items()}))
    connection = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    interface = Gio.DBusNodeInfo.new_for_xml(api.INTROSPECTION_XML).lookup_interface(api.INTERFACE)

    def answer(_connection: Any, _sender: str, _path: str, _interface: str, _method: str,
               _parameters: Any, invocation: Any) -> None:
        invocation.return_value(reply)

    connection.register_object(api.OBJECT_PATH, interface, answer, None, None)
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    Gio.bus_own_name_on_connection(connection, api.BUS_NAME, Gio.BusNameOwnerFlags.NONE,
                                   lambda *_: print("ready", flush=True),
                                   lambda *_: loop.quit())
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
