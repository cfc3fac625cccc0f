"""The configuration's declaration: its sections and keys, each with its default, type, range and doc.

Every key is declared once, as a field of its section's dataclass with `spec()` as its metadata:
default, type (the type of the default), range or choices, and a one-line doc. `SETTINGS` is that
table; gpujobd.shared.config_toml (the strict parser, `dump_toml()`, `default_config_text()`: the
shipped packaging/gpujobd.toml) and the tests of docs/configuration.md are all driven by it.

Every timing constant of gpujobd is a key here, with its default and doc.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Tuple, Type

_SPEC = "gpujobd.setting"


@dataclass(frozen=True)
class Spec:
    """What a key accepts besides its type, and what it means."""

    doc: str
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    choices: Tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None  # on the value, or on each item of a list
    expect: str = ""  # what `check` wants, for messages and docs
    item_expect: str = ""  # the same for one item of a list
    at_least: str = ""  # another key of the same section this one may not be below


def spec(doc: str, **constraints: Any) -> Dict[str, Spec]:
    """The metadata of a key's dataclass field: its one-line doc and the constraints of `Spec`."""
    return {_SPEC: Spec(doc, **constraints)}


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)
    return lambda value: compiled.fullmatch(value) is not None


def _is_slice_name(value: str) -> bool:
    if not value.endswith(".slice") or len(value) > 255:
        return False
    parts = value[: -len(".slice")].split("-")
    return all(re.fullmatch(r"[A-Za-z0-9:_.]+", part) for part in parts)


def _is_search_path(value: str) -> bool:
    return all(part.startswith("/") for part in value.split(":"))


def _is_umask(value: str) -> bool:
    return re.fullmatch(r"[0-7]{3,4}", value) is not None and int(value, 8) <= 0o777


_is_property_setting = _matches(r"[A-Z][A-Za-z0-9]*=[^\x00-\x1f\x7f]+")
_is_account_name = _matches(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
_is_property_name = _matches(r"[A-Z][A-Za-z0-9]*")

LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
STRAY_POLICIES = ("report", "kill")
PRESTART_CHECKS = ("off", "refuse", "wait")


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = field(
        default=Path("/var/lib/gpujobd"), metadata=spec("Directory of the daemon's state (job database)."),
    )
    log_dir: Path = field(
        default=Path("/var/log/gpujobd"),
        metadata=spec("Directory of logs; job output goes to its jobs/ subdirectory."),
    )
    admin_group: str = field(default="gpujob-admin", metadata=spec(
        "Members of this group may act on every user's jobs.", check=_is_account_name, expect="a group name",
    ))
    slice: str = field(default="gpujob.slice", metadata=spec(
        "Slice every job's scope is placed in.",
        check=_is_slice_name, expect='a slice unit name ending in ".slice"',
    ))
    per_user_slices: bool = field(default=False, metadata=spec(
        "Put each user's jobs in a sub-slice of the slice, <slice>-u<UID>.slice, so that ceilings set "
        "on it (a <slice>-.slice.d/ drop-in applies to every user's) bound each user's jobs together.",
    ))
    log_format: str = field(default="console", metadata=spec(
        "Daemon log format: key=value lines or JSON objects.", choices=LOG_FORMATS,
    ))
    log_level: str = field(default="info", metadata=spec(
        "Least severe daemon log level that is written.", choices=LOG_LEVELS,
    ))
    start_timeout_s: float = field(default=10.0, metadata=spec(
        "How long the daemon waits for a job's scope to become active.", above=0,
    ))
    unit_match_rules_max: int = field(default=400, metadata=spec(
        "Bus match rules the daemon adds for its own units' signals; past it, one rule for all units.",
        minimum=1,
    ))
    systemd_calls_in_flight_max: int = field(default=64, metadata=spec(
        "Calls to systemd the daemon has in flight at once; more wait their turn in order.",
        minimum=1,
    ))
    starts_in_flight_max: int = field(default=64, metadata=spec(
        "Jobs the daemon starts at once, from leaving the queue until their scope is active; more "
        "wait queued, in their place. Each holds up to four of the daemon's file descriptors.",
        minimum=1, maximum=200,
    ))
    zygote_timeout_s: float = field(default=5.0, metadata=spec(
        "How long the daemon waits for the supervisor zygote to start a job's supervisor before it "
        "starts a new zygote.", above=0,
    ))
    systemd_call_timeout_s: float = field(default=25.0, metadata=spec(
        "How long the daemon waits for systemd to answer one call (a scope's start or stop, a unit "
        "list) before it counts the call failed.", above=0,
    ))
    caller_lookup_timeout_s: float = field(default=5.0, metadata=spec(
        "How long the daemon waits for the bus to say which user a new caller is; past it the call "
        "is denied.", above=0,
    ))
    db_busy_timeout_s: float = field(default=5.0, metadata=spec(
        "How long a write to the job database waits for a lock another connection holds (an admin's "
        "sqlite3 shell) before it fails.", above=0,
    ))
    reconcile_on_start: bool = field(default=True, metadata=spec(
        "At start, reconcile recorded jobs with the scopes systemd has.",
    ))

    @property
    def job_log_dir(self) -> Path:
        return self.log_dir / "jobs"


@dataclass(frozen=True)
class JobsConfig:
    stop_timeout_s: float = field(default=10.0, metadata=spec(
        "Grace between SIGTERM and SIGKILL on stop; set as TimeoutStopSec= on each scope.", above=0,
    ))
    default_max_runs: int = field(default=10, metadata=spec(
        "Runs of a background loop job when none are asked for.", minimum=1,
    ))
    max_runs_limit: int = field(default=1000, metadata=spec(
        "Most runs a background loop job may ask for.", minimum=1, at_least="default_max_runs",
    ))
    restart_delay_s: float = field(default=2.0, metadata=spec(
        "Pause between two runs of a background loop job.", minimum=0,
    ))
    max_timeout_s: float = field(default=0.0, metadata=spec(
        "Largest --timeout a job may ask for; 0 means no limit.", minimum=0,
    ))
    default_path: str = field(
        default="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        metadata=spec(
            "PATH given to a job whose environment has none.",
            check=_is_search_path, expect="absolute directories separated by ':'",
        ),
    )
    umask: str = field(default="0022", metadata=spec(
        "Umask a job's processes start with (octal).",
        check=_is_umask, expect='an octal umask such as "0022"',
    ))
    allowed_properties: Tuple[str, ...] = field(
        default=("MemoryMax", "MemoryHigh", "MemorySwapMax", "CPUQuota", "CPUWeight", "AllowedCPUs",
                 "TasksMax", "IOWeight"),
        metadata=spec(
            "systemd scope properties a user may set on a job.",
            check=_is_property_name, expect="a list of systemd property names",
            item_expect='a systemd property name such as "MemoryMax"',
        ),
    )
    log_read_max_bytes: int = field(default=1048576, metadata=spec(
        "Most bytes of job output one ReadLog call returns.", minimum=4096, maximum=67108864,
    ))
    recent_window_s: float = field(default=3600.0, metadata=spec(
        "A list without --all shows active jobs and jobs that ended this recently.", minimum=0,
    ))
    max_argv_bytes: int = field(default=131072, metadata=spec(
        "Most bytes a job's command line may have (its words and their NULs).", minimum=1024,
        maximum=16777216,
    ))
    max_cwd_bytes: int = field(default=4096, metadata=spec(
        "Most bytes a job's working directory may have.", minimum=256, maximum=65536,
    ))
    max_env_bytes: int = field(default=262144, metadata=spec(
        "Most bytes a job's environment may have in all (every NAME=VALUE and its NUL).",
        minimum=4096, maximum=16777216,
    ))
    max_property_bytes: int = field(default=256, metadata=spec(
        "Most bytes the value of one --property may have.", minimum=16, maximum=65536,
    ))
    max_spec_bytes: int = field(default=2097152, metadata=spec(
        "Most bytes a whole job spec may have (command, directory, environment, name, properties).",
        minimum=8192, maximum=16777216,
    ))
    log_max_bytes: int = field(default=1073741824, metadata=spec(
        "Most bytes of output one job's log keeps; past it the log says so and the rest is dropped "
        "(the job runs on). 0 means no cap.", minimum=0,
    ))
    log_drain_s: float = field(default=1.0, metadata=spec(
        "After a job's last run, how long its supervisor goes on copying output still in the log's "
        "pipe (a leftover process may hold the pipe open) before it writes the exit record.",
        minimum=0, maximum=3600,
    ))
    default_properties: Tuple[str, ...] = field(default=(), metadata=spec(
        "Properties every job's scope gets unless the job sets them (NAME=VALUE, e.g. MemoryMax=64G).",
        check=_is_property_setting, expect="a list of NAME=VALUE", item_expect='"NAME=VALUE"',
    ))
    max_properties: Tuple[str, ...] = field(default=(), metadata=spec(
        "Ceilings of per-job properties (NAME=VALUE): a job asking for more, or for infinity, is "
        "refused. Only MemoryMax, MemoryHigh, MemorySwapMax, TasksMax and CPUQuota take a ceiling.",
        check=_is_property_setting, expect="a list of NAME=VALUE", item_expect='"NAME=VALUE"',
    ))

    @property
    def umask_int(self) -> int:
        return int(self.umask, 8)

    @property
    def timeout_limit_s(self) -> float | None:
        """The largest --timeout allowed, or None when there is no limit."""
        return self.max_timeout_s or None


@dataclass(frozen=True)
class LimitsConfig:
    max_active_jobs_per_user: int = field(default=1000, metadata=spec(
        "Most jobs one user may have queued, starting, running or stopping at once; a submit beyond "
        "it is refused (this protects the daemon; 0 means no cap).", minimum=0,
    ))
    min_free_mib: int = field(default=256, metadata=spec(
        "Submits are refused while the log or state filesystem has less free space than this (MiB).",
        minimum=0,
    ))
    db_reserve_mib: int = field(default=8, metadata=spec(
        "Space (MiB) kept in a ballast file beside the job database, given up when the disk is full "
        "so that the ends of running jobs are still recorded. 0 keeps none.", minimum=0, maximum=1024,
    ))
    disk_check_interval_s: float = field(default=5.0, metadata=spec(
        "How often the daemon looks at the state filesystem's free space: below 1 MiB it gives up the "
        "reserve (room for the exit records and the database), above limits.min_free_mib it takes it "
        "again.", above=0,
    ))


@dataclass(frozen=True)
class RetentionConfig:
    keep_days: int = field(default=0, metadata=spec(
        "Ended jobs (their records, runs and logs) that ended more than this many days ago are pruned; "
        "0 keeps them for ever. Jobs that have not ended are never pruned.", minimum=0,
    ))
    interval_s: float = field(default=3600.0, metadata=spec(
        "How often the daemon prunes, when retention.keep_days is set.", minimum=60,
    ))


@dataclass(frozen=True)
class GpuConfig:
    watch: bool = field(default=True, metadata=spec("Watch the GPUs for processes that belong to no job."))
    poll_interval_s: float = field(default=5.0, metadata=spec(
        "How often the GPUs' processes are listed.", minimum=0.1,
    ))
    nvml_call_timeout_s: float = field(default=2.0, metadata=spec(
        "How long one NVML call may take before it counts as hung.", above=0,
    ))
    busy_recheck_s: float = field(default=1.0, metadata=spec(
        "While the watcher's worker still kills a stray, how soon the watcher looks again (at most "
        "poll_interval_s).", above=0,
    ))
    retry_initial_s: float = field(default=5.0, metadata=spec(
        "First wait before NVML is tried again after it failed.", above=0,
    ))
    retry_max_s: float = field(default=300.0, metadata=spec(
        "Longest wait between NVML retries (the wait doubles up to this).", above=0,
        at_least="retry_initial_s",
    ))
    stray_policy: str = field(default="report", metadata=spec(
        "What to do about a stray GPU process: log it, or kill it.", choices=STRAY_POLICIES,
    ))
    stray_grace_s: float = field(default=60.0, metadata=spec(
        "With policy kill, how long a stray must have been seen (since it was first found) before "
        "it may be killed.", minimum=0,
    ))
    stray_kill_min_ticks: int = field(default=3, metadata=spec(
        "With policy kill, polls in a row a process must be seen stray before it may be killed.",
        minimum=1,
    ))
    stray_kill_users: Tuple[str, ...] = field(default=(), metadata=spec(
        "With policy kill, kill only strays whose real user is one of these (empty: any user but "
        "root and system accounts, who are never killed).",
        check=_is_account_name, expect="a list of user names", item_expect="a user name",
    ))
    stray_kill_orphans_only: bool = field(default=True, metadata=spec(
        "With policy kill, kill only orphans: strays whose parent is PID 1 or a systemd subreaper.",
    ))
    prestart_check: str = field(default="off", metadata=spec(
        "Before a job starts, if a stray holds its GPUs: start anyway, refuse the job, or wait "
        "(queued) for the GPUs; a job's own gpu_check overrides it.", choices=PRESTART_CHECKS,
    ))
    prestart_wait_s: float = field(default=300.0, metadata=spec(
        "How long a job waits, queued, for strays to leave its GPUs before it fails.", above=0,
    ))

    @property
    def kills_strays(self) -> bool:
        return self.stray_policy == "kill"


JOBS_WITHOUT_GPUS = ("none", "unrestricted")
# What CUDA opens besides the GPUs' own /dev/nvidiaN (docs/gpu.md): the control device, unified
# memory and its tools, modesetting, and the MIG capability devices (a major of their own).
CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset",
                   "char-nvidia-caps")


def _is_device(value: str) -> bool:
    return re.fullmatch(r"/dev/[^\s]+|(char|block)-[A-Za-z0-9_.*-]+", value) is not None


@dataclass(frozen=True)
class SchedulerConfig:
    max_gpus_per_user: int = field(default=0, metadata=spec(
        "GPUs one user's running jobs may hold at once (0: unlimited); their other jobs wait queued.",
        minimum=0,
    ))
    max_jobs_per_user: int = field(default=0, metadata=spec(
        "Jobs of one user that may run at once, with GPUs or without (0: unlimited).", minimum=0,
    ))
    gpu_release_timeout_s: float = field(default=30.0, metadata=spec(
        "After a job ends, how long its GPUs wait for NVML to show none of its processes on them "
        "before they return to the pool anyway (a process still there is a stray, as always).",
        minimum=0,
    ))
    jobs_without_gpus: str = field(default="none", metadata=spec(
        "A job submitted without --gpus: sees no GPU (none: CUDA_VISIBLE_DEVICES is empty and the "
        "device cgroup lets it open no /dev/nvidiaN), or whatever it likes (unrestricted: neither is "
        "set, so it can open GPUs that other jobs hold).", choices=JOBS_WITHOUT_GPUS,
    ))
    isolate_devices: bool = field(default=True, metadata=spec(
        "Give every job's scope a device cgroup (DevicePolicy=closed): the standard pseudo devices, "
        "its own GPUs' /dev/nvidiaN and control_devices; false trusts CUDA_VISIBLE_DEVICES alone.",
    ))
    control_devices: Tuple[str, ...] = field(default=CONTROL_DEVICES, metadata=spec(
        "Devices a job with GPUs may also open (read-write): paths, or char-GROUP / block-GROUP as "
        "in /proc/devices. Add e.g. /dev/infiniband/uverbs0 for GPUDirect RDMA.",
        check=_is_device, expect="a list of devices", item_expect="a /dev path or char-GROUP",
    ))


@dataclass(frozen=True)
class ClientConfig:
    follow_poll_interval_s: float = field(default=0.25, metadata=spec(
        "How often `gpujobctl logs -f` asks for new output.", above=0,
    ))
    call_timeout_s: float = field(default=30.0, metadata=spec(
        "How long gpujobctl waits for the daemon to answer a call.", above=0,
    ))
    restart_grace_s: float = field(default=60.0, metadata=spec(
        "How long `gpujobctl logs -f` and `wait` keep trying while the daemon is away (a restart).",
        minimum=0,
    ))
    wait_resync_interval_s: float = field(default=60.0, metadata=spec(
        "How often `gpujobctl wait` reads the job again though no signal came (a signal lost in a "
        "daemon restart).", above=0,
    ))


@dataclass(frozen=True)
class SubmititConfig:
    """The submitit executor's own timings (client side: read by the submitting process)."""

    watcher_max_delay_s: float = field(default=5.0, metadata=spec(
        "The longest pause between two state reads of a submitit job without a result.", above=0,
    ))
    affinity_timeout_s: float = field(default=2.0, metadata=spec(
        "How long AutoExecutor's question 'does gpujobd run here?' may take.", above=0,
    ))
    signal_delay_s: float = field(default=90.0, metadata=spec(
        "How long before a job's timeout its checkpoint signal comes (submitit's signal_delay_s).",
        minimum=0,
    ))


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    submitit: SubmititConfig = field(default_factory=SubmititConfig)


SECTIONS: Mapping[str, Type[Any]] = {
    f.name: f.default_factory for f in dataclasses.fields(Config)  # type: ignore[misc]
}


@dataclass(frozen=True)
class Setting:
    """One row of the table: a key of a section."""

    section: str
    name: str
    default: Any
    spec: Spec

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def doc(self) -> str:
        return self.spec.doc

    @property
    def expected(self) -> str:
        """What the key accepts, in words: 'a number > 0', 'one of "report", "kill"'."""
        return _expected(self)


def _table() -> Tuple[Setting, ...]:
    rows = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append(Setting(section, f.name, f.default, f.metadata[_SPEC]))
    return tuple(rows)


SETTINGS: Tuple[Setting, ...] = _table()
BY_SECTION: Dict[str, Dict[str, Setting]] = {
    section: {s.name: s for s in SETTINGS if s.section == section} for section in SECTIONS
}


# --- describing values -------------------------------------------------------------------------------

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a list of strings"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _expected(s: Setting) -> str:
    spec = s.spec
    if spec.choices:
        return "one of " + ", ".join(f'"{c}"' for c in spec.choices)
    if issubclass(s.kind, Path):
        return "an absolute path"
    words = spec.expect or _KIND_WORDS[s.kind]
    bounds = []
    if spec.minimum is not None and spec.maximum is not None:
        bounds.append(f"from {_number(spec.minimum)} to {_number(spec.maximum)}")
    elif spec.minimum is not None:
        bounds.append(f">= {_number(spec.minimum)}")
    elif spec.maximum is not None:
        bounds.append(f"<= {_number(spec.maximum)}")
    if spec.above is not None:
        bounds.append(f"> {_number(spec.above)}")
    if spec.at_least:
        bounds.append(f">= {s.section}.{spec.at_least}")
    return " ".join([words, " and ".join(bounds)]) if bounds else words
