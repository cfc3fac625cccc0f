"""Strays: GPU processes nobody owns, tracked across ticks, and what the kill policy does to them.

A stray (gpu.attribution) is known by its PID and start time, so a reused PID is a new stray. Each
good reading of the GPUs (gpujobd.daemon.gpu.watcher) updates the set: a new one is reported (`on_found`), one
seen again counts one more consecutive tick, one gone is cleared (`on_cleared`); a gap in the
readings restarts the count. With gpu.stray_policy = "kill", `kill_verdict` decides for each one:
never for PID 0 or 1, the daemon, root, system accounts or another unit's processes; otherwise only
when every admin rule matches, after the grace time and enough ticks. A stray in an ended job's
scope is stopped through systemd; any other gets SIGTERM, then SIGKILL after jobs.stop_timeout_s,
through a pidfd after re-checking that the PID is still the process judged (`kill_verified`), on the
worker thread (the watcher's `submit`). See docs/gpu.md.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from gpujobd.daemon.gpu.attribution import Attribution, Identity, ProcInfo, ProcPort
from gpujobd.daemon.gpu.worker import Done, Steps
from gpujobd.shared.config import Config
from gpujobd.shared.log import get_logger
from gpujobd.shared.model import job_id_from_unit

log = get_logger()

DEFAULT_UID_MIN = 1000
KILL_ESCALATION_SIGNAL = signal.SIGKILL
COMMAND_LOG_CHARS = 200


# --- the pidfd kill -----------------------------------------------------------------------------------


def kill_verified(procs: ProcPort, pid: int, expected: Identity, signum: int, *,
                  pidfd_open: Optional[Callable[[int], int]] = getattr(os, "pidfd_open", None),
                  send: Optional[Callable[[int, int], None]] = getattr(signal, "pidfd_send_signal", None),
                  close: Callable[[int], None] = os.close) -> Tuple[bool, str]:
    """Signal `pid` only if it is still the process judged, with no PID-reuse race.

    pidfd_open pins whatever process has the PID now; /proc is read after that, and the signal goes
    through the pidfd: if the judged process exited before the open and the PID was reused, the
    identity (uid, start time, cgroup) differs and nothing is sent; if it exits after the check, the
    pidfd still names it, and the signal finds no one (ESRCH) rather than a newcomer."""
    if pid <= 1:
        return False, f"refused: PID {pid} is never signalled"
    if pidfd_open is None or send is None:
        return False, "this Python or kernel has no pidfd_open/pidfd_send_signal: not signalled"
    try:
        fd = pidfd_open(pid)
    except ProcessLookupError:
        return False, "the process had already exited"
    except OSError as err:
        return False, f"pidfd_open failed: {err.strerror or err}"
    try:
        now = procs.identity(pid)
        if now is None:
            return False, "the process had already exited"
        if now != expected:
            return False, (f"PID {pid} is no longer the process judged (now uid {now.uid}, start "
                           f"{now.start_ticks}, cgroup {now.cgroup}): not signalled")
        try:
            send(fd, signum)
        except ProcessLookupError:
            return False, "the process had already exited"
        except OSError as err:
            return False, f"pidfd_send_signal failed: {err.strerror or err}"
        return True, f"sent {signal.Signals(signum).name} through a pidfd"
    finally:
        close(fd)


# --- the kill policy ---------------------------------------------------------------------------------

KILL = "kill"
WAIT = "wait"
SPARE = "spare"


@dataclass(frozen=True)
class Verdict:
    action: str  # kill, wait (not yet: grace or ticks), spare (never, by a rule)
    why: str
    rule: str = ""  # for a kill: the rules that matched


def kill_verdict(info: ProcInfo, unit: Optional[str], *, stray_for_s: float, ticks: int, config: Config,
                 daemon_pid: int, uid_min: int) -> Verdict:
    """Whether a stray is killed now. Never: PID 0 or 1, the daemon, root's processes (real or
    effective uid 0), system accounts (uid < UID_MIN), a process in a unit other than init.scope or
    an ended job's scope, one whose cgroup is unknown. Then only if every admin rule matches
    (gpu.stray_kill_users, gpu.stray_kill_orphans_only), and not before gpu.stray_grace_s and
    gpu.stray_kill_min_ticks."""
    gpu = config.gpu
    pid = info.pid
    if pid <= 1:
        return Verdict(SPARE, f"PID {pid} is never killed")
    if pid == daemon_pid:
        return Verdict(SPARE, "it is gpujobd itself")
    if info.uid == 0 or info.euid == 0:
        return Verdict(SPARE, "root's processes are never killed")
    if info.uid < uid_min:
        return Verdict(SPARE, f"uid {info.uid} is a system account (below UID_MIN {uid_min}): "
                              "system services' processes are never killed")
    if info.cgroup is None:
        return Verdict(SPARE, "its cgroup is unknown")
    if unit is not None and unit != "init.scope" and job_id_from_unit(unit) is None:
        return Verdict(SPARE, f"it belongs to the unit {unit}")
    rules = []
    if gpu.stray_kill_users:
        if info.user not in gpu.stray_kill_users:
            return Verdict(SPARE, f"user {info.user} is not in gpu.stray_kill_users")
        rules.append(f"user {info.user} is in gpu.stray_kill_users")
    else:
        rules.append("gpu.stray_kill_users is empty (any user)")
    if gpu.stray_kill_orphans_only:
        orphan, why = is_orphan(info)
        if not orphan:
            return Verdict(SPARE, f"gpu.stray_kill_orphans_only: {why}")
        rules.append(f"gpu.stray_kill_orphans_only: {why}")
    else:
        rules.append("gpu.stray_kill_orphans_only = false")
    if stray_for_s < gpu.stray_grace_s:
        return Verdict(WAIT, f"stray for {stray_for_s:.0f} s of gpu.stray_grace_s {gpu.stray_grace_s:g} s")
    if ticks < gpu.stray_kill_min_ticks:
        return Verdict(WAIT, f"seen on {ticks} of gpu.stray_kill_min_ticks {gpu.stray_kill_min_ticks} polls")
    return Verdict(KILL, f"stray for {stray_for_s:.0f} s over {ticks} polls", "; ".join(rules))


def is_orphan(info: ProcInfo) -> Tuple[bool, str]:
    """Parent is PID 1, or a recognised subreaper. The kernel does not show PR_SET_CHILD_SUBREAPER in
    /proc, so the one recognised is a `systemd` process (a user's service manager)."""
    if info.ppid == 1:
        return True, "its parent is PID 1"
    if info.ppid > 1 and info.parent_comm == "systemd":
        return True, f"its parent is a subreaper (PID {info.ppid}, systemd)"
    what = f"{info.parent_comm}, " if info.parent_comm else ""
    return False, f"its parent (PID {info.ppid}, {what}alive) is not PID 1 or a subreaper"


def system_uid_min(path: str = "/etc/login.defs") -> int:
    """UID_MIN of login.defs: the first uid of a person's account (default 1000)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "UID_MIN" and parts[1].isdigit():
                    return int(parts[1])
    except OSError:
        pass
    return DEFAULT_UID_MIN


# --- the strays, across ticks --------------------------------------------------------------------------


@dataclass
class _Stray:
    info: ProcInfo
    attribution: Attribution
    first_seen_mono: float
    first_seen_at: float
    gpus: Dict[str, int] = field(default_factory=dict)
    gpu_indexes: List[int] = field(default_factory=list)
    ticks: int = 1
    action: str = "report"
    spared_logged: bool = False
    kill_method: str = ""  # set once a kill was started: "systemd-stop" or "pidfd"
    term_sent_mono: Optional[float] = None
    escalated: bool = False
    rule: str = ""  # the rules that matched, once a kill was started


_KillOrder = Tuple[_Stray, int, str, str]  # the stray, the signal, why, by which rules

Seen = Tuple[ProcInfo, Attribution, Dict[str, int], List[int]]  # info, attribution, gpus, GPU indexes


def stray_key(info: ProcInfo) -> Tuple[int, int]:
    return info.pid, info.start_ticks


class Strays:
    """The strays of the latest readings, by (PID, start time), and the kill policy applied to them.
    Lives on the main loop; the pidfd kills run through `submit` (the watcher's worker)."""

    def __init__(self, config: Config, *, procs: ProcPort, stop_unit: Callable[[str], None], daemon_pid: int,
                 uid_min: int, clock: Callable[[], float], monotonic: Callable[[], float],
                 kill: Callable[..., Tuple[bool, str]], submit: Callable[[Callable[[Steps], Any]], bool],
                 on_found: Callable[[Dict[str, Any]], None], on_cleared: Callable[[Dict[str, Any]], None]):
        self._config = config
        self._procs = procs
        self._stop_unit = stop_unit
        self._daemon_pid = daemon_pid
        self._uid_min = uid_min
        self._clock = clock
        self._monotonic = monotonic
        self._kill = kill
        self._submit = submit
        self._on_found = on_found
        self._on_cleared = on_cleared
        self._strays: Dict[Tuple[int, int], _Stray] = {}
        self._seen: Optional[Mapping[Tuple[int, int], Seen]] = None  # the latest `track`'s

    def __len__(self) -> int:
        return len(self._strays)

    def restart_ticks(self) -> None:
        """A reading failed: "consecutive" starts again after the gap."""
        for stray in self._strays.values():
            stray.ticks = 0

    # -- one good reading ----------------------------------------------------------------------------
    def track(self, seen: Mapping[Tuple[int, int], Seen], now: float, mono: float) -> None:
        """This reading's strays (`seen`): new ones found, known ones one tick older, the rest cleared.

        `seen` is never changed once handed here: the watcher hands the very same mapping again when
        nothing changed, and then every stray it holds is known and nothing is cleared, so each is
        only one tick older."""
        if seen is self._seen:
            for known in self._strays.values():
                known.ticks += 1
            return
        self._seen = seen
        for key, (info, who, gpus, indexes) in seen.items():
            stray = self._strays.get(key)
            if stray is None:
                stray = _Stray(info=info, attribution=who, first_seen_mono=mono, first_seen_at=now,
                               gpus=gpus, gpu_indexes=indexes)
                self._strays[key] = stray
                view = self._stray_view(stray)
                log.warning("gpu.stray_found", **_log_fields(view))
                self._on_found(view)
            else:
                stray.info, stray.attribution, stray.gpus, stray.gpu_indexes = info, who, gpus, indexes
                stray.ticks += 1
        for key in [key for key in self._strays if key not in seen]:
            stray = self._strays.pop(key)
            view = self._stray_view(stray)
            view["cleared_because"] = ("killed" if stray.kill_method else "no longer on any GPU, or no "
                                                                          "longer stray")
            log.info("gpu.stray_cleared", pid=view["pid"], user=view.get("user"),
                     command=_short(view["command"]), cleared_because=view["cleared_because"],
                     stray_for_s=round(mono - stray.first_seen_mono, 1))
            self._on_cleared(view)

    # -- the kill policy -----------------------------------------------------------------------------
    def police(self, mono: float) -> None:
        orders: List[_KillOrder] = []
        for stray in self._strays.values():
            if stray.kill_method:
                order = self._escalation(stray, mono)
                if order is not None:
                    orders.append(order)
                continue
            verdict = kill_verdict(stray.info, stray.attribution.unit,
                                   stray_for_s=mono - stray.first_seen_mono, ticks=stray.ticks,
                                   config=self._config, daemon_pid=self._daemon_pid, uid_min=self._uid_min)
            if verdict.action == WAIT:
                stray.action = f"kill pending: {verdict.why}"
            elif verdict.action == SPARE:
                stray.action = f"spared: {verdict.why}"
                if not stray.spared_logged:
                    stray.spared_logged = True
                    log.info("gpu.stray_spared", pid=stray.info.pid, user=stray.info.user,
                             command=_short(stray.info.command), why=verdict.why)
            else:
                order = self._start_kill(stray, verdict)
                if order is not None:
                    orders.append(order)
        if orders:
            procs, kill = self._procs, self._kill

            def task(steps: Steps) -> List[Tuple[_Stray, int, bool, str, str, str]]:
                results = []
                for stray, signum, why, rule in orders:
                    with steps.step(f"/proc/{stray.info.pid} (kill)"):
                        ok, what = kill(procs, stray.info.pid, stray.info.identity, signum)
                    results.append((stray, signum, ok, what, why, rule))
                return results

            if not self._submit(task):
                log.warning("gpu.stray_kill_deferred", reason="the worker is busy", strays=len(orders))
                for stray, _, _, _ in orders:
                    stray.kill_method, stray.term_sent_mono = "", None

    def _start_kill(self, stray: _Stray, verdict: Verdict) -> Optional[_KillOrder]:
        unit = stray.attribution.unit
        fields = dict(_log_fields(self._stray_view(stray)), why=verdict.why, rule=verdict.rule)
        if unit is not None and job_id_from_unit(unit) is not None:
            stray.kill_method = "systemd-stop"
            stray.action = f"killed: systemd stops {unit} ({verdict.rule})"
            try:
                self._stop_unit(unit)
            except Exception as err:
                log.error("gpu.stray_kill_failed", method="systemd-stop", error=str(err), **fields)
                stray.action = f"kill failed: {err}"
                return None
            log.warning("gpu.stray_killed", method="systemd-stop", signal="SIGTERM, then SIGKILL "
                        "after the scope's stop timeout", **fields)
            return None
        stray.kill_method = "pidfd"
        stray.rule = verdict.rule
        stray.term_sent_mono = self._monotonic()
        stray.action = f"killing: SIGTERM ({verdict.rule})"
        return stray, signal.SIGTERM, verdict.why, verdict.rule

    def _escalation(self, stray: _Stray, mono: float) -> Optional[_KillOrder]:
        if stray.kill_method != "pidfd" or stray.escalated or stray.term_sent_mono is None:
            return None
        if mono - stray.term_sent_mono < self._config.jobs.stop_timeout_s:
            return None
        stray.escalated = True
        stray.action = "killing: SIGKILL (SIGTERM was ignored)"
        return stray, KILL_ESCALATION_SIGNAL, (f"still running {mono - stray.term_sent_mono:.0f} s after "
                                               "SIGTERM (jobs.stop_timeout_s)"), stray.rule

    def kills_done(self, done: Done) -> None:
        """The pidfd kills' results, back on the main loop (unless the call was declared hung)."""
        if done.error is not None:
            log.error("gpu.stray_kill_failed", error=f"{type(done.error).__name__}: {done.error}")
            return
        for stray, signum, ok, what, why, rule in done.value:
            fields = dict(_log_fields(self._stray_view(stray)), method="pidfd",
                          signal=signal.Signals(signum).name, why=why, rule=rule)
            if ok:
                log.warning("gpu.stray_killed", result=what, **fields)
            else:
                stray.action = f"not killed: {what}"
                log.warning("gpu.stray_kill_failed", result=what, **fields)

    # -- what the watcher reports --------------------------------------------------------------------
    def views(self) -> List[Dict[str, Any]]:
        return [self._stray_view(stray) for stray in self._strays.values()]

    def on_gpus(self, chosen: Collection[int]) -> List[Dict[str, Any]]:
        """The strays holding memory on any of the GPUs `chosen` (indexes), with those GPUs only."""
        out = []
        for stray in self._strays.values():
            indexes = [index for index in stray.gpu_indexes if index in chosen]
            if indexes:
                view = self._stray_view(stray)
                view["gpu_indexes"] = indexes
                out.append(view)
        return out

    def _stray_view(self, stray: _Stray) -> Dict[str, Any]:
        info = stray.info
        view: Dict[str, Any] = {
            "pid": info.pid, "ppid": info.ppid, "user": info.user, "uid": info.uid,
            "command": list(info.command), "cgroup": info.cgroup or "", "gpus": dict(stray.gpus),
            "gpu_indexes": list(stray.gpu_indexes), "used_memory_bytes": sum(stray.gpus.values()),
            "started_at": info.started_at, "age_s": max(0.0, self._clock() - info.started_at),
            "first_seen_at": stray.first_seen_at, "ticks": stray.ticks, "action": stray.action,
            "note": stray.attribution.note,
        }
        if stray.attribution.unit:
            view["unit"] = stray.attribution.unit
        return view


def _short(command: List[str] | Tuple[str, ...]) -> str:
    text = " ".join(command)
    return text if len(text) <= COMMAND_LOG_CHARS else text[:COMMAND_LOG_CHARS - 3] + "..."


def _log_fields(view: Mapping[str, Any]) -> Dict[str, Any]:
    return {"pid": view["pid"], "ppid": view["ppid"], "user": view["user"], "uid": view["uid"],
            "command": _short(view["command"]), "cgroup": view["cgroup"], "unit": view.get("unit"),
            "gpus": view["gpus"], "used_memory_bytes": view["used_memory_bytes"],
            "age_s": round(view["age_s"], 1), "note": view["note"]}


def describe_strays(strays: Sequence[Mapping[str, Any]]) -> str:
    """'GPU 0 is held by a stray process: PID 4242 of bob, `python x.py`, 1.5 GiB, ...'."""
    parts = []
    for stray in strays:
        gpus = ", ".join(str(index) for index in stray.get("gpu_indexes", [])) or "?"
        command = " ".join(stray.get("command", []))
        command = command if len(command) <= 120 else command[:117] + "..."
        where = stray.get("unit") or stray.get("cgroup") or "no unit"
        parts.append(f"GPU {gpus} is held by a stray process: PID {stray.get('pid')} of "
                     f"{stray.get('user')}, `{command}`, {_size(stray.get('used_memory_bytes'))} "
                     f"of GPU memory, in {where}")
    return "; ".join(parts)


def _size(count: Optional[int]) -> str:
    if not count:
        return "unknown"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"
