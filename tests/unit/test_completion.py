"""Shell completion: generated from gpujobctl's parser; the installed copies are that output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gpujobd.cli import completion
from gpujobd.cli.main import build_parser

CHECKOUT = Path(__file__).resolve().parents[2]
INSTALLED = {"bash": CHECKOUT / "packaging" / "completion" / "gpujobctl.bash",
             "zsh": CHECKOUT / "packaging" / "completion" / "_gpujobctl"}


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_the_installed_scripts_are_what_the_parser_generates(shell: str) -> None:
    assert INSTALLED[shell].read_text() == completion.script(shell, build_parser()), (
        f"regenerate: gpujobctl completion {shell} > {INSTALLED[shell].relative_to(CHECKOUT)}")


def complete(*words: str) -> list:
    """Run the bash completion function on a command line whose last word is being completed."""
    line = " ".join(f"'{word}'" for word in words)
    program = (f"source {INSTALLED['bash']}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
               "_gpujobctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return [word for word in done.stdout.splitlines() if word]


def test_bash_completes_verbs_flags_and_choices() -> None:
    assert complete("gpujobctl", "sub") == ["submit"]
    assert complete("gpujobctl", "submit", "--env") == ["--env", "--env-clear"]
    assert complete("gpujobctl", "list", "--state", "r") == ["running"]
    assert complete("gpujobctl", "logs", "-") == ["-h", "--help", "-f", "--follow", "-n", "--lines"]
    assert complete("gpujobctl", "submit", "--", "--e") == []  # the command's own words: the default


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed here")
def test_the_zsh_script_parses() -> None:
    subprocess.run(["zsh", "-n", str(INSTALLED["zsh"])], check=True)
