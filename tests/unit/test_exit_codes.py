"""gpujobctl's exit codes: one per kind of error, from gpujobd.shared.errors, listed in --help and in
the man page.

The expected codes below are written out, not read from the errors module: they are a released
interface, and changing one must fail here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Type

import pytest

from gpujobd import client
from gpujobd.cli import main as cli
from gpujobd.shared import errors

MAN_PAGE = Path(__file__).resolve().parents[2] / "packaging" / "man" / "gpujobctl.1"

# Each error kind and the code gpujobctl exits with: the stable table.
EXPECTED: Dict[Type[errors.GpujobdError], int] = {
    errors.GpujobdError: 1,
    errors.Internal: 1,
    client.WaitTimedOut: 1,
    errors.InvalidArgument: 2,
    errors.ConfigError: 2,
    errors.NotFound: 3,
    errors.PermissionDenied: 4,
    errors.Unavailable: 5,
    errors.Refused: 6,
}
DOCUMENTED_CODES = [0, 1, 2, 3, 4, 5, 6, 130, 141]

# Verbs that reach the client, each with the arguments that make it call the daemon once.
VERBS: List[Sequence[str]] = [
    ("submit", "--", "true"),
    ("submit", "--wait", "--", "true"),
    ("status", "7"),
    ("list",),
    ("logs", "7"),
    ("stop", "7"),
    ("wait", "7"),
    ("gpus",),
]


class Failing:
    """A client whose every call raises `error`: the CLI must exit with that error's code."""

    def __init__(self, error: errors.GpujobdError) -> None:
        self.error = error
        self.calls: List[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*_args: Any, **_kwargs: Any) -> Any:
            self.calls.append(name)
            raise self.error

        return call


def run(argv: Sequence[str], fake: Any) -> int:
    return cli.main(list(argv), client_factory=lambda: fake)


def test_every_error_class_has_an_expected_code() -> None:
    assert set(errors.ERROR_CLASSES) <= set(EXPECTED), "add the new error class to EXPECTED"


def test_the_table_lists_each_code_once_in_order() -> None:
    codes = [code for code, _meaning in errors.EXIT_CODES]
    assert codes == DOCUMENTED_CODES
    assert all(meaning.strip() for _code, meaning in errors.EXIT_CODES)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_each_error_class_carries_its_documented_code(cls: Type[errors.GpujobdError]) -> None:
    assert cls("x").exit_code == EXPECTED[cls]
    assert EXPECTED[cls] in DOCUMENTED_CODES


@pytest.mark.parametrize("argv", VERBS, ids=lambda argv: " ".join(argv))
@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_each_verb_exits_with_the_code_of_the_error(capsys: pytest.CaptureFixture[str], argv: Sequence[str],
                                                     cls: Type[errors.GpujobdError]) -> None:
    fake = Failing(cls(f"what went wrong with {cls.__name__}: what to do"))
    assert run(argv, fake) == EXPECTED[cls]
    assert fake.calls, "the verb never reached the client"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpujobctl: ") and cls.__name__ in err


@pytest.mark.parametrize("cls", [c for c in errors.ERROR_CLASSES], ids=lambda cls: cls.__name__)
def test_a_dbus_error_comes_back_as_its_class_and_exits_with_its_code(cls: Type[errors.GpujobdError]) -> None:
    error = client.error_from_dbus(cls.dbus_name(), "no job 7", "Get")
    assert type(error) is cls and str(error) == "no job 7"
    assert run(("status", "7"), Failing(error)) == EXPECTED[cls]


@pytest.mark.parametrize("name", ["org.freedesktop.DBus.Error.ServiceUnknown",
                                  "org.freedesktop.DBus.Error.NameHasNoOwner"])
def test_a_daemon_that_owns_no_name_exits_5(name: str) -> None:
    error = client.error_from_dbus(name, "The name org.gpujobd1 is not owned", "List")
    assert run(("list",), Failing(error)) == 5


def test_a_missing_bus_socket_exits_5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = client.Client(f"unix:path={tmp_path}/no-such-socket", call_timeout_s=2)
    assert run(("status", "7"), real) == 5
    assert "gpujobd is not running or the system bus is unreachable" in capsys.readouterr().err


def test_stop_and_wait_exit_with_the_first_error_after_trying_every_id(
        capsys: pytest.CaptureFixture[str]) -> None:
    class Mixed:
        def stop(self, job_id: int) -> str:
            raise {1: errors.PermissionDenied("job 1 belongs to bob"),
                   2: errors.NotFound("no job 2")}[job_id]

        def wait(self, job_id: int, timeout_s: Any = None, raw: bool = False) -> Dict[str, Any]:
            raise {1: errors.NotFound("no job 1"), 2: errors.PermissionDenied("job 2 is bob's")}[job_id]

        def tasks(self, job_id: int, raw: bool = False) -> List[Dict[str, Any]]:
            return [self.wait(job_id)]

    assert run(("stop", "2", "1"), Mixed()) == 3
    assert run(("wait", "1", "2"), Mixed()) == 3
    assert run(("wait", "2", "1"), Mixed()) == 4
    assert capsys.readouterr().err.count("\n") == 6  # every id said why


def test_help_lists_every_code_from_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    listed = re.findall(r"^  (\d+) +(.+)$", text.split("exit codes:", 1)[1], re.MULTILINE)
    assert [(int(code), meaning) for code, meaning in listed] == list(errors.EXIT_CODES)
    assert "`submit --wait` and `wait` exit with the job's own code" in text


def _man_exit_status() -> List[Tuple[int, str]]:
    page = MAN_PAGE.read_text(encoding="utf-8")
    assert ".SH EXIT STATUS\n" in page, f"{MAN_PAGE} has no EXIT STATUS section"
    section = page.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    entries = re.findall(r"^\.TP\n\.B (\d+)\n(.+)$", section, re.MULTILINE)
    return [(int(code), text.replace("\\-", "-")) for code, text in entries]


def test_the_man_page_lists_the_same_codes_and_meanings() -> None:
    assert _man_exit_status() == list(errors.EXIT_CODES), (
        "packaging/man/gpujobctl.1's EXIT STATUS differs from gpujobd.shared.errors.EXIT_CODES: "
        "update the page (one `.TP` / `.B CODE` / meaning entry per code, '-' written '\\-')")
