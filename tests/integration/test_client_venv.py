"""The client pip-installs into a fresh virtualenv (no system site-packages) and works from there."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

from tests.integration.conftest import CHECKOUT, sh

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
WHEELS = CHECKOUT / "build" / "wheels"
SCRIPT = textwrap.dedent("""\
    import sys
    from gpujobd.client import Client

    client = Client()
    job = client.submit(["sh", "-c", "echo hello from $USER"])
    ended = client.wait(job["id"], timeout_s=30)
    log = b"".join(client.logs(job["id"])).decode()
    print(ended["state"], ended["exit_code"], log.strip())
""")


def _as_alice(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUNUSER, "-u", "alice", "--", *argv], capture_output=True, text=True, timeout=300,
                          cwd="/home/alice", env={"PATH": "/usr/bin:/bin", "HOME": "/home/alice"})


def test_the_client_installed_with_pip_in_a_fresh_venv_submits_waits_and_reads_a_log(ctl):
    [wheel] = WHEELS.glob("gpujobd-*.whl")
    assert list((WHEELS / "client").glob("jeepney-*.whl")), "run `make wheels` first"
    venv = "/home/alice/client-venv"
    created = _as_alice("/usr/bin/python3", "-m", "venv", venv)
    assert created.returncode == 0, created.stderr
    installed = _as_alice(f"{venv}/bin/pip", "install", "-q", "--no-index", "--disable-pip-version-check",
                          "--find-links", str(WHEELS / "client"), str(wheel))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # Nothing of the system's Python packages is there: not Gio, not pydbus, not the daemon's stack.
    for module in ("gi", "pydbus", "pystemd", "structlog"):
        probe = _as_alice(f"{venv}/bin/python", "-c", f"import {module}")
        assert probe.returncode != 0, f"{module} is importable in the fresh venv"
    Path("/home/alice/use_client.py").write_text(SCRIPT)
    used = _as_alice(f"{venv}/bin/python", "/home/alice/use_client.py")
    assert used.returncode == 0, used.stderr
    assert used.stdout.strip() == "succeeded 0 hello from alice"
    cli = _as_alice(f"{venv}/bin/gpujobctl", "submit", "--wait", "--", "echo", "from the venv's gpujobctl")
    assert cli.returncode == 0, cli.stderr
    assert "from the venv's gpujobctl" in cli.stdout
    sh("rm", "-rf", venv)


def test_after_make_install_the_system_python3_imports_the_client(ctl):
    probe = "import gpujobd.client, jeepney; print(gpujobd.client.__file__)"
    done = _as_alice("/usr/bin/python3", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("/usr/local/lib/gpujobd/gpujobd/client/")  # through gpujobd.pth
