"""The Optuna example of docs/tuning.md, for real: a study whose trials run side by side as jobs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

from tests.integration.conftest import CHECKOUT, sh

RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
EXAMPLES = CHECKOUT / "docs" / "examples"
PYTHON = CHECKOUT / ".venv" / "bin" / "python"  # has optuna: the test extra


def _toy_loss():
    spec = importlib.util.spec_from_file_location("toy_train", EXAMPLES / "toy_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.loss_for


def test_an_optuna_study_with_parallel_trials_gives_each_trial_its_own_score(ctl):
    results = "/home/alice/optuna-results"
    sh(RUNUSER, "-u", "alice", "--", "mkdir", "-p", results)
    done = subprocess.run(
        [RUNUSER, "-u", "alice", "--", str(PYTHON), str(EXAMPLES / "tune_with_gpujobd.py"), "--trials", "6",
         "--jobs", "3", "--results", results],
        capture_output=True, text=True, timeout=300, cwd="/home/alice",
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/alice", "LANG": "C.UTF-8"})
    assert done.returncode == 0, done.stderr[-3000:]
    trials = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(trials) == 6 and {trial["state"] for trial in trials} == {"COMPLETE"}, trials
    loss_for = _toy_loss()
    for trial in trials:  # each score is the one its own parameters give: no trial read another's file
        assert trial["value"] == loss_for(trial["params"]["lr"]), trial
    assert len({trial["value"] for trial in trials}) == 6
    jobs = [job for job in json.loads(ctl("alice", "list", "--all", "--json", check=True).stdout)
            if job["name"].startswith("trial-")]
    assert sorted(job["name"] for job in jobs) == [f"trial-{number}" for number in range(6)]
    assert all(job["argv"][0] == str(PYTHON) for job in jobs)  # sys.executable: the study's Python
