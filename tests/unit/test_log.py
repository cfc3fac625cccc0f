"""Logging: one line per event, key=value or JSON, stdlib records included, exceptions on one line."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import structlog

from gpujobd.shared import log
from gpujobd.shared.states import JobState

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if isinstance(handler, log._Handler):
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def configure(fmt: str = "console", level: str = "info", journald: bool = False) -> io.StringIO:
    stream = io.StringIO()
    log.configure_logging(fmt, level, stream, journald=journald)
    return stream


def lines(stream: io.StringIO) -> list:
    return stream.getvalue().splitlines()


def fail_and_log(logger) -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("job.failed", job=3)


def test_console_is_one_key_value_line_per_event():
    stream = configure()
    log.get_logger(job=7).info("job.started", unit="gpujob-7.scope", argv="sleep 10", state=JobState.RUNNING)
    log.get_logger().warning("gpu.stray_found", pid=42)
    first, second = lines(stream)
    assert re.match(r"^timestamp=\S+ event=job\.started level=info ", first)
    assert first.endswith('job=7 unit=gpujob-7.scope argv="sleep 10" state=running')
    assert re.match(r"^timestamp=\S+ event=gpu\.stray_found level=warning pid=42$", second)


def test_console_quotes_and_escapes_awkward_values():
    stream = configure()
    log.get_logger().info("x.y", text='say "hi"\nbye', empty="", none=None, flag=True)
    (line,) = lines(stream)
    assert line.endswith(r'text="say \"hi\"\nbye" empty="" none=null flag=true')


def test_json_lines_parse_and_carry_an_iso_timestamp():
    stream = configure("json")
    log.get_logger(job=7).info("job.started", state=JobState.RUNNING)
    (line,) = lines(stream)
    record = json.loads(line)
    assert record["event"] == "job.started" and record["level"] == "info"
    assert record["job"] == 7 and record["state"] == "running"
    assert TIMESTAMP.match(record["timestamp"])


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_an_exception_renders_on_one_line(fmt):
    stream = configure(fmt)
    fail_and_log(log.get_logger())
    (line,) = lines(stream)
    assert "Traceback" in line and "RuntimeError: boom" in line
    if fmt == "json":
        assert "second line" in json.loads(line)["exception"]
    else:
        assert r'exception="Traceback (most recent call last):\n' in line


def test_level_filters_events():
    stream = configure(level="warning")
    logger = log.get_logger()
    logger.debug("a.debug")
    logger.info("a.info")
    logger.error("a.error")
    assert [line.split()[1] for line in lines(stream)] == ["event=a.error"]


def test_stdlib_logging_comes_out_the_same_way():
    stream = configure()
    pydbus = logging.getLogger("pydbus")
    pydbus.warning("cannot %s", "connect")
    try:
        raise ValueError("bad\nreply")
    except ValueError:
        pydbus.exception("call failed")
    warned, failed = lines(stream)
    assert re.match(r'^timestamp=\S+ event="cannot connect" level=warning logger=pydbus$', warned)
    assert 'event="call failed" level=error logger=pydbus exception="Traceback' in failed
    assert r"ValueError: bad\nreply" in failed


def test_stdlib_logging_in_json():
    stream = configure("json")
    logging.getLogger("pydbus").error("oops")
    record = json.loads(stream.getvalue())
    assert (record["event"], record["level"], record["logger"]) == ("oops", "error", "pydbus")


def test_journald_lines_carry_a_priority_and_no_timestamp():
    stream = configure(journald=True)
    logger = log.get_logger()
    logger.info("a.info")
    logger.error("a.error")
    assert lines(stream) == ["<6>event=a.info level=info", "<3>event=a.error level=error"]


def test_reconfiguring_replaces_the_output():
    old = configure()
    new = configure("json")
    log.get_logger().info("a.b")
    assert old.getvalue() == ""
    assert json.loads(new.getvalue())["event"] == "a.b"


def test_bad_format_or_level_is_refused():
    with pytest.raises(ValueError, match="format"):
        log.configure_logging("xml")
    with pytest.raises(ValueError, match="level"):
        log.configure_logging("console", "verbose")


def test_journal_stream_is_recognised_by_device_and_inode(monkeypatch, tmp_path):
    with open(tmp_path / "out", "w") as stream:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not log.is_journal_stream(stream)
        info = (tmp_path / "out").stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert log.is_journal_stream(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
        assert not log.is_journal_stream(stream)
    assert not log.is_journal_stream(io.StringIO())


def test_events_reach_the_journal_as_native_fields(tmp_path, monkeypatch) -> None:
    import io
    import socket
    import struct

    from gpujobd.shared import log as log_module

    path = str(tmp_path / "journal.socket")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    monkeypatch.setattr(log_module, "JOURNAL_SOCKET", path)
    stream = io.StringIO()
    handler = log_module._JournalHandler(stream)
    log_module._install_handler(handler, log_module._formatter("console", True), "info")
    log_module.structlog.configure(
        processors=[log_module.structlog.stdlib.filter_by_level,
                    log_module.ProcessorFormatter.wrap_for_formatter],
        logger_factory=log_module.structlog.stdlib.LoggerFactory(),
        wrapper_class=log_module.structlog.stdlib.BoundLogger, cache_logger_on_first_use=False)
    try:
        log_module.get_logger().warning("gpu.stray_found", job_id=17, user="bob", stray={"pid": 42},
                                        argv0="evil\nevent=job.finished")
        datagram = receiver.recv(65536)
    finally:
        logging.getLogger().removeHandler(handler)
        receiver.close()
    assert b"EVENT=gpu.stray_found\n" in datagram and b"GPUJOB_ID=17\n" in datagram
    assert b"GPUJOB_USER=bob\n" in datagram and b"GPUJOBD_STRAY_PID=42\n" in datagram
    value = b"evil\nevent=job.finished"
    assert b"GPUJOBD_ARGV0\n" + struct.pack("<Q", len(value)) + value in datagram, "newlines go binary"
    assert b"PRIORITY=4\n" in datagram and stream.getvalue() == ""
