#!/bin/sh
# The README's main command (`make demo`) runs this inside the sandbox, or on a host whose PID 1 is
# systemd when asked to (GPUJOBD_DEMO_ON_HOST=1 make demo-host). It installs gpujobd as a service
# and shows what it is for.
set -eu
checkout=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_alice() { (cd /home/alice && runuser -u alice -- "$@"); }

say "install gpujobd from this checkout and start it as a systemd service"
make -s -C "$checkout" install PREFIX=/usr/local >/dev/null
id alice >/dev/null 2>&1 || useradd --create-home --user-group --shell /bin/sh alice
busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig
systemctl daemon-reload
systemctl enable --now gpujobd
systemctl --no-pager status gpujobd | head -n 9

say "alice submits a job whose processes try to escape: setsid, a double fork, nohup, a SIGTERM-ignorer"
job=$(as_alice gpujobctl submit --name escape-artist -- sh -c '
    echo "training starts"; setsid sleep 3001 & (sleep 3002 &); nohup sleep 3003 >/dev/null 2>&1 &
    sh -c "trap \"\" TERM; while :; do sleep 1; done" & echo "all children started"; wait')
echo "job id: $job"
sleep 1
as_alice gpujobctl status "$job"
say "systemd sees every one of them in the job's scope"
systemd-cgls --no-pager -u "gpujob-$job.scope"
say "the job's own log"
as_alice gpujobctl logs "$job"

say "alice stops it: SIGTERM to every process in the cgroup, SIGKILL after the stop timeout"
as_alice gpujobctl stop "$job"
as_alice gpujobctl wait "$job" || true
as_alice gpujobctl status "$job" | head -n 12
printf 'processes left of the job: '
pgrep -fc 'sleep 300[123]|trap' || true

say "the daemon is killed with SIGKILL while a job runs"
job=$(as_alice gpujobctl submit --name survivor -- sh -c 'while :; do date; sleep 1; done')
sleep 1
systemctl kill --signal=SIGKILL gpujobd
sleep 2
printf 'the job still runs: '; systemctl is-active "gpujob-$job.scope"
while [ "$(systemctl is-active gpujobd)" != active ]; do sleep 0.2; done
echo "systemd restarted gpujobd; it re-attached the job:"
as_alice gpujobctl status "$job" | head -n 6
as_alice gpujobctl stop "$job"
as_alice gpujobctl wait "$job" || true
as_alice gpujobctl list --all
printf 'processes left in gpujob.slice: '
cat /sys/fs/cgroup/gpujob.slice/*/cgroup.procs 2>/dev/null | wc -l
