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
import sys
from typing import IO, Any, Callable, List

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
    if journald is None:
        journald = is_journal_stream(stream)
    _install_handler(_formatter(fmt, journald), stream, level)
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


def _install_handler(formatter: logging.Formatter, stream: IO[str], level: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


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
    if text and all(char.isprintable() and char not in ' "=\\' for char in text):
        return text
    return _quote(text)


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
