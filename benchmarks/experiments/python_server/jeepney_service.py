#!/usr/bin/python3
"""A single-threaded Python D-Bus service on jeepney: it owns gpujobd's bus name and answers every
method call with the same reply body (given as floor_service.py takes it), serialised per call, as
jeepney does. No worker thread, no main loop: one blocking receive, one send.

    jeepney_service.py --lib LIBDIR REPLY_JSON     (as root, gpujobd stopped; prints "ready")
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True)
    parser.add_argument("reply")
    args = parser.parse_args()
    sys.path.insert(0, args.lib)
    from jeepney import MessageType, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import Proxy, open_dbus_connection

    from gpujobd.shared import api

    body = ({key: (signature, value) for key, (signature, value) in json.loads(args.reply).items()},)
    connection = open_dbus_connection(bus="SYSTEM")
    primary_owner = 1
    if Proxy(message_bus, connection).RequestName(api.BUS_NAME, 4) != (primary_owner,):  # 4: no queueing
        print(f"{api.BUS_NAME} is owned by another connection", file=sys.stderr)
        return 1
    print("ready", flush=True)
    while True:
        message = connection.receive()
        if message.header.message_type == MessageType.method_call:
            connection.send(new_method_return(message, "a{sv}", body))


if __name__ == "__main__":
    sys.exit(main())
