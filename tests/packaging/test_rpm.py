"""The RPM that `make rpm` builds: what it installs, how, and what its scriptlets do.

It only reads the built file (rpm -qp, rpm2cpio), so it runs anywhere rpm is installed, in the
sandbox or not; it skips without rpm or without dist/gpujobd-*.<arch>.rpm.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
RPMS = sorted((CHECKOUT / "dist").glob("gpujobd-*.rpm"))
RPM = RPMS[-1] if RPMS else None

pytestmark = [
    pytest.mark.skipif(shutil.which("rpm") is None, reason="no rpm on this machine: make rpm installs it"),
    pytest.mark.skipif(RPM is None, reason="no .rpm in dist/: make rpm"),
]


def query(*args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(RPM)], capture_output=True, text=True,
                          check=True).stdout


def files() -> List[str]:
    return query("-l").splitlines()


def test_it_lists_the_expected_files():
    listed = set(files())
    for path in ("/usr/bin/gpujobd", "/usr/bin/gpujobctl",
                 "/usr/lib/systemd/system/gpujobd.service", "/usr/lib/systemd/system/gpujob.slice",
                 "/usr/share/dbus-1/system.d/org.gpujobd1.conf", "/etc/gpujobd/gpujobd.toml",
                 "/usr/share/man/man8/gpujobd.8.gz", "/usr/share/man/man1/gpujobctl.1.gz",
                 "/var/lib/gpujobd", "/var/log/gpujobd", "/usr/share/bash-completion/completions/gpujobctl",
                 "/usr/share/zsh/site-functions/_gpujobctl"):
        assert path in listed, f"{path} is not in {RPM.name}"
    sitelib = {m.group(1) for m in (re.match(r"(/usr/lib/python3\.\d+/site-packages)/gpujobd/", f)
                                     for f in listed) if m}
    assert len(sitelib) == 1, sitelib
    (sitelib,) = sitelib
    for module in ("__init__.py", "daemon/main.py", "daemon/adapters/nvml.py", "cli/main.py",
                   "supervisor.py"):
        assert f"{sitelib}/gpujobd/{module}" in listed
    # No copy of the NVML bindings inside gpujobd: the pinned wheel is installed, whole, in a
    # private directory that only gpujobd's commands put on sys.path.
    assert not [f for f in listed if f.startswith(f"{sitelib}/") and "pynvml" in f]
    assert "/usr/share/gpujobd/pynvml.py" in listed
    assert any(re.fullmatch(r"/usr/share/gpujobd/nvidia_ml_py-[\d.]+\.dist-info/METADATA", f) for f in listed)
    assert any(f.startswith(f"{sitelib}/gpujobd-") and f.endswith(".dist-info/entry_points.txt")
               for f in listed)
    assert not any("/tests/" in f for f in listed)


def test_the_configuration_is_noreplace_and_the_unit_points_at_usr_bin():
    flags = dict(line.rsplit(" ", 1) for line in
                 query("--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines() if " " in line)
    assert "c" in flags["/etc/gpujobd/gpujobd.toml"] and "n" in flags["/etc/gpujobd/gpujobd.toml"]
    unit = subprocess.run(
        f"rpm2cpio '{RPM}' | cpio --quiet -i --to-stdout ./usr/lib/systemd/system/gpujobd.service",
        shell=True, capture_output=True, text=True, check=True).stdout
    assert "ExecStart=/usr/bin/gpujobd\n" in unit and "@BINDIR@" not in unit


def test_requires_are_distribution_packages_and_pynvml_is_bundled():
    requires = query("-R")
    for name in ("python3-gobject", "python3-jeepney", "python3-pydbus", "python3-pystemd",
                 "python3-structlog", "dbus", "systemd"):
        assert re.search(rf"^{name}\b", requires, re.M), f"no Requires: {name}"
    assert "nvidia-ml-py" not in requires  # no repository has it: it is bundled
    pin = (CHECKOUT / "packaging" / "nvidia-ml-py.txt").read_text()
    pinned = re.search(r"^nvidia-ml-py==(\S+) ", pin, re.M)
    assert pinned is not None
    assert f"bundled(python3dist(nvidia-ml-py)) = {pinned.group(1)}" in query("--provides")


def test_the_daemons_command_finds_the_bundled_nvml_bindings():
    script = subprocess.run(f"rpm2cpio '{RPM}' | cpio --quiet -i --to-stdout ./usr/bin/gpujobd",
                            shell=True, capture_output=True, text=True, check=True).stdout
    assert script.startswith("#!/usr/bin/python3")
    assert 'sys.path.append("/usr/share/gpujobd")' in script
    assert "from gpujobd.daemon.main import main" in script


def scriptlets() -> dict:
    """{'postinstall': text, 'preuninstall': text, ...} from rpm --scripts."""
    found, name = {}, None
    for line in query("--scripts").splitlines():
        head = re.match(r"^(\w+) scriptlet \(using ", line)
        if head:
            name = head.group(1)
            found[name] = ""
        elif name:
            found[name] += line + "\n"
    return found


def test_scriptlets_act_on_the_service_only_never_on_the_slice():
    # The systemd macros as Debian's stand-ins (and EL8) expand them, or as newer systemd does.
    scripts = scriptlets()
    post, preun, postun = scripts["postinstall"], scripts["preuninstall"], scripts["postuninstall"]
    assert "gpujobd.service" in post and ("preset" in post or "install-system-units" in post)
    assert "ReloadConfig" in post  # the D-Bus policy is read before the service can start
    assert "gpujobd.service" in preun and ("disable --now" in preun or "remove-system-units" in preun)
    assert "gpujobd.service" in postun and ("try-restart" in postun or "mark-restart-system-units" in postun)
    # Stopping or restarting the slice would kill every running job.
    assert not any("gpujob.slice" in text for text in scripts.values())
