#!/bin/sh
# Runs as PID 1 of the sandbox's fresh PID, mount and cgroup namespaces (started by sandbox.py via
# unshare). Builds a copy-on-write root over the host's / and execs systemd in it.
# Nothing here may write to a host path: every mount is made in this private mount namespace, and
# every file is written into tmpfs or the overlay's tmpfs upper layer.
set -eu
: "${SBX_NAME:?}" "${SBX_CHECKOUT:?}" "${SBX_TARGET:?}" "${SBX_UNITS:?}"

mount --make-rprivate /

# Scratch space: a tmpfs over /mnt, visible only in this mount namespace.
scratch=/mnt
mount -t tmpfs -o mode=0755 sbx-scratch "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root="$scratch/root"

# A private /dev: a tmpfs with the few host devices a booted systemd and the tests need, bound one by
# one. Binding the host's whole /dev would make every node created inside (the GPU tests mknod fake
# /dev/nvidiaN) appear on the host.
mount -t tmpfs -o mode=0755,nosuid sbx-dev "$root/dev"
for node in null zero full random urandom tty kmsg console; do
    [ -e "/dev/$node" ] || continue
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 sbx-devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev sbx-shm "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
for fd in 0:stdin 1:stdout 2:stderr; do
    ln -s "/proc/self/fd/${fd%%:*}" "$root/dev/${fd#*:}"
done
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
for d in run tmp var/tmp; do
    mount -t tmpfs -o mode=1777 "sbx-$(echo "$d" | tr / -)" "$root/$d"
done
chmod 0755 "$root/run"
mkdir -p "$root$SBX_CHECKOUT"
mount --bind "$SBX_CHECKOUT" "$root$SBX_CHECKOUT"

# Units: our boot target plus masks, written to the overlay's /etc so that they outrank every
# other unit directory. Generators are disabled the same way (a /dev/null in /etc wins).
mkdir -p "$root/etc/systemd/system" "$root/etc/systemd/system-generators"
cp "$SBX_UNITS/$SBX_TARGET" "$root/etc/systemd/system/$SBX_TARGET"
for gen in /lib/systemd/system-generators/*; do
    [ -e "$gen" ] && ln -sf /dev/null "$root/etc/systemd/system-generators/${gen##*/}"
done
while read -r unit; do
    case "$unit" in ''|'#'*) continue ;; esac
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done < "$SBX_UNITS/masked-units"
# Whatever the host's image wants at sysinit acts on the machine: mask all of it too.
for wants in /lib/systemd/system/sysinit.target.wants /etc/systemd/system/sysinit.target.wants; do
    [ -d "$wants" ] || continue
    for unit in "$wants"/*; do
        name=${unit##*/}
        case "$name" in systemd-journald.service) continue ;; esac
        [ -e "$root/etc/systemd/system/$name" ] && [ ! -L "$root/etc/systemd/system/$name" ] && continue
        ln -sf /dev/null "$root/etc/systemd/system/$name"
    done
done
rm -rf "$root/etc/systemd/system/sysinit.target.wants" "$root/etc/systemd/system/multi-user.target.wants" \
    "$root/etc/systemd/system/timers.target.wants" "$root/etc/systemd/system/getty.target.wants"

cd "$root"
mkdir -p .sbx-old-root
pivot_root . .sbx-old-root
cd /
umount -l /.sbx-old-root
rmdir /.sbx-old-root

exec env -i container="$SBX_NAME" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit="$SBX_TARGET" --log-target=console --show-status=no
