"""A job runs in the submitter's environment, applied only after the supervisor drops privileges."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from tests.integration.conftest import WAIT_S, sh, wait_for

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
HOSTILE_SO = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void seen(void) {
    char cgroup[4096] = {0}, path[512];
    int fd = open("/proc/self/cgroup", O_RDONLY);
    if (fd >= 0) { read(fd, cgroup, sizeof cgroup - 1); close(fd); }
    snprintf(path, sizeof path, "%s/seen-by-uid-%d-%s-ld_preload", HOSTILE_DIR, (int)getuid(),
             strstr(cgroup, "gpujob-") ? "job" : "outside");
    close(open(path, O_CREAT | O_WRONLY, 0666));
}
"""


def _as_user(user: str, *argv: str, env: Dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([RUNUSER, "-u", user, "--", *argv], env=env, capture_output=True, text=True,
                          timeout=60, cwd=f"/home/{user}", **kw)


def _base_env(user: str) -> Dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": f"/home/{user}", "LANG": "C.UTF-8"}


def _submit(user: str, env: Dict[str, str], *cmd: str) -> int:
    done = _as_user(user, "gpujobctl", "submit", "--", *cmd, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(done.stdout.strip())


def test_a_job_from_an_activated_venv_imports_what_only_that_venv_has(ctl):
    venv = "/home/alice/venv-only"
    sh("runuser", "-u", "alice", "--", "/usr/bin/python3", "-m", "venv", "--without-pip", venv)
    site = next(Path(venv, "lib").glob("python3*/site-packages"))
    (site / "venvonly.py").write_text("MARK = 'from the venv'\n")
    activated = dict(_base_env("alice"), VIRTUAL_ENV=venv, PATH=f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
                     HF_HOME="/home/alice/hf", DISPLAY=":0", SSH_AUTH_SOCK="/tmp/agent.1")
    job_id = _submit("alice", activated, "python", "-c",
                     "import os, sys, venvonly; print(venvonly.MARK, sys.prefix); "
                     "print(*(f'{k}={os.environ.get(k)}' for k in ('HF_HOME', 'DISPLAY', 'SSH_AUTH_SOCK', "
                     "'PYTHONUNBUFFERED')))")
    job = ctl.wait_state("alice", job_id, "succeeded", "failed")
    out = ctl("alice", "logs", str(job_id), check=True).stdout
    assert job["state"] == "succeeded", out
    assert out.splitlines() == [f"from the venv {venv}",
                                "HF_HOME=/home/alice/hf DISPLAY=None SSH_AUTH_SOCK=None PYTHONUNBUFFERED=1"]


def test_env_clear_runs_with_the_safe_base_and_the_explicit_env(ctl):
    env = dict(_base_env("alice"), PATH="/home/alice/nowhere:/usr/bin:/bin", MY_SETTING="inherited")
    done = _as_user("alice", "/usr/local/bin/gpujobctl", "submit", "--env-clear", "--env", "X=1", "--",
                    "sh", "-c", "echo PATH=$PATH MY=${MY_SETTING:-unset} X=$X", env=env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout)
    ctl.wait_state("alice", job_id, "succeeded")
    out = ctl("alice", "logs", str(job_id), check=True).stdout.strip()
    assert out.startswith("PATH=") and "nowhere" not in out, out
    assert out.endswith("MY=unset X=1"), out


def _compile_hostile_library(hostile: Path) -> Path:
    source = hostile / "hostile.c"
    source.write_text(HOSTILE_SO)
    library = hostile / "hostile.so"
    sh("gcc", "-shared", "-fPIC", f'-DHOSTILE_DIR="{hostile}"', "-o", str(library), str(source))
    return library


def _root_environments() -> List[bytes]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == 0:
                found.append(entry.joinpath("environ").read_bytes())
        except OSError:
            pass
    return found


def test_hostile_ld_preload_pythonpath_and_path_never_reach_a_root_process(ctl):
    hostile = Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
    os.chmod(hostile, 0o777)
    library = _compile_hostile_library(hostile)
    (hostile / "bin").mkdir()
    for program in ("python3", "sh", "sleep"):  # every name a root process might look up in PATH
        shim = hostile / "bin" / program
        shim.write_text(f'#!/bin/sh\nwhere=outside; grep -q gpujob- /proc/self/cgroup && where=job\n'
                        f'touch "{hostile}/seen-by-uid-$(id -u)-$where-path"\nexec /usr/bin/{program} "$@"\n')
        shim.chmod(0o755)
    (hostile / "sitecustomize.py").write_text(
        f"import os\nwhere = 'job' if 'gpujob-' in open('/proc/self/cgroup').read() else 'outside'\n"
        f"open('{hostile}/seen-by-uid-%d-%s-pythonpath' % (os.getuid(), where), 'w').close()\n")
    # runuser (root) gets a clean environment; `env`, already alice, gives gpujobctl the hostile one.
    hostile_env = [f"LD_PRELOAD={library}", f"PYTHONPATH={hostile}", f"PATH={hostile}/bin:/usr/bin:/bin"]
    done = _as_user("alice", "env", *hostile_env, "/usr/local/bin/gpujobctl", "submit", "--", "python3", "-c",
                    "import time; print('running', flush=True); time.sleep(60)", env=_base_env("alice"))
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout)
    try:
        wait_for(lambda: "running" in ctl("alice", "logs", str(job_id)).stdout, "the job to run")
        seen = sorted(path.name for path in hostile.glob("seen-by-*"))
        uid = sh("id", "-u", "alice").stdout.strip()
        # The job itself saw all three (so the test can tell), and only as alice.
        for via in ("ld_preload", "path", "pythonpath"):
            assert f"seen-by-uid-{uid}-job-{via}" in seen, seen
        assert not [name for name in seen if name.startswith("seen-by-uid-0-")], seen
        environments = _root_environments()
        assert len(environments) > 3  # systemd, dbus, gpujobd and the job's supervisor at least
        assert not [env for env in environments if str(hostile).encode() in env]
    finally:
        ctl("alice", "stop", str(job_id))
        shutil.rmtree(hostile, ignore_errors=True)


def test_logs_follow_shows_an_unflushed_print_while_the_job_runs(ctl):
    # The job prints once without flushing and then sleeps far longer than the wait below: the line
    # can reach `logs -f` before the job ends only if Python's stdout is unbuffered.
    job_id = _submit("alice", _base_env("alice"), "python3", "-c",
                     "import time; print('tick'); time.sleep(300)")
    follower = subprocess.Popen(["runuser", "-u", "alice", "--", "gpujobctl", "logs", "-f", str(job_id)],
                                stdout=subprocess.PIPE, text=True, cwd="/home/alice")
    try:
        ctl.wait_state("alice", job_id, "running")
        started = time.monotonic()
        assert follower.stdout is not None
        line = follower.stdout.readline()  # the job runs for 300 s: only an unbuffered print comes now
        print(f"the unflushed print reached logs -f {time.monotonic() - started:.3f}s after `running`")
        assert line == "tick\n"
        assert ctl.job("alice", job_id)["state"] == "running"
    finally:
        ctl("alice", "stop", str(job_id))
        follower.wait(timeout=WAIT_S)


def test_errors_that_teach_python_and_an_unexpanded_tilde(ctl):
    no_python = _submit("alice", _base_env("alice"), "python", "-c", "pass")
    job = ctl.wait_state("alice", no_python, "failed")
    assert job["reason"] == "exec-failed"
    assert "searched PATH=/usr/local/bin:/usr/bin:/bin" in job["detail"] and "python3" in job["detail"]
    done = _as_user("alice", "gpujobctl", "submit", "--cwd=~/proj", "--", "true", env=_base_env("alice"))
    assert done.returncode == 0, done.stderr
    job = ctl.wait_state("alice", int(done.stdout), "failed")
    assert job["reason"] == "chdir-failed" and "/home/alice/~/proj" in job["detail"]
    assert "expands ~" in job["detail"]
