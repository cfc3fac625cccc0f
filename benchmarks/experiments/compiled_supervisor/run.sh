#!/bin/sh
# The experiment end to end, from the checkout's root after `make venv wheels`:
#   sh benchmarks/experiments/compiled_supervisor/run.sh [JOBS [ROUNDS]]
# It ran before the compiled supervisor existed, on the forked Python supervisors: both sides are
# worktrees of BASE (default bd8f78f, the last commit with them), side B with zygote.patch applied.
# They live under build/ (the sandbox sees the checkout, not /tmp or /var/tmp); the probe supervisor
# is compiled into build/ as well.
set -eu
here=benchmarks/experiments/compiled_supervisor
base=${BASE:-bd8f78f}
top=$PWD/build/experiments/compiled-supervisor
probe=$top/probe-supervisor
mkdir -p "$top"
gcc -O2 -Wall -Wno-unused-result -o "$probe" "$here/probe_supervisor.c"
for side in a b; do
    git worktree remove --force "$top/side-$side" 2>/dev/null || true
    git worktree add -q --detach "$top/side-$side" "$base"
    mkdir -p "$top/side-$side/build/wheels"
    cp -r build/wheels/client build/wheels/nvidia_ml_py-*.whl "$top/side-$side/build/wheels/"
    ln -sfn "$PWD/.venv" "$top/side-$side/.venv"
done
sed "s#@PROBE_SUPERVISOR@#$probe#" "$here/zygote.patch" | git -C "$top/side-b" apply
for side in a b; do
    # Not `make wheels` there: with this checkout's venv it would re-point the venv's editable install.
    .venv/bin/pip wheel -q --no-deps -w "$top/side-$side/build/wheels" "$top/side-$side"
done
python3 tests/sandbox/sandbox.py run -- .venv/bin/python "$here/ab.py" "$top/side-a" "$top/side-b" \
    "${1:-600}" "${2:-2}"
for side in a b; do git worktree remove --force "$top/side-$side"; done
