"""What gpujobctl shows: pure formatting of jobs, runs, times and log tails, no argument parsing.

Every function takes the wire dicts the client returns with raw=True (times as float seconds since
the epoch, unset fields left out) and returns text; nothing here talks to the daemon except
`log_tail`, which reads through the client it is given.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
import time
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from gpujobd.shared.states import JobState

TAIL_WINDOW_BYTES = 64 * 1024  # status reads the log from this far before its end, when it can stat it
MAX_SHOWN_PROCESSES = 20

# Reasons the state, exit code or signal already say; others are shown as "reason: detail".
_SELF_EVIDENT_REASONS = {"exit-code", "signal", "stopped", "timeout", "lost"}


# --- job facts ---------------------------------------------------------------------------------------


def describe_end(job: Mapping[str, Any]) -> str:
    """"succeeded", "failed (exit code 3)", "failed (exec-failed: No such file or directory)", ..."""
    state = job.get("state", "?")
    if state == JobState.SUCCEEDED.value:
        return state
    facts = _end_facts(job)
    if job.get("stopped_by"):
        facts.append(f"stopped by {job['stopped_by']}")
    facts = without_repeats(facts)  # the daemon's detail may say what a field says
    return f"{state} ({', '.join(printable(fact) for fact in facts)})" if facts else state


def _end_facts(record: Mapping[str, Any]) -> List[str]:
    """Exit code, signal and (when they add something) reason and detail of a job or a run."""
    facts = []
    if record.get("exit_code") is not None:
        facts.append(f"exit code {record['exit_code']}")
    if record.get("signal") is not None:
        facts.append(f"signal {signal_text(record['signal'])}")
    reason, detail = record.get("reason") or "", record.get("detail") or ""
    if reason and reason not in _SELF_EVIDENT_REASONS:
        facts.append(f"{reason}: {detail}" if detail else reason)
    elif detail:
        facts.append(detail)
    return facts


def without_repeats(facts: Sequence[str]) -> List[str]:
    """Facts without those another fact already says (as a whole word sequence, any case):
    ["stopped by alice", "stopped by alice"] -> one; "exit code 1" is kept next to "exit code 13"."""
    unique = list(dict.fromkeys(facts))
    kept = []
    for index, fact in enumerate(unique):
        said = re.compile(r"(?<!\w)" + re.escape(fact) + r"(?!\w)", re.IGNORECASE)
        if not any(said.search(other) for other_index, other in enumerate(unique) if other_index != index):
            kept.append(fact)
    return kept


def signal_text(number: int) -> str:
    """"9 (SIGKILL)"; just the number for one Python does not know."""
    import signal

    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


def exit_column(job: Mapping[str, Any]) -> str:
    if job.get("signal") is not None:
        return f"sig {job['signal']}"
    if job.get("exit_code") is not None:
        return str(job["exit_code"])
    return "-"


def state_column(job: Mapping[str, Any]) -> str:
    """The state, and for a background loop the runs ended so far of its maximum: "running 3/5"."""
    state = job.get("state", "?")
    if job.get("position") is not None:
        return f"{state} #{job['position']}"
    if not job.get("background"):
        return state
    return f"{state} {job.get('runs') or 0}/{job.get('max_runs') or '?'}"


def gpus_column(job: Mapping[str, Any]) -> str:
    held = job.get("gpus") or []
    if held:
        return str(len(held))
    requested = job.get("gpus_requested") or 0
    return f"({requested})" if requested and job.get("state") == "queued" else "-"


def runtime_s(job: Mapping[str, Any], now: float) -> float | None:
    if job.get("elapsed_s") is not None:
        return job["elapsed_s"]
    started, ended = job.get("started_at"), job.get("ended_at")
    if started is None:
        return None
    return max(0.0, (ended if ended is not None else now) - started)


def timeout_fraction(job: Mapping[str, Any], now: float) -> float | None:
    """How far the job got towards its timeout: the daemon's timeout_fraction (set once it ended),
    else, while it runs, its runtime so far over its timeout."""
    if job.get("timeout_fraction") is not None:
        return job["timeout_fraction"]
    elapsed = runtime_s(job, now)
    if elapsed is None or not job.get("timeout_s"):
        return None
    return elapsed / job["timeout_s"]


def command_text(argv: Iterable[str]) -> str:
    return printable(" ".join(shlex.quote(arg) for arg in argv))


def printable(text: str) -> str:
    """Control characters escaped, so a job's name or command cannot break a table or the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


# --- times -------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}min {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}min"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def format_moment(timestamp: float, now: float) -> str:
    local = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
    return f"{local}; {format_duration(max(0.0, now - timestamp))} ago"


def format_percent(fraction: float) -> str:
    """Rounded down: a job that stopped just short of its timeout never reads "100%"."""
    return f"{math.floor(fraction * 100 + 1e-9)}%"


# --- status ------------------------------------------------------------------------------------------


def format_status(job: Mapping[str, Any], now: float, processes: Sequence[Tuple[int, str]],
                  runs: Optional[Sequence[Mapping[str, Any]]] = None) -> List[str]:
    """The lines of `gpujobctl status` above the log, like `systemctl status`.

    `runs`: the last runs of a background loop (wire dicts, oldest first), shown as "Last runs".
    """
    name = f" ({printable(job['name'])})" if job.get("name") else ""
    header = f"{_bullet()} job {job['id']}{name} - {describe_end(job)}"
    fields = _status_fields(job, now, processes, runs or [])
    width = max((len(label) for label, _ in fields), default=0)
    lines = [header]
    for label, value in fields:
        head = f"{label}:".rjust(width + 1)
        value_lines = value.split("\n")
        lines.append(f"{head} {value_lines[0]}")
        lines.extend(" " * (width + 2) + more for more in value_lines[1:])
    return lines


def _status_fields(job: Mapping[str, Any], now: float, processes: Sequence[Tuple[int, str]],
                   runs: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    fields: List[Tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "":
            fields.append((label, str(value)))

    add("Unit", job.get("unit"))
    add("User", _user_text(job))
    add("Command", command_text(job.get("argv", [])))
    add("Cwd", printable(job.get("cwd", "")))
    add("Environment", _pairs_lines(job.get("env")))
    add("Properties", _pairs_text(job.get("properties")))
    add("GPUs", None if gpus_column(job) == "-" else gpus_column(job))
    if job.get("created_at") is not None:
        add("Submitted", format_moment(job["created_at"], now))
    if job.get("started_at") is not None:
        add("Started", format_moment(job["started_at"], now))
    if job.get("ended_at") is not None:
        add("Ended", format_moment(job["ended_at"], now))
    elapsed = runtime_s(job, now)
    add("Runtime", None if elapsed is None else format_duration(elapsed))
    add("Timeout", _timeout_text(job, now))
    if job.get("background"):
        add("Runs", f"{job.get('runs') or 0} of {job.get('max_runs') or '?'}")
        if job.get("restart_delay_s") is not None:
            add("Restart delay", format_duration(job["restart_delay_s"]))
        if job.get("stop_on_failure"):
            add("Stop on failure", "yes")
        add("Last runs", format_runs(runs))
    add("Bound to", None if job.get("bind_to") is None else f"job {job['bind_to']}")
    _add_scheduling(job, add)
    add("Exit", job.get("exit_code"))
    add("Signal", None if job.get("signal") is None else signal_text(job["signal"]))
    add("Reason", job.get("reason"))
    if job.get("detail") != f"stopped by {job.get('stopped_by')}":  # "Stopped by" says it
        add("Detail", printable(job.get("detail") or ""))
    add("Stopped by", job.get("stopped_by"))
    if job.get("leftover_processes"):
        add("Leftover processes", job["leftover_processes"])
    add("Processes", _processes_text(processes))
    add("Log", job.get("log_path"))
    return fields


def _add_scheduling(job: Mapping[str, Any], add: Callable[[str, Any], None]) -> None:
    if job.get("gpus"):
        add("GPUs", ", ".join(job["gpus"]))
    elif job.get("gpus_requested"):
        add("GPUs", f"{job['gpus_requested']} asked for")
    if job.get("position") is not None:
        add("Queued", f"#{job['position']}, waiting for {job.get('waiting_for') or '?'}")
    if job.get("priority"):
        add("Priority", job["priority"])
    if job.get("after"):
        add("After", ", ".join(str(i) for i in job["after"]) + " (to succeed)")
    if job.get("after_any"):
        add("After any", ", ".join(str(i) for i in job["after_any"]) + " (to end)")
    if job.get("array_id") is not None:
        add("Array", f"{job['array_id']} index {job.get('array_index')} ({job.get('array') or ''})")
    add("Resubmit of", None if job.get("resubmit_of") is None else f"job {job['resubmit_of']}")


def _timeout_text(job: Mapping[str, Any], now: float) -> str | None:
    if job.get("timeout_s") is None:
        return None
    text = format_duration(job["timeout_s"])
    fraction = timeout_fraction(job, now)
    return text if fraction is None else f"{text} (reached {format_percent(fraction)})"


def format_runs(runs: Sequence[Mapping[str, Any]]) -> str | None:
    """One line per run: "run 3   11.5s  exit code 1", columns aligned; None for no runs."""
    if not runs:
        return None
    rows = [(f"run {run.get('run', '?')}", _run_duration(run), run_result(run)) for run in runs]
    number_width = max(len(row[0]) for row in rows)
    duration_width = max(len(row[1]) for row in rows)
    return "\n".join(f"{number.ljust(number_width)}  {duration.rjust(duration_width)}  {result}"
                     for number, duration, result in rows)


def run_result(run: Mapping[str, Any]) -> str:
    """How one run ended: "exit code 0", "signal 9 (SIGKILL)", "exec-failed: ..."."""
    facts = without_repeats(_end_facts(run))
    return printable(", ".join(facts)) if facts else (run.get("reason") or "?")


def _run_duration(run: Mapping[str, Any]) -> str:
    started, ended = run.get("started_at"), run.get("ended_at")
    if started is None or ended is None:
        return "-"
    return format_duration(max(0.0, ended - started))


def _user_text(job: Mapping[str, Any]) -> str | None:
    if not job.get("user"):
        return None
    return f"{job['user']} (uid {job['uid']})" if job.get("uid") is not None else job["user"]


def _pairs_text(pairs: Mapping[str, str] | None) -> str | None:
    if not pairs:
        return None
    return printable(" ".join(shlex.quote(f"{key}={value}") for key, value in sorted(pairs.items())))


def _pairs_lines(pairs: Mapping[str, str] | None) -> str | None:
    """One NAME=VALUE per line (an inherited environment is long), aligned under the first."""
    if not pairs:
        return None
    return "\n".join(printable(shlex.quote(f"{key}={value}")) for key, value in sorted(pairs.items()))


def _processes_text(processes: Sequence[Tuple[int, str]]) -> str | None:
    if not processes:
        return None
    shown = [f"{pid} {cmdline}" for pid, cmdline in processes[:MAX_SHOWN_PROCESSES]]
    if len(processes) > MAX_SHOWN_PROCESSES:
        shown.append(f"... and {len(processes) - MAX_SHOWN_PROCESSES} more")
    return "\n".join(shown)


def _bullet() -> str:
    return "●" if can_print("●") else "*"


def can_print(text: str) -> bool:
    """Whether stdout's encoding can show `text`."""
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# --- log tail ----------------------------------------------------------------------------------------


def log_tail(client: Any, job: Mapping[str, Any], count: int) -> List[str]:
    """The last `count` lines of the job's log, as text to show.

    Reads forward from near the end when the log file can be stat'ed here (ReadLog offsets are byte
    offsets into it), else from the start, keeping only the last lines.
    """
    start = _tail_start(job.get("log_path"))
    chunks: Iterable[bytes] = client.logs(job["id"], follow=False, offset=start)
    if start > 0:
        chunks = _after_first_newline(chunks)
    kept = b""
    for chunk in chunks:
        kept = last_lines(kept + chunk, count)
    lines = kept.split(b"\n")  # not splitlines(): a lone \r (a progress bar) does not end a line
    if lines and not lines[-1]:
        lines.pop()
    return [_log_line_text(line) for line in lines]


def _tail_start(log_path: str | None) -> int:
    if not log_path:
        return 0
    try:
        size = os.stat(log_path).st_size
    except OSError:
        return 0
    # One byte more than the window: the partial first line is dropped, and so is nothing else.
    return max(0, size - TAIL_WINDOW_BYTES - 1)


def _after_first_newline(chunks: Iterable[bytes]) -> Iterator[bytes]:
    found = False
    for chunk in chunks:
        if not found:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            chunk, found = chunk[newline + 1:], True
        yield chunk


def last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of data (an unterminated last line counts as one)."""
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return data
    return data[pos + 1:]


_ANSI_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _log_line_text(line: bytes) -> str:
    text = line.decode("utf-8", "replace").rstrip("\r").rsplit("\r", 1)[-1]  # what a terminal shows
    return printable(_ANSI_SEQUENCE.sub("", text).replace("\t", "    "))


# --- list --------------------------------------------------------------------------------------------

_COLUMNS = ("ID", "USER", "STATE", "EXIT", "SUBMIT", "START", "ELAPSED", "GPUS", "NAME", "COMMAND")
_STATE_COLUMN = 2
# SGR colours of a state on a terminal: what runs green, what waits yellow, what failed red.
_STATE_COLOURS = {"running": "32", "starting": "33", "queued": "33", "stopping": "33", "succeeded": "",
                  "failed": "31", "lost": "31", "timed-out": "35", "stopped": "35"}


def format_table(jobs: Sequence[Mapping[str, Any]], now: float, width: int | None = None,
                 colour: bool = False) -> List[str]:
    """The `list` table; COMMAND is cut to `width` columns in all (None: not cut); with `colour`, the
    STATE cell in the state's colour (a terminal's, never a pipe's: `list` decides).

    A background loop's STATE is followed by its runs ended of its maximum: "running 3/5"; a queued
    job's by its position in the queue: "queued #2". GPUS: how many it holds, or asks for "(2)".
    """
    rows = [_COLUMNS] + [_table_row(job, now) for job in jobs]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].rjust(widths[0])] + [cell.ljust(w) for cell, w in zip(row[1:-1], widths[1:])]
        prefix_width = sum(len(cell) + 2 for cell in cells)
        if colour and index:
            cells[_STATE_COLUMN] = _coloured(cells[_STATE_COLUMN], str(jobs[index - 1].get("state", "")))
        prefix = "  ".join(cells) + "  "
        lines.append(prefix + _cut(row[-1], None if width is None else width - prefix_width))
    return lines


def _coloured(cell: str, state: str) -> str:
    code = _STATE_COLOURS.get(state, "")
    return f"\033[{code}m{cell}\033[0m" if code else cell


def _table_row(job: Mapping[str, Any], now: float) -> Tuple[str, ...]:
    elapsed = runtime_s(job, now)
    return (
        str(job["id"]),
        printable(job.get("user", "") or "-"),
        state_column(job),
        exit_column(job),
        format_clock(job.get("created_at"), now),
        format_clock(job.get("started_at"), now),
        "-" if elapsed is None else format_duration(elapsed),
        gpus_column(job),
        printable(job.get("name") or "-"),
        command_text(job.get("argv", [])),
    )


def format_clock(timestamp: float | None, now: float) -> str:
    """A table's time, 5 characters: HH:MM today, MM-DD on another day (local time); "-" when unset.
    `status` and `--json` give the full times."""
    if timestamp is None:
        return "-"
    same_day = time.localtime(timestamp)[:3] == time.localtime(now)[:3]
    return time.strftime("%H:%M" if same_day else "%m-%d", time.localtime(timestamp))


def _cut(text: str, room: int | None) -> str:
    if room is None:
        return text
    room = max(room, 10)  # on a very narrow terminal the line wraps rather than lose the command
    if len(text) <= room:
        return text
    ellipsis = "…" if can_print("…") else "~"
    return text[: room - 1] + ellipsis
