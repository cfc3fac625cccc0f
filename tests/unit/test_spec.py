"""The submit options, declared once in gpujobd.shared.spec, and what is derived from them: the
client's encoding, the daemon's decoding, defaults and rules, and gpujobctl submit's flags."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from gpujobd.cli import main as cli
from gpujobd.cli import submit as cli_submit
from gpujobd.client import spec_values
from gpujobd.shared import api, jobspec, spec, text
from gpujobd.shared.config import Config, JobsConfig
from gpujobd.shared.errors import InvalidArgument
from gpujobd.shared.model import JobSpec

# A value of the right wire type, and one of a wrong type, for each signature the spec uses.
GOOD = {"as": ["python", "x.py"], "s": "/srv", "a{ss}": {"A": "1"}, "d": 2.5, "b": True, "u": 3, "t": 4,
        "i": -3, "at": [1, 2]}
WRONG = {"as": "python x.py", "s": 7, "a{ss}": ["A=1"], "d": "60", "b": "yes", "u": -1, "t": True,
         "i": 1 << 40, "at": "12"}


def jobspec_fields() -> Dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(JobSpec)}


def field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


# --- the declaration ----------------------------------------------------------------------------------


def test_there_is_an_option_for_every_jobspec_field_and_no_other() -> None:
    assert [option.key for option in spec.OPTIONS] == list(jobspec_fields())


def test_the_wire_keys_and_signatures_are_the_contracts() -> None:
    assert dict(api.SPEC_FIELDS) == {option.key: option.signature for option in spec.OPTIONS}
    assert api.GPU_CHECKS == spec.GPU_CHECKS and api.MAX_ARGV_ITEMS == spec.MAX_ARGV_ITEMS


@pytest.mark.parametrize("option", spec.OPTIONS, ids=lambda option: option.key)
def test_every_option_has_a_wire_type_a_default_and_a_cli_flag(option: spec.Option) -> None:
    assert option.signature in GOOD, "a signature wire_problem cannot check"
    assert spec.wire_problem(option.signature, GOOD[option.signature]) is None
    assert spec.wire_problem(option.signature, WRONG[option.signature]) is not None
    field = jobspec_fields()[option.key]
    if option.required:
        assert field.default is dataclasses.MISSING
    else:
        assert option.default == field_default(field), "the declared default is JobSpec's"
    assert option.cli.help
    if option.key == "argv":
        assert option.cli.flags == () and option.cli.metavar == "-- CMD [ARG...]"
    else:
        assert option.cli.flags and all(flag.startswith("--") for flag in option.cli.flags)
    assert option.pair in ("both", "foreground", "loop", "fixed")
    assert not option.loop_only or option.pair == "loop", "a loop-only option goes to the pair's loop"


def test_flags_are_unique_and_server_defaults_name_real_settings() -> None:
    flags = [flag for option in spec.OPTIONS for flag in option.cli.flags]
    assert len(flags) == len(set(flags))
    config = Config()
    for option in spec.OPTIONS:
        if option.server_default:
            section, key = option.server_default.split(".")
            assert hasattr(getattr(config, section), key), option.server_default


def test_shared_spec_imports_no_dbus_library_and_nothing_of_gpujobd_outside_shared() -> None:
    code = ("import sys, gpujobd.shared.spec, gpujobd.shared.api; "
            "print(' '.join(sorted(name for name in sys.modules if name.startswith(('gpujobd', 'gi', "
            "'pydbus', 'jeepney')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = loaded.stdout.split()
    assert "gpujobd.shared.spec" in modules
    assert [name for name in modules if name != "gpujobd" and not name.startswith("gpujobd.shared")] == []


# --- the wire: encode (client) and decode (daemon) ---------------------------------------------------


def test_what_the_client_encodes_the_daemon_decodes_to_the_same_spec() -> None:
    given = {option.key: GOOD[option.signature] for option in spec.OPTIONS}
    given.update(timeout_s=60, restart_delay_s=0)  # whole numbers of seconds are seconds too
    wire = spec.encode(given)
    assert {key: signature for key, (signature, _value) in wire.items()} == dict(api.SPEC_FIELDS)
    decoded = jobspec.decode({key: value for key, (_signature, value) in wire.items()})
    id_lists = {option.key: tuple(given[option.key]) for option in spec.OPTIONS if option.signature == "at"}
    assert decoded == JobSpec(**dict(given, argv=tuple(given["argv"]), timeout_s=60.0, restart_delay_s=0.0,
                                     **id_lists))
    assert all(isinstance(getattr(decoded, option.key), float) for option in spec.OPTIONS
               if option.signature == "d")


def test_options_at_their_default_are_not_sent_and_decode_to_the_default() -> None:
    wire = spec.encode({"argv": ["true"], "cwd": "/", "name": "", "env": {}, "background": False,
                        "stop_on_failure": False, "max_runs": None})
    assert set(wire) == {"argv", "cwd"}
    assert jobspec.decode({"argv": ["true"], "cwd": "/"}) == JobSpec(argv=("true",), cwd="/")


@pytest.mark.parametrize("option", [option for option in spec.OPTIONS], ids=lambda option: option.key)
def test_decoding_refuses_a_wrong_type_naming_the_option(option: spec.Option) -> None:
    wire: Dict[str, Any] = {"argv": ["true"], "cwd": "/"}
    wire[option.key] = WRONG[option.signature]
    with pytest.raises(InvalidArgument) as caught:
        jobspec.decode(wire)
    assert str(caught.value).startswith(f"spec field {option.key!r}: expected ")


def test_decoding_reports_every_problem_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        jobspec.decode({"argv": "true", "max_runs": 2.0, "timeout": 5})
    message = str(caught.value)
    assert "unknown spec field 'timeout' (did you mean 'timeout_s'?)" in message
    assert "cwd (--cwd) is missing" in message
    assert "spec field 'argv': expected a list of strings (as), not a single string" in message
    assert "spec field 'max_runs': expected a whole number from 0 to 4294967295 (u)" in message


# --- the daemon's defaults and rules --------------------------------------------------------------------


def test_server_defaults_fill_only_what_applies_and_was_not_given() -> None:
    config = Config()
    plain = jobspec.with_server_defaults(JobSpec(argv=("x",), cwd="/"), config)
    assert (plain.max_runs, plain.restart_delay_s, plain.gpu_check) == (None, None, config.gpu.prestart_check)
    loop = jobspec.with_server_defaults(JobSpec(argv=("x",), cwd="/", background=True, max_runs=4,
                                             gpu_check="refuse"), config)
    assert (loop.max_runs, loop.restart_delay_s, loop.gpu_check) == (4, config.jobs.restart_delay_s, "refuse")


def test_every_broken_rule_is_reported_at_once_naming_the_option_and_what_to_do() -> None:
    jobs = JobsConfig(max_runs_limit=50, max_timeout_s=3600.0)
    broken = JobSpec(argv=(), cwd="rel", env={"A=B": "1"}, name="n" * 200, timeout_s=7200.0,
                     background=True, max_runs=51, restart_delay_s=-1.0, gpu_check="later")
    assert jobspec.problems(broken, jobs) == [
        "argv (the command) is empty: give the program to run and its arguments, e.g. gpujobctl submit "
        "-- python3 train.py",
        "cwd (--cwd) is 'rel': give an absolute path",
        "env (--env) has 'A=B': a name must be non-empty, without '=' or NUL, and a value without NUL",
        "name (--name) is 200 characters long; at most 128 are allowed: shorten it",
        "timeout_s (--timeout) is 7200.0: above this server's limit of 3600.0 s (jobs.max_timeout_s); "
        "ask for less",
        "max_runs (--max-runs) is 51: give 1 to this server's limit of 50 (jobs.max_runs_limit)",
        "restart_delay_s (--restart-delay) is -1.0: give 0 or more seconds, at most 3153600000",
        "gpu_check (--gpu-check) is 'later': give one of off, refuse, wait",
    ]
    fixed = dataclasses.replace(broken, argv=("true",), cwd="/srv", env={}, name="n", timeout_s=60.0,
                                max_runs=50, restart_delay_s=0.0, gpu_check="wait")
    assert jobspec.problems(fixed, jobs) == []


@pytest.mark.parametrize(("given", "refused"), [
    ({}, []),
    ({"max_runs": 1}, []),  # one run is what a job without a loop does anyway
    ({"stop_on_failure": False}, []),
    ({"bind_to": 3}, []),  # any job may be bound, not only a loop
    ({"max_runs": 2}, ["max_runs (--max-runs)"]),
    ({"restart_delay_s": 0.0, "stop_on_failure": True},
     ["restart_delay_s (--restart-delay)", "stop_on_failure (--stop-on-failure)"]),
])
def test_loop_options_need_background(given: Dict[str, Any], refused: List[str]) -> None:
    problems = jobspec.problems(JobSpec(argv=("x",), cwd="/", **given), JobsConfig())
    if not refused:
        assert problems == []
        return
    verb = "apply" if len(refused) > 1 else "applies"
    assert problems == [f"{', '.join(refused)} only {verb} to background loops: set background "
                        "(--background) too"]
    assert jobspec.problems(JobSpec(argv=("x",), cwd="/", background=True, **given), JobsConfig()) == []


@pytest.mark.parametrize(("key", "limit", "value"), [
    ("argv", spec.MAX_ARGV_ITEMS, lambda n: ["x"] * n),
    ("env", spec.MAX_ENV_ITEMS, lambda n: {f"V{i}": "1" for i in range(n)}),
])
def test_decoding_refuses_more_items_than_one_call_may_carry(key: str, limit: int, value: Any) -> None:
    wire = {"argv": ["true"], "cwd": "/"}
    assert len(getattr(jobspec.decode(dict(wire, **{key: value(limit)})), key)) == limit
    with pytest.raises(InvalidArgument) as caught:
        jobspec.decode(dict(wire, **{key: value(limit + 1)}))
    assert f"{spec.BY_KEY[key].label} has {limit + 1} items; at most {limit} are allowed" in str(caught.value)


def test_too_long_a_command_line_is_refused() -> None:
    jobs = JobsConfig()
    assert jobspec.problems(JobSpec(argv=("x" * (spec.MAX_ARG_BYTES - 1),), cwd="/"), jobs) == []
    assert jobspec.problems(JobSpec(argv=("x" * spec.MAX_ARG_BYTES,), cwd="/"), jobs) == [
        f"argv (the command) is {spec.MAX_ARG_BYTES + 1} bytes long; at most {spec.MAX_ARG_BYTES} are "
        "allowed (jobs.max_argv_bytes): pass long lists in a file"]


def test_every_stored_field_is_bounded_by_a_named_key() -> None:
    jobs = JobsConfig()
    huge = "x" * (jobs.max_env_bytes + 1)
    found = jobspec.problems(JobSpec(argv=("true",), cwd="/" + "d" * jobs.max_cwd_bytes, env={"V": huge},
                                  properties={"MemoryMax": "1" * 300}), jobs)
    text = "; ".join(found)
    for key in ("jobs.max_cwd_bytes", "jobs.max_env_bytes", "jobs.max_property_bytes"):
        assert key in text, f"{key} not named in {text[:300]}"
    small = JobsConfig(max_spec_bytes=8192)
    assert jobspec.problems(JobSpec(argv=("true",), cwd="/", env={"V": "v" * 9000}), small) == [
        "the job's spec is 9009 bytes in all; at most 8192 are allowed (jobs.max_spec_bytes): pass large "
        "inputs in files"]


def test_a_restart_delay_that_overflows_the_supervisor_is_refused() -> None:
    found = jobspec.problems(JobSpec(argv=("true",), cwd="/", background=True, restart_delay_s=1e300),
                          JobsConfig())
    assert found == ["restart_delay_s (--restart-delay) is 1e+300: give 0 or more seconds, at most "
                     "3153600000"]


# --- the derived gpujobctl submit -------------------------------------------------------------------------

# Command lines the hand-written parser (before the options were declared once) accepted, with the
# options it sent for them.
ACCEPTED_BEFORE = [
    (["--", "true"], {}, ["true"]),
    (["--name", "n1", "--cwd", "/tmp", "--env", "A=1", "--env", "B=x=y", "--property", "CPUQuota=50%",
      "--timeout", "1h30m", "--", "python", "-c", "--name"],
     {"name": "n1", "cwd": "/tmp", "env": {"A": "1", "B": "x=y"}, "properties": {"CPUQuota": "50%"},
      "timeout_s": 5400.0}, ["python", "-c", "--name"]),
    (["--background", "--max-runs", "5", "--restart-delay", "0", "--stop-on-failure", "--", "eval"],
     {"background": True, "max_runs": 5, "restart_delay_s": 0.0, "stop_on_failure": True}, ["eval"]),
    (["--background", "--restart-delay", "500ms", "--bind-to", "42", "--", "watch"],
     {"background": True, "restart_delay_s": 0.5, "bind_to": 42}, ["watch"]),
    (["--bind-to", "0", "--", "x"], {"bind_to": 0}, ["x"]),
    (["--gpu-check", "wait", "--timeout", "90", "--", "x"], {"gpu_check": "wait", "timeout_s": 90.0}, ["x"]),
    (["--max-runs", "3", "--", "x"], {"max_runs": 3}, ["x"]),  # the daemon says it needs --background
    (["--with-background", "python eval.py", "--max-runs", "3", "--", "train"], {"max_runs": 3}, ["train"]),
    (["--name", "x", "sleep", "1", "--wait"], {"name": "x"}, ["sleep", "1", "--wait"]),
]


@pytest.mark.parametrize(("argv", "sent", "command"), ACCEPTED_BEFORE)
def test_the_derived_parser_accepts_what_the_hand_written_one_did(argv: List[str], sent: Dict[str, Any],
                                                                 command: List[str]) -> None:
    args = cli.build_parser().parse_args(["submit", *argv])
    args.check(args)
    assert cli_submit.given_options(args) == sent
    assert cli_submit.submitted_command(args.argv) == command


def test_every_flag_of_the_declaration_is_in_submit_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["submit", "-h"]) == 0
    shown = capsys.readouterr().out
    for option in spec.OPTIONS:
        for flag in option.cli.flags:
            assert f"[{flag}" in shown.split("\n\n")[0], f"{flag} missing from the usage line"
            assert f"  {flag}" in shown, f"{flag} has no help line"
    assert "(default: the server's jobs.default_max_runs)" in " ".join(shown.split())


def test_what_the_cli_sends_the_client_encodes_unchanged() -> None:
    args = cli.build_parser().parse_args(["submit", *ACCEPTED_BEFORE[1][0]])
    values = spec_values(cli_submit.submitted_command(args.argv), caller_environ={},
                         **cli_submit.given_options(args))
    assert values == dict(ACCEPTED_BEFORE[1][1], argv=["python", "-c", "--name"])


# --- scheduling options' text forms ------------------------------------------------------------------


@pytest.mark.parametrize("given,expected", [
    ("0-3", ((0, 1, 2, 3), 0)),
    ("0-19%4", (tuple(range(20)), 4)),
    ("1,3,5%2", ((1, 3, 5), 2)),
    ("0-10:5", ((0, 5, 10), 0)),
    ("7", ((7,), 0)),
    ("1-3,2-4", ((1, 2, 3, 4), 0)),
])
def test_arrays_read_as_slurm_writes_them(given: str, expected: Any) -> None:
    assert text.array(given) == expected


@pytest.mark.parametrize("given", ["", "3-1", "a-b", "0-3%0", "0-3%", "1,,2", "0-3:0", "0-20000"])
def test_bad_arrays_say_what_is_expected(given: str) -> None:
    with pytest.raises(ValueError):
        text.array(given)


def test_job_id_lists_and_priorities() -> None:
    assert text.job_ids("12,15,12") == (12, 15)
    assert text.integer("-3") == -3 and text.integer("+2") == 2
    for bad in ("", "1,", "x"):
        with pytest.raises(ValueError):
            text.job_ids(bad)


def test_stagger_needs_an_array() -> None:
    found = jobspec.problems(JobSpec(argv=("x",), cwd="/", stagger_s=1.0), JobsConfig())
    assert found == ["stagger_s (--stagger) spaces the starts of an array's tasks: give array (--array) too"]
    assert jobspec.problems(JobSpec(argv=("x",), cwd="/", array="0-3", stagger_s=1.0), JobsConfig()) == []
