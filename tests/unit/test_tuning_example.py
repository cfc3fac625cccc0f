"""The Optuna example in docs/: its own Python, one result file per trial, failed starts raise, and
failures that ran are graded by how far they got, not with a flat -inf."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "tune_with_gpujobd.py"


def _example():
    spec = importlib.util.spec_from_file_location("tune_with_gpujobd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeTrial:
    def __init__(self, number=7):
        self.number = number
        self.attrs = {}

    def suggest_float(self, name, low, high, log=False):
        return 1e-3

    def set_user_attr(self, key, value):
        self.attrs[key] = value


class FakeClient:
    """Submits nothing; every job ends the way the test says (a succeeded one writes its result)."""

    def __init__(self, ending):
        self.ending = ending
        self.submitted = []

    def submit(self, argv, **options):
        self.submitted.append((argv, options))
        if self.ending["state"] == "succeeded":
            result = next(arg for arg in argv if arg.startswith("--result=")).split("=", 1)[1]
            Path(result).write_text(json.dumps({"val_loss": 0.25}))
        return {"id": 1, "state": "starting"}

    def wait(self, job_id):
        return {"id": job_id, **self.ending}


def test_further_is_better_and_every_graded_failure_is_worse_than_a_result():
    grade = _example().grade
    late_timeout = grade({"reason": "timeout", "timeout_fraction": 0.95})
    early_timeout = grade({"reason": "timeout", "timeout_fraction": 0.05})
    crash = grade({"reason": "exit-code", "timeout_fraction": 0.05})
    assert late_timeout < early_timeout < crash < _example().WORST_LOSS
    assert all(value != float("inf") for value in (late_timeout, early_timeout, crash))


def test_a_trial_runs_this_python_and_writes_its_own_result_file(tmp_path):
    example = _example()
    client = FakeClient({"state": "succeeded", "reason": "exit-code", "exit_code": 0})
    assert example.objective(FakeTrial(3), client=client, results=tmp_path) == 0.25
    argv, options = client.submitted[0]
    assert argv[0] == sys.executable and argv[1] == str(example.TRAIN)
    assert f"--result={tmp_path / 'trial-3.json'}" in argv and options["timeout_s"] == 900


def test_objective_grades_a_failed_trial_and_keeps_the_record(tmp_path):
    example = _example()
    trial = FakeTrial()
    ending = {"state": "timed-out", "reason": "timeout", "exit_code": None, "signal": 15,
              "elapsed_s": 900.0, "timeout_fraction": 1.0}
    value = example.objective(trial, client=FakeClient(ending), results=tmp_path)
    assert value == example.grade(ending)
    assert trial.attrs["gpujob"]["reason"] == "timeout"


@pytest.mark.parametrize("reason", ["exec-failed", "chdir-failed", "start-failed", "lost"])
def test_a_trial_that_never_started_raises_instead_of_scoring(tmp_path, reason):
    example = _example()
    trial = FakeTrial()
    ending = {"state": "failed", "reason": reason, "detail": "python: No such file or directory"}
    with pytest.raises(example.TrialNotStarted, match=reason):
        example.objective(trial, client=FakeClient(ending), results=tmp_path)
    assert trial.attrs["gpujob"]["reason"] == reason
