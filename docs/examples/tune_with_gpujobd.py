"""An Optuna study whose trials run as gpujobd jobs, graded honestly.

Each trial is one gpujobd job with a timeout, run with this very Python (`sys.executable`: your
virtualenv's, with its packages; the job inherits your environment anyway) and writing its result to a
file of its own, so that trials running side by side (`n_jobs > 1`) never read each other's score.

When a trial's job fails, the study still learns something:
- it never started (the command or its directory is wrong, the daemon lost it): `TrialNotStarted` is
  raised and Optuna records the trial as FAIL. A made-up score would teach TPE about a region it
  never tried;
- it ran and failed (a timeout, an OOM kill, a crash): a graded loss, worse than any real one and
  better the further it got (`timeout_fraction` = elapsed / timeout) and the more it says about the
  hyper-parameters (an OOM kill says "too big"). A flat -inf makes TPE search at random.
The job's record is kept on the trial (`trial.user_attrs["gpujob"]`).

    pip install optuna gpujobd          # in the venv the study runs in
    python3 tune_with_gpujobd.py --trials 20 --jobs 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "toy_train.py"  # your train.py: it must write {"val_loss": ...} to --result
TIMEOUT_S = 900

# Worst and best penalties, in the objective's units (here: validation loss, lower is better).
WORST_LOSS = 10.0
# How much each way of failing is worth: a timeout near the end is nearly a result.
REASON_BASE = {
    "timeout": 0.6,  # scaled by how far it got
    "oom-kill": 0.8,  # too big: a real signal about batch size / width
    "exit-code": 0.9,  # crashed (NaN loss, assertion, ...)
    "signal": 0.9,
}
# Ends that say nothing about the hyper-parameters: the command never ran, or its end is unknown.
NOT_STARTED = frozenset({"exec-failed", "chdir-failed", "setup-failed", "start-failed", "lost"})


class TrialNotStarted(RuntimeError):
    """The trial's job never ran its command (or was lost): the trial fails, it gets no score."""


def grade(job: Mapping[str, Any]) -> float:
    """A loss for a job that ran and failed: between about 0.6 and 0.9 times WORST_LOSS, better the
    further it got. Jobs that never started are not graded (`TrialNotStarted`)."""
    base = REASON_BASE.get(job.get("reason") or "", 1.0)
    progress = job.get("timeout_fraction") or 0.0
    return WORST_LOSS * (base - 0.3 * progress * base)


def objective(trial: Any, client: Any = None, results: Optional[Path] = None) -> float:
    from gpujobd.client import Client

    client = client or Client()
    results = results or Path("results")
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    result = results / f"trial-{trial.number}.json"  # one file per trial: n_jobs > 1 is safe
    job = client.submit([sys.executable, str(TRAIN), f"--lr={lr}", f"--result={result}"],
                        name=f"trial-{trial.number}", timeout_s=TIMEOUT_S)
    job = client.wait(job["id"])
    trial.set_user_attr("gpujob", {key: job.get(key) for key in
                                   ("id", "state", "reason", "detail", "exit_code", "signal", "elapsed_s",
                                    "timeout_fraction")})
    if job.get("reason") in NOT_STARTED:
        raise TrialNotStarted(f"job {job['id']} never ran: {job.get('reason')}: {job.get('detail')}")
    if job["state"] != "succeeded":
        return grade(job)
    return float(json.loads(result.read_text())["val_loss"])


def main() -> None:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=4, help="trials run side by side")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args()
    os.makedirs(args.results, exist_ok=True)
    study = optuna.create_study(direction="minimize")
    study.optimize(lambda trial: objective(trial, results=args.results), n_trials=args.trials,
                   n_jobs=args.jobs, catch=(TrialNotStarted,))
    print(json.dumps([{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
                      for t in study.trials]))


if __name__ == "__main__":
    main()
