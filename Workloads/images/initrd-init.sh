#!/bin/sh
# /init of the bench initramfs (busybox sh). Installed by build.sh.
# Loads the virtio/ext4 modules, mounts the root disk and switch_roots to the
# Debian image's /sbin/epcopy-init (override: epcopy.init=PATH).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
if ! mount -t devtmpfs devtmpfs /dev 2>/dev/null; then
    mount -t tmpfs -o mode=0755 tmpfs /dev
    mknod -m 600 /dev/console c 5 1
    mknod -m 666 /dev/null c 1 3
fi
exec </dev/console >/dev/console 2>&1

fail() {
    echo "epcopy-initrd: $*; dropping to a shell"
    while true; do setsid cttyhack sh; sleep 1; done
}

# Modules in dependency order (written by build.sh).
while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "/lib/modules/$ko" || echo "epcopy-initrd: insmod $ko failed"
done </lib/modules/load-order

root=/dev/vda fstype=ext4 init=/sbin/epcopy-init opts=rw
for w in $(cat /proc/cmdline); do
    case $w in
    root=*) root=${w#root=} ;;
    rootfstype=*) fstype=${w#rootfstype=} ;;
    ro) opts=ro ;;
    epcopy.init=*) init=${w#epcopy.init=} ;;
    esac
done

# virtio_blk probes synchronously, but be tolerant of a slow device.
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do
    sleep 0.05
    i=$((i + 1))
done
[ -b "$root" ] || fail "$root does not exist"
mkdir -p /newroot
mount -t "$fstype" -o "$opts,noatime" "$root" /newroot || fail "cannot mount $root ($fstype)"
[ -x "/newroot$init" ] || fail "$init is not executable on $root"
# The API file systems are mounted here by the static busybox: each exec of
# the Debian (dynamically linked) mount costs ~0.2 s under TCG. epcopy-init
# mounts whatever is missing itself.
n=/newroot
mount --move /dev $n/dev 2>/dev/null || { umount /dev; mount -t devtmpfs devtmpfs $n/dev; }
mkdir -p $n/dev/pts $n/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts $n/dev/pts
[ -e $n/dev/fd ] || ln -s /proc/self/fd $n/dev/fd
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $n/tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $n/run
umount /sys /proc
mount -t proc -o nosuid,nodev,noexec proc $n/proc
mount -t sysfs -o nosuid,nodev,noexec sysfs $n/sys
exec switch_root /newroot "$init"
