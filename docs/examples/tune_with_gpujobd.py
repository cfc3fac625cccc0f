"""An Optuna objective that grades failed trials instead of scoring them -inf.

Each trial runs as a gpujobd job with a timeout. A trial that fails still tells the optimiser how
far it got: `timeout_fraction` (elapsed / timeout, 0..1) and `reason` say whether it crashed at
once, ran out of memory late, or was about to finish when the timeout hit. A graded penalty keeps
TPE's model informative where a flat -inf makes it search at random.

    pip install optuna      # optuna is not a dependency of gpujobd
    python tune_with_gpujobd.py
"""

from __future__ import annotations

import json
from typing import Any, Mapping

# Worst and best penalties, in the objective's units (here: validation loss, lower is better).
WORST_LOSS = 10.0
# How much each way of failing is worth: a timeout near the end is nearly a result; a job that could
# not even start says nothing about its hyper-parameters.
REASON_BASE = {
    "timeout": 0.6,  # scaled by how far it got
    "oom-kill": 0.8,  # too big: a real signal about batch size / width
    "exit-code": 0.9,  # crashed (NaN loss, assertion, ...)
    "signal": 0.9,
    "exec-failed": 1.0,  # a broken command: nothing learned
    "chdir-failed": 1.0,
    "start-failed": 1.0,
    "lost": 1.0,
}


def grade(job: Mapping[str, Any]) -> float:
    """A loss for a failed job: between about 0.6 and 1.0 times WORST_LOSS, better the further it got."""
    base = REASON_BASE.get(job.get("reason") or "", 1.0)
    progress = job.get("timeout_fraction") or 0.0
    return WORST_LOSS * (base - 0.3 * progress * base)


def objective(trial: Any, client: Any = None) -> float:
    from gpujobd.client import Client

    client = client or Client()
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    job = client.submit(["python", "train.py", f"--lr={lr}", "--result=result.json"],
                        name=f"trial-{trial.number}", timeout_s=900)
    job = client.wait(job["id"])
    if job["state"] == "succeeded":
        return float(json.loads(open("result.json").read())["val_loss"])
    trial.set_user_attr("gpujob", {k: job[k] for k in ("id", "reason", "exit_code", "signal",
                                                       "elapsed_s", "timeout_fraction")})
    return grade(job)


if __name__ == "__main__":
    import optuna

    study = optuna.create_study(direction="minimize")
    study.optimize(objective, n_trials=50)
    print(study.best_params)
