#!/bin/sh
# A process tree for the stop benchmark: `tree.sh LEVELS IGNORE MARK` makes 10 processes a level
# (this shell, 8 sleepers, one more sleeper that ignores SIGTERM when IGNORE is 1), and starts the
# next level with setsid at even levels and as a double fork at odd ones: a fork chain that leaves
# its parents' sessions, fanned out at every link. 50 levels: 500 processes. MARK is both the sleep
# time and the marker the benchmark looks for in /proc afterwards.
levels=$1 ignore=$2 mark=$3
i=0
while [ "$i" -lt 8 ]; do
    sleep "$mark" &
    i=$((i + 1))
done
if [ "$ignore" = 1 ]; then
    (trap '' TERM; exec sleep "$mark") &
else
    sleep "$mark" &
fi
if [ "$levels" -gt 1 ]; then
    if [ $((levels % 2)) = 0 ]; then
        setsid sh "$0" $((levels - 1)) "$ignore" "$mark" &
    else
        (sh "$0" $((levels - 1)) "$ignore" "$mark" &)
    fi
fi
wait
