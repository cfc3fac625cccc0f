"""`gpujobd --check-config`: the admin's way to validate a file before a restart."""

from __future__ import annotations

import subprocess
import sys

from gpujobd.shared.config_toml import load_config


def gpujobd(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpujobd.daemon.main", *args], capture_output=True,
                          text=True, env=env)


def test_check_config_prints_the_effective_configuration(tmp_path):
    path = tmp_path / "gpujobd.toml"
    path.write_text("[jobs]\nstop_timeout_s = 3\n")
    done = gpujobd("--check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "stop_timeout_s = 3.0" in done.stdout
    effective = tmp_path / "effective.toml"
    effective.write_text(done.stdout)
    assert load_config(effective) == load_config(path)


def test_a_bad_file_names_the_file_and_every_bad_key(tmp_path):
    path = tmp_path / "gpujobd.toml"
    path.write_text('[jobs]\nstop_timout_s = 3\nrestart_delay_s = "soon"\n')
    done = gpujobd("--check-config", "--config", str(path))
    assert done.returncode == 2
    assert str(path) in done.stderr
    assert "jobs.stop_timout_s" in done.stderr and "did you mean jobs.stop_timeout_s" in done.stderr
    assert "jobs.restart_delay_s" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_daemon_does_not_start_with_a_bad_config(tmp_path):
    path = tmp_path / "gpujobd.toml"
    path.write_text("[nope]\n")
    done = gpujobd("--config", str(path))
    assert done.returncode == 2 and "nope" in done.stderr
