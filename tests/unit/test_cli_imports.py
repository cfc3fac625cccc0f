"""gpujobctl imports what its verb needs, and no more (issue 13): checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

from gpujobd.shared import config_toml

PROBE = """
import json, os, sys
from gpujobd.cli import main
main.build_parser(main.verb_of(sys.argv[1:])).parse_args(sys.argv[1:])
main._client_settings()
import gpujobd.client
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gpujobd") or m == "dataclasses")))
"""


def imported(tmp_path: Path, config_text: str, *argv: str) -> List[str]:
    config = tmp_path / "gpujobd.toml"
    config.write_text(config_text)
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], check=True, capture_output=True, text=True,
                         env={"GPUJOBD_CONFIG": str(config), "PATH": "/usr/bin:/bin"}).stdout
    return json.loads(out)


def test_submit_imports_neither_other_verbs_nor_the_settings_definitions(tmp_path: Path) -> None:
    modules = imported(tmp_path, config_toml.default_config_text(), "submit", "--", "true")
    assert "gpujobd.cli.submit" in modules and "gpujobd.client.transport" in modules
    for other in ("gpujobd.cli.gpus", "gpujobd.cli.listing", "gpujobd.cli.status", "gpujobd.cli.render",
                  "gpujobd.shared.config", "gpujobd.shared.config_toml"):
        assert other not in modules, other


def test_submit_builds_no_dataclass(tmp_path: Path) -> None:
    """The job record (model, jobspec) and its dataclasses are the daemon's: creating a frozen
    dataclass costs about a millisecond at import, and gpujobctl sees jobs as dicts."""
    modules = imported(tmp_path, config_toml.default_config_text(), "submit", "--", "true")
    assert "gpujobd.shared.spec" in modules and "gpujobd.shared.states" in modules
    for record in ("gpujobd.shared.model", "gpujobd.shared.jobspec", "dataclasses"):
        assert record not in modules, record


def test_client_settings_that_are_set_are_still_checked(tmp_path: Path) -> None:
    modules = imported(tmp_path, "[client]\ncall_timeout_s = 5.0\n", "stop", "1")
    assert "gpujobd.shared.config_toml" in modules and "gpujobd.cli.stop" in modules


def test_help_still_lists_every_verb() -> None:
    from gpujobd.cli import main

    help_text = main.build_parser().format_help()
    assert all(verb in help_text for verb in main.VERB_MODULES)


def test_the_command_returns_mains_code_with_what_it_built_out_of_the_last_collection() -> None:
    """`run` (the gpujobctl entry point) freezes the objects that live until exit, so the
    interpreter's final collection does not walk them; its exit code is main's."""
    probe = ("import gc, sys\nsys.argv = ['gpujobctl', 'sumbit']\nfrom gpujobd.cli.main import run\n"
             "code = run()\nprint(code, gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, check=True)
    assert done.stdout.split() == ["2", "True"]  # a usage error: exit code 2
    assert "unknown verb 'sumbit'" in done.stderr
