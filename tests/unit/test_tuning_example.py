"""The Optuna example in docs/ grades failures by how far they got, not with a flat -inf."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "tune_with_gpujobd.py"


def _example():
    spec = importlib.util.spec_from_file_location("tune_with_gpujobd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeTrial:
    number = 7

    def __init__(self):
        self.attrs = {}

    def suggest_float(self, name, low, high, log=False):
        return 1e-3

    def set_user_attr(self, key, value):
        self.attrs[key] = value


class FakeClient:
    """Submits nothing; every job ends the way the test says."""

    def __init__(self, ending):
        self.ending = ending
        self.submitted = []

    def submit(self, argv, **options):
        self.submitted.append((argv, options))
        return {"id": 1, "state": "starting"}

    def wait(self, job_id):
        return {"id": job_id, **self.ending}


def test_further_is_better_and_broken_commands_are_worst():
    grade = _example().grade
    late_timeout = grade({"reason": "timeout", "timeout_fraction": 0.95})
    early_timeout = grade({"reason": "timeout", "timeout_fraction": 0.05})
    crash = grade({"reason": "exit-code", "timeout_fraction": 0.05})
    broken = grade({"reason": "exec-failed", "timeout_fraction": 0.0})
    assert late_timeout < early_timeout < crash < broken == _example().WORST_LOSS
    assert all(value != float("inf") for value in (late_timeout, early_timeout, crash, broken))


def test_objective_grades_a_failed_trial_and_keeps_the_record():
    example = _example()
    trial = FakeTrial()
    ending = {"state": "timed-out", "reason": "timeout", "exit_code": None, "signal": 15,
              "elapsed_s": 900.0, "timeout_fraction": 1.0}
    client = FakeClient(ending)
    value = example.objective(trial, client=client)
    assert value == example.grade(ending)
    assert client.submitted[0][1]["timeout_s"] == 900
    assert trial.attrs["gpujob"]["reason"] == "timeout"
