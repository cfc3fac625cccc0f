"""Logging, configured in one place: one event per line on stderr, key=value or JSON.

Call `configure_logging()` once at start (the daemon with its [daemon] log_format and log_level; the
CLI too, so that nothing a library logs lands on stdout), then log with `get_logger(**bind)`:

    log = get_logger(job=7)
    log.info("job.started", unit="gpujob-7.scope")

Event names are stable, dotted and lower case (`job.started`, `gpu.stray_found`); the details go in
keys, never in the event name. Console lines look like

    event=job.started level=info job=7 unit=gpujob-7.scope

Under journald (stderr is the journal stream, see $JOURNAL_STREAM) lines carry no timestamp,
journald adds its own, and start with a `<N>` syslog priority prefix so `journalctl -p` works.
Exceptions are rendered into one escaped `exception` field, so an event is always one line.
Records of the stdlib `logging` module (pydbus logs through it) take the same way, with a `logger` key.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import socket
import struct
import sys
from typing import IO, Any, Callable, Dict, List, Mapping

import structlog
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor

FORMATS = ("console", "json")
LEVELS = ("debug", "info", "warning", "error")

LOGGER_NAME = "gpujobd"

_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_FIRST_KEYS = ("timestamp", "event", "level", "logger")
Renderer = Callable[[Any, str, EventDict], str]  # a processor that ends the chain: one line of text


def configure_logging(
    fmt: str = "console",
    level: str = "info",
    stream: IO[str] | None = None,
    *,
    journald: bool | None = None,
) -> None:
    """Send structlog events and stdlib `logging` records to `stream` (stderr), one line each.

    fmt is "console" (key=value) or "json"; level is the least severe level written. journald says
    whether `stream` is the journal (no console timestamps, `<N>` priority prefixes); None detects it.
    Calling it again replaces the previous configuration.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    stream = sys.stderr if stream is None else stream
    native = False
    if journald is None:
        journald = is_journal_stream(stream)
        native = journald and os.path.exists(JOURNAL_SOCKET)
    handler: logging.Handler = _JournalHandler(stream) if native else _Handler(stream)
    _install_handler(handler, _formatter(fmt, journald), level)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Loggers are made at import time all over the code; caching would pin them to the first
        # configuration, and a reconfiguration (tests, --check-config) would not reach them.
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    """A structlog logger with `bind` as its context: `get_logger(job=7).info("job.started")`."""
    return structlog.get_logger(LOGGER_NAME, **bind)


def is_journal_stream(stream: IO[str]) -> bool:
    """Whether `stream` is connected to journald, by $JOURNAL_STREAM (device:inode), as sd_journal does."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor: StringIO, closed stream
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class _Handler(logging.StreamHandler):
    """Our root handler, recognised (and replaced) when configure_logging runs again."""


def _install_handler(handler: logging.Handler, formatter: logging.Formatter, level: str) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _Handler):
            root.removeHandler(old)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


# --- the journal's native protocol: each event's keys as journal fields --------------------------------
# `journalctl GPUJOB_ID=17` and `journalctl EVENT=job.finished` work. Written to the socket directly
# (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/: one datagram of KEY=VALUE lines, a binary form for
# values with a newline): twenty lines of stdlib instead of a C extension (python3-systemd) that a
# venv or the wheel install would not see. Any failure falls back to the stderr line.

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_NAMED_FIELDS = {"event": "EVENT", "job_id": "GPUJOB_ID", "user": "GPUJOB_USER", "unit": "GPUJOB_UNIT"}


def journal_fields(event_dict: Mapping[str, Any]) -> Dict[str, str]:
    """An event's keys as journal field names: the named ones, the rest as GPUJOBD_<KEY>; a mapping
    value becomes one field per key (GPUJOBD_STRAY_PID)."""
    fields: Dict[str, str] = {}
    for key, value in event_dict.items():
        if isinstance(value, Mapping):
            for sub, item in value.items():
                fields[_field_name(f"{key}_{sub}")] = _field_value(item)
        else:
            fields[_NAMED_FIELDS.get(key) or _field_name(key)] = _field_value(value)
    return fields


def _field_name(key: str) -> str:
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return ("GPUJOBD_" + name)[:64]


def _field_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return "" if value is None else str(value)


def encode_journal_datagram(fields: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class _JournalHandler(_Handler):
    """Sends each record to journald with its fields; the formatted line is the MESSAGE."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            event = record.msg if isinstance(record.msg, dict) else {"event": record.getMessage()}
            fields = {"MESSAGE": re.sub(r"^<\d>", "", line),
                      "PRIORITY": str(_SYSLOG_PRIORITY.get(record.levelname.lower(), 6)),
                      "SYSLOG_IDENTIFIER": LOGGER_NAME, **journal_fields(event)}
            self._socket.sendto(encode_journal_datagram(fields), JOURNAL_SOCKET)
        except Exception:
            super().emit(record)  # the journal's stream still has it


def _formatter(fmt: str, journald: bool) -> ProcessorFormatter:
    renderer: Renderer = _render_json if fmt == "json" else _render_key_values
    processors: List[Processor] = [
        ProcessorFormatter.remove_processors_meta,
        structlog.stdlib.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        _stringify_enums,
    ]
    if fmt == "json" or not journald:
        processors.insert(1, structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors.append(_with_priority_prefix(renderer) if journald else renderer)
    return ProcessorFormatter(
        processors=processors,
        # Records from stdlib logging (pydbus, warnings) get the name of their logger.
        foreign_pre_chain=[structlog.stdlib.add_logger_name],
    )


def _stringify_enums(_: Any, __: str, event_dict: EventDict) -> EventDict:
    return {key: value.value if isinstance(value, enum.Enum) else value for key, value in event_dict.items()}


def _render_json(logger: Any, method: str, event_dict: EventDict) -> str:
    return json.dumps(_ordered(event_dict), default=str)


def _render_key_values(_: Any, __: str, event_dict: EventDict) -> str:
    return " ".join(f"{key}={_console_value(value)}" for key, value in _ordered(event_dict).items())


def _ordered(event_dict: EventDict) -> EventDict:
    first = {key: event_dict[key] for key in _FIRST_KEYS if key in event_dict}
    first.update((key, value) for key, value in event_dict.items() if key not in first)
    return first


def _console_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and text.isprintable() and _NEEDS_QUOTES.search(text) is None:
        return text
    return _quote(text)


_NEEDS_QUOTES = re.compile(r'[ "=\\]')


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(text: str) -> str:
    """A double-quoted value with every line break and control character escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif not char.isprintable() and char != " ":
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _with_priority_prefix(renderer: Renderer) -> Renderer:
    """Prefix the line with `<N>`, which journald reads as the syslog priority and strips."""

    def render(logger: Any, method: str, event_dict: EventDict) -> str:
        priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level", "")), 6)
        return f"<{priority}>" + renderer(logger, method, event_dict)

    return render


def guarded(handler: Callable[..., Any], event: str) -> Callable[..., None]:
    """An event handler that logs its failure instead of losing it in the main loop: one bad event
    must never stop the daemon from handling the next."""
    def run(*args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            get_logger().exception("event.handler_failed", source=event)
    return run
