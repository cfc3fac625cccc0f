"""Every timing constant of gpujobd is a key of gpujobd.shared.config, with its default and doc.

The package's source is scanned for durations written anywhere else: a module or class constant named
as a duration, a literal passed to a sleep, a timer or a call's timeout, a literal default of a
duration parameter. The few exceptions are listed below with the reason each is not a setting; the
mirrors among them (kept where importing the config module would cost) are checked to be equal.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from gpujobd import supervisor
from gpujobd.client import client, transport
from gpujobd.shared import config
from gpujobd.shared.config import SETTINGS, ClientConfig

PACKAGE = Path(__file__).resolve().parents[2] / "gpujobd"
CONFIG_MODULE = PACKAGE / "shared" / "config.py"

# (file relative to the package, name) -> why it is not a key of the config module.
NOT_SETTINGS: Dict[Tuple[str, str], str] = {
    ("shared/spec.py", "MAX_TIMEOUT_S"): "a bound of the contract: RuntimeMaxSec= overflows above it",
    ("supervisor.py", "MAX_DELAY_S"): "the same bound, checked again by the supervisor",
    ("supervisor.py", "MAX_LOG_DRAIN_S"): "jobs.log_drain_s's maximum, mirrored (checked below)",
    ("daemon/retention.py", "DAY_S"): "a unit: keep_days is in days",
    ("submitit_plugin/environment.py", "SHORT_TIMEOUT_FRACTION"): "a fraction of a job's timeout",
    ("client/client.py", "DEFAULT_FOLLOW_POLL_INTERVAL_S"): "client.follow_poll_interval_s, mirrored",
    ("client/client.py", "DEFAULT_RESTART_GRACE_S"): "client.restart_grace_s, mirrored",
    ("client/client.py", "WAIT_RESYNC_INTERVAL_S"): "client.wait_resync_interval_s, mirrored",
    ("client/transport.py", "DEFAULT_CALL_TIMEOUT_S"): "client.call_timeout_s, mirrored",
    ("daemon/adapters/nvml.py", "ERROR_TIMEOUT"): "an NVML return code (NVML_ERROR_TIMEOUT)",
    ("submitit_plugin/executor.py", "__init__(max_num_timeout=<number>)"):
        "submitit's own parameter: how many times a timed-out job is requeued",
}

_DURATION_SUFFIXES = ("_S", "_MS", "_US", "_SEC", "_SECONDS")
_DURATION_WORDS = ("TIMEOUT", "INTERVAL", "DELAY", "GRACE")
# Calls whose positional number is a duration: sleeps, timers, joins, waits and D-Bus calls.
_TIMED_CALLS = frozenset({"sleep", "call_later", "_schedule", "join", "timeout_add", "timeout_add_seconds",
                          "call_sync", "call", "wait", "select", "settimeout", "alarm", "setitimer"})


def _is_duration_name(name: str) -> bool:
    upper = name.upper()
    return upper.endswith(_DURATION_SUFFIXES) or any(word in upper for word in _DURATION_WORDS)


def _is_number(node: ast.AST) -> bool:
    """A numeric literal, or arithmetic of them (60 * 60), other than zero."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool) and node.value != 0
    if isinstance(node, ast.BinOp):
        return all(isinstance(side, ast.Constant) or _is_number(side) for side in (node.left, node.right))
    if isinstance(node, ast.UnaryOp):
        return _is_number(node.operand)
    return False


def _holds_number(node: ast.AST) -> bool:
    """A number, or a min()/max() with one among its arguments (a capped pause: min(1.0, interval))."""
    if isinstance(node, ast.Call) and _callee(node) in ("min", "max"):
        return any(_holds_number(arg) for arg in node.args)
    return _is_number(node)


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def durations_outside_config(source: str) -> Iterator[Tuple[int, str]]:
    """(line, what) for each duration the source writes down itself."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and _is_duration_name(target.id) \
                        and node.value is not None and _is_number(node.value):
                    yield node.lineno, target.id
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg and _is_duration_name(keyword.arg) and _is_number(keyword.value):
                    yield node.lineno, f"{_callee(node)}({keyword.arg}=...)"
            if _callee(node) in _TIMED_CALLS and any(_holds_number(arg) for arg in node.args):
                yield node.lineno, f"{_callee(node)}(<number>)"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = node.args.posonlyargs + node.args.args
            pairs = list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
            pairs += [(arg, default) for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults)
                      if default is not None]
            for arg, default in pairs:
                if _is_duration_name(arg.arg) and _is_number(default):
                    yield node.lineno, f"{node.name}({arg.arg}=<number>)"


def _package_findings() -> Tuple[int, List[str]]:
    files = [path for path in sorted(PACKAGE.rglob("*.py")) if path != CONFIG_MODULE]
    found = []
    for path in files:
        relative = path.relative_to(PACKAGE).as_posix()
        for line, what in durations_outside_config(path.read_text()):
            if (relative, what) not in NOT_SETTINGS:
                found.append(f"gpujobd/{relative}:{line}: {what}")
    return len(files), found


def test_the_scan_finds_each_kind_of_written_duration() -> None:
    source = (
        "RETRY_S = 5.0\n"
        "class A:\n    POLL_INTERVAL = 60 * 5\n"
        "def f(x, grace_s=2.5, *, y=1):\n    time.sleep(0.1)\n    loop.call_later(3, g)\n"
        "    con.call_sync('a', 'b', None, 5000, None)\n    h(timeout=10)\n    self._schedule(min(1.0, t))\n"
        "def ok(timeout_s=DaemonConfig.x, delay_s=0.0):\n    time.sleep(delay_s)\n    h(timeout=None)\n"
    )
    found = [what for _line, what in durations_outside_config(source)]
    assert found.count("RETRY_S") == 1 and found.count("POLL_INTERVAL") == 1
    assert "f(grace_s=<number>)" in found
    assert {"sleep(<number>)", "call_later(<number>)", "call_sync(<number>)", "h(timeout=...)",
            "_schedule(<number>)"} <= set(found)
    assert len(found) == 8, found  # nothing from `ok`: config references, zero and None are fine


def test_no_timing_constant_lives_outside_the_config_module() -> None:
    scanned, found = _package_findings()
    assert scanned > 50  # the package's modules were read
    assert not found, ("timing constants outside gpujobd/shared/config.py; declare each as a key there "
                       "(default, doc, TOML key) and pass it in:\n" + "\n".join(found))


def test_every_exception_still_exists() -> None:
    """A stale entry would hide a new constant of the same name."""
    for (relative, name) in NOT_SETTINGS:
        found = [what for _line, what in durations_outside_config((PACKAGE / relative).read_text())]
        assert name in found, f"{relative}: {name} is listed as an exception but is not there"


def test_client_defaults_mirror_the_client_section() -> None:
    defaults = ClientConfig()
    assert defaults.follow_poll_interval_s == client.DEFAULT_FOLLOW_POLL_INTERVAL_S
    assert defaults.restart_grace_s == client.DEFAULT_RESTART_GRACE_S
    assert defaults.wait_resync_interval_s == client.WAIT_RESYNC_INTERVAL_S
    assert defaults.call_timeout_s == transport.DEFAULT_CALL_TIMEOUT_S
    parameters = inspect.signature(client.Client).parameters
    for name in ("call_timeout_s", "follow_poll_interval_s", "restart_grace_s", "wait_resync_interval_s"):
        assert parameters[name].default == getattr(defaults, name), name


def test_supervisor_bounds_mirror_the_config() -> None:
    drain = next(s for s in SETTINGS if s.dotted == "jobs.log_drain_s")
    assert drain.spec.maximum == supervisor.MAX_LOG_DRAIN_S
    assert config.JobsConfig().log_drain_s <= supervisor.MAX_LOG_DRAIN_S
