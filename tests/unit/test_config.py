"""The configuration: the table, the shipped file and the docs agree; bad files are refused in full."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gpujobd.shared import config, config_file, config_toml, log
from gpujobd.shared.config import SETTINGS, Config
from gpujobd.shared.config_toml import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_config, resolve_config_path
from gpujobd.shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "packaging" / "gpujobd.toml"
DOCS = ROOT / "docs" / "configuration.md"
COMMENTED_KEY = re.compile(r"^# ([a-z_][a-z0-9_]*) = ", re.MULTILINE)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)


def write(tmp_path: Path, text: str, name: str = "gpujobd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    return message


# --- the table, the shipped file and the docs ------------------------------------------------------


def test_defaults_pass_their_own_checks():
    data: dict = {}
    for s in SETTINGS:
        value = list(s.default) if isinstance(s.default, tuple) else s.default
        data.setdefault(s.section, {})[s.name] = str(value) if isinstance(value, Path) else value
    assert config_toml.config_from_mapping(data) == Config()


def test_every_key_has_a_one_line_doc_and_every_time_ends_in_s():
    for s in SETTINGS:
        assert s.doc and "\n" not in s.doc, s.dotted
        assert (s.kind is float) == s.name.endswith("_s"), s.dotted


def test_shipped_file_is_generated_from_the_table():
    assert SHIPPED.read_text() == config_toml.default_config_text(), (
        "packaging/gpujobd.toml is out of date; regenerate it with: python -c "
        "'from gpujobd.shared.config_toml import default_config_text; "
        "print(default_config_text(), end=\"\")' > packaging/gpujobd.toml"
    )


def test_shipped_file_as_is_gives_the_defaults():
    assert load_config(SHIPPED) == Config()


def test_shipped_file_uncommented_gives_the_defaults(tmp_path):
    text = SHIPPED.read_text()
    uncommented = COMMENTED_KEY.sub(r"\1 = ", text)
    keys = re.findall(r"^([a-z_][a-z0-9_]*) = ", uncommented, re.MULTILINE)
    assert sorted(keys) == sorted(s.name for s in SETTINGS)
    assert load_config(write(tmp_path, uncommented)) == Config()


def test_docs_list_every_key_with_its_default_and_range():
    lines = DOCS.read_text().splitlines()
    for s in SETTINGS:
        rows = [line for line in lines if line.startswith(f"| `{s.dotted}` |")]
        assert len(rows) == 1, f"docs/configuration.md has no single table row for {s.dotted}"
        assert f"`{config_toml.toml_value(s.default)}`" in rows[0], f"{s.dotted}: default differs in the docs"
        assert f"| {s.expected} |" in rows[0], f"{s.dotted}: docs should say it accepts {s.expected}"


def test_docs_name_the_path_resolution():
    text = DOCS.read_text()
    for needle in ("--config", CONFIG_ENV, str(DEFAULT_CONFIG_PATH), "--check-config"):
        assert needle in text


def test_log_choices_match_the_logging_module():
    assert config.LOG_FORMATS == log.FORMATS
    assert config.LOG_LEVELS == log.LEVELS


# --- values --------------------------------------------------------------------------------------------


def test_values_are_read_into_typed_dataclasses(tmp_path):
    path = write(tmp_path, """
[daemon]
state_dir = "/srv/gpujobd"
log_format = "json"
[jobs]
stop_timeout_s = 5
umask = "0027"
allowed_properties = ["MemoryMax"]
[gpu]
stray_kill_users = ["alice", "bob"]
""")
    loaded = load_config(path)
    assert loaded.daemon.state_dir == Path("/srv/gpujobd")
    assert loaded.daemon.job_log_dir == Path("/var/log/gpujobd/jobs")
    assert loaded.daemon.log_format == "json"
    assert loaded.jobs.stop_timeout_s == 5.0 and isinstance(loaded.jobs.stop_timeout_s, float)
    assert loaded.jobs.umask_int == 0o027
    assert loaded.jobs.allowed_properties == ("MemoryMax",)
    assert loaded.gpu.stray_kill_users == ("alice", "bob")
    assert loaded.jobs.max_runs_limit == 1000  # untouched keys keep their defaults


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().jobs.stop_timeout_s = 1.0  # type: ignore[misc]


def test_max_timeout_zero_means_no_limit():
    assert Config().jobs.timeout_limit_s is None
    assert dataclasses.replace(Config().jobs, max_timeout_s=60.0).timeout_limit_s == 60.0


def test_dump_toml_round_trips(tmp_path):
    changed = Config(
        daemon=dataclasses.replace(Config().daemon, state_dir=Path('/srv/odd "dir"'), log_level="debug"),
        jobs=dataclasses.replace(Config().jobs, stop_timeout_s=2.5, allowed_properties=("CPUQuota",)),
        gpu=dataclasses.replace(Config().gpu, stray_kill_users=("alice",), watch=False),
    )
    text = config_toml.dump_toml(changed)
    for s in SETTINGS:
        assert f"\n{s.name} = " in "\n" + text, s.dotted
    assert load_config(write(tmp_path, text)) == changed


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one(tmp_path):
    message = error_of(tmp_path, "[jobs]\nstop_timout_s = 5\n")
    assert "jobs.stop_timout_s: unknown key; did you mean jobs.stop_timeout_s?" in message


def test_key_in_the_wrong_section_is_pointed_to_the_right_one(tmp_path):
    message = error_of(tmp_path, "[daemon]\nstop_timeout_s = 5\n")
    assert "daemon.stop_timeout_s: unknown key; did you mean jobs.stop_timeout_s?" in message


def test_unknown_section_suggests_the_right_one(tmp_path):
    assert "[gpus]: unknown section; did you mean [gpu]?" in error_of(tmp_path, "[gpus]\nwatch = true\n")


def test_section_that_is_not_a_table(tmp_path):
    assert "[jobs]: expected a table" in error_of(tmp_path, "jobs = 5\n")


@pytest.mark.parametrize(("text", "expected"), [
    ("[jobs]\nstop_timeout_s = true\n", "jobs.stop_timeout_s: expected a number > 0, got true"),
    ('[jobs]\nstop_timeout_s = "10"\n', 'jobs.stop_timeout_s: expected a number > 0, got "10"'),
    ("[jobs]\ndefault_max_runs = 10.0\n", "jobs.default_max_runs: expected an integer >= 1, got 10.0"),
    ("[gpu]\nwatch = 1\n", "gpu.watch: expected true or false, got 1"),
    ("[jobs]\numask = 22\n", 'jobs.umask: expected an octal umask such as "0022", got 22'),
    ('[jobs]\nallowed_properties = "MemoryMax"\n', "jobs.allowed_properties: expected a list"),
    ("[jobs]\nallowed_properties = [1]\n", "jobs.allowed_properties[0]: expected a string, got 1"),
    ("[daemon]\nstate_dir = 7\n", "daemon.state_dir: expected an absolute path, got 7"),
])
def test_wrong_type(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(("text", "expected"), [
    ("[jobs]\nstop_timeout_s = 0\n", "jobs.stop_timeout_s: expected a number > 0, got 0.0"),
    ("[jobs]\nstop_timeout_s = inf\n", "jobs.stop_timeout_s: expected a number > 0, got inf"),
    ("[gpu]\npoll_interval_s = 0.05\n", "gpu.poll_interval_s: expected a number >= 0.1, got 0.05"),
    ("[jobs]\nlog_read_max_bytes = 100\n", "jobs.log_read_max_bytes: expected an integer from 4096 to"),
    ("[jobs]\nmax_timeout_s = -1\n", "jobs.max_timeout_s: expected a number >= 0, got -1.0"),
    ('[daemon]\nlog_level = "verbose"\n', 'daemon.log_level: expected one of "debug", "info"'),
    ('[gpu]\nstray_policy = "shoot"\n', 'gpu.stray_policy: expected one of "report", "kill", got "shoot"'),
    ('[daemon]\nslice = "gpujob"\n', "daemon.slice: expected a slice unit name"),
    ('[daemon]\nlog_dir = "var/log"\n', 'daemon.log_dir: expected an absolute path, got "var/log"'),
    ('[jobs]\numask = "0888"\n', "jobs.umask: expected an octal umask"),
    ('[jobs]\ndefault_path = "/bin:bin"\n', "jobs.default_path: expected absolute directories"),
    ('[jobs]\nallowed_properties = ["Memory Max"]\n', "jobs.allowed_properties[0]: expected a systemd"),
    ('[gpu]\nstray_kill_users = ["al ice"]\n', 'gpu.stray_kill_users[0]: expected a user name, got "al ice"'),
])
def test_out_of_range(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_cross_field_check(tmp_path):
    message = error_of(tmp_path, "[jobs]\ndefault_max_runs = 20\nmax_runs_limit = 5\n")
    assert "jobs.max_runs_limit: expected a value >= jobs.default_max_runs (20), got 5" in message
    message = error_of(tmp_path, "[gpu]\nretry_max_s = 1\n")
    assert "gpu.retry_max_s: expected a value >= gpu.retry_initial_s (5.0), got 1.0" in message


def test_cross_field_check_is_skipped_when_a_side_is_itself_invalid(tmp_path):
    message = error_of(tmp_path, "[jobs]\ndefault_max_runs = 0\nmax_runs_limit = 5\n")
    assert "(1 error)" in message and "max_runs_limit" not in message


def test_every_error_is_reported_at_once(tmp_path):
    message = error_of(tmp_path, """
[jobs]
stop_timeout_s = -1
umask = "abc"
allowed_properties = ["MemoryMax", 3, "no good"]
[gpu]
stray_policy = "kill!"
[client]
follow_poll_interval_s = false
[bogus]
""")
    assert "(7 errors)" in message
    keys = ("jobs.stop_timeout_s", "jobs.umask", "jobs.allowed_properties[1]", "jobs.allowed_properties[2]",
            "gpu.stray_policy", "client.follow_poll_interval_s", "[bogus]")
    for key in keys:
        assert f"\n  {key}: " in message, key


def test_invalid_toml_is_a_config_error(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "[jobs\n")


def test_non_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[jobs]\n# \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_config_error_is_a_usage_error():
    assert ConfigError.exit_code == 2


# --- finding the file -------------------------------------------------------------------------------


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config_file, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert resolve_config_path(None) == (tmp_path / "absent.toml", False)
    assert load_config() == Config()


def test_explicit_missing_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_missing_path_from_the_environment_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"absent\.toml: configuration file not found"):
        load_config()


def test_env_var_overrides_the_default_path(monkeypatch, tmp_path):
    path = write(tmp_path, "[jobs]\nstop_timeout_s = 3\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert resolve_config_path(None) == (path, True)
    assert load_config().jobs.stop_timeout_s == 3.0


def test_flag_overrides_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.toml"))
    assert resolve_config_path(str(tmp_path / "flag.toml")) == (tmp_path / "flag.toml", True)


def test_empty_env_var_counts_as_unset(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "")
    assert resolve_config_path(None) == (DEFAULT_CONFIG_PATH, False)


def test_empty_flag_is_an_error():
    with pytest.raises(ConfigError):
        resolve_config_path("")


def test_unreadable_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_drop_ins_are_merged_in_order_over_the_main_file(tmp_path):
    main_file = write(tmp_path, "[gpu]\npoll_interval_s = 2.0\n[jobs]\nstop_timeout_s = 3.0\n")
    drop_ins = tmp_path / "gpujobd.toml.d"
    drop_ins.mkdir()
    (drop_ins / "20-later.toml").write_text("[gpu]\npoll_interval_s = 7.0\n")
    (drop_ins / "10-first.toml").write_text("[gpu]\npoll_interval_s = 1.0\nwatch = false\n")
    (drop_ins / "ignored.conf").write_text("not toml at all [")
    config = load_config(main_file)
    assert (config.gpu.poll_interval_s, config.gpu.watch, config.jobs.stop_timeout_s) == (7.0, False, 3.0)


def test_a_bad_drop_in_is_named_in_the_error(tmp_path):
    main_file = write(tmp_path, "")
    (tmp_path / "gpujobd.toml.d").mkdir()
    (tmp_path / "gpujobd.toml.d" / "50-bad.toml").write_text("[gpu]\npoll_intervall_s = 1.0\n")
    with pytest.raises(ConfigError, match=r"(?s)50-bad\.toml.*poll_intervall_s"):
        load_config(main_file)
