#!/bin/sh
# The experiment end to end, from the checkout's root after `make venv wheels`:
#   sh benchmarks/experiments/compiled_supervisor/run.sh [JOBS [ROUNDS]]
# Side B is a worktree of HEAD under build/ (the sandbox sees the checkout, not /tmp or /var/tmp)
# with zygote.patch applied; the probe supervisor is compiled into build/ as well.
set -eu
here=benchmarks/experiments/compiled_supervisor
side_b=$PWD/build/experiments/compiled-supervisor/side-b
probe=$PWD/build/experiments/compiled-supervisor/probe-supervisor
mkdir -p "$(dirname "$probe")"
gcc -O2 -Wall -Wno-unused-result -o "$probe" "$here/probe_supervisor.c"
git worktree remove --force "$side_b" 2>/dev/null || true
git worktree add -q --detach "$side_b" HEAD
sed "s#@PROBE_SUPERVISOR@#$probe#" "$here/zygote.patch" | git -C "$side_b" apply
mkdir -p "$side_b/build/wheels"
cp -r build/wheels/client build/wheels/nvidia_ml_py-*.whl "$side_b/build/wheels/"
# Not `make wheels` there: with this checkout's venv it would re-point the venv's editable install.
.venv/bin/pip wheel -q --no-deps -w "$side_b/build/wheels" "$side_b"
ln -sfn "$PWD/.venv" "$side_b/.venv"
python3 tests/sandbox/sandbox.py run -- .venv/bin/python "$here/ab.py" "$PWD" "$side_b" "${1:-600}" "${2:-2}"
git worktree remove --force "$side_b"
