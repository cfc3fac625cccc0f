"""A stand-in for train.py in tune_with_gpujobd.py: a "validation loss" that depends on the learning
rate alone (best at lr = 1e-3), reached after a short sleep so that trials run side by side, written
to the trial's own result file atomically (a temp file, then rename).

    python3 toy_train.py --lr 0.001 --result results/trial-3.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def loss_for(lr: float) -> float:
    return round((math.log10(lr) + 3.0) ** 2 + 0.1, 6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    print(f"training with lr={args.lr}")  # unflushed: gpujobd sets PYTHONUNBUFFERED for the log
    time.sleep(args.seconds)
    partial = f"{args.result}.tmp"
    with open(partial, "w") as out:
        json.dump({"lr": args.lr, "val_loss": loss_for(args.lr)}, out)
    os.replace(partial, args.result)


if __name__ == "__main__":
    main()
