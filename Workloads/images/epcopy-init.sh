#!/bin/bash
# /sbin/epcopy-init: PID 1 of the bench image instead of systemd. Installed by
# Workloads/images/build.sh. Kernel command line options (defaults for QEMU
# user networking):
#   epcopy.ip=10.0.2.15/24 epcopy.gw=10.0.2.2   eth0 address and default route
#   epcopy.memcached_mb=64                      memcached -m
#   epcopy.innodb_mb=512                        MariaDB's InnoDB buffer pool, MiB (holds
#                                               the image's sysbench dataset, out/dataset.txt)
#   epcopy.agent=0 / epcopy.memcached=0 / epcopy.mariadb=0   leave one out
#   epcopy.dirty_free_mib=N                     before the services start, write N MiB (non-zero)
#                                               and free it again: free memory as a guest that has
#                                               been running for a while has it (dirty, not zero)
#   epcopy.shell=1                              root shell on the console
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
umask 022

# Every exec of a dynamically linked program costs ~0.2 s under TCG: the initrd
# mounts all of these with its static busybox; here only what is missing is
# mounted, found with builtins (no mountpoint(1)).
[[ -r /proc/mounts ]] || mount -t proc -o nosuid,nodev,noexec proc /proc
mounts=$(</proc/mounts)
mnt() { [[ "$mounts" == *" $3 "* ]] || mount -t "$1" -o "$2" "$1" "$3"; }
mnt sysfs nosuid,nodev,noexec /sys
mnt devtmpfs mode=0755,nosuid /dev
exec </dev/console >/dev/console 2>&1
mnt tmpfs mode=1777,nosuid,nodev /tmp
mnt tmpfs mode=0755,nosuid,nodev /run
[[ -d /dev/pts ]] || mkdir -m 755 /dev/pts
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
mnt devpts gid=5,mode=620,ptmxmode=000 /dev/pts

ip=10.0.2.15/24 gw=10.0.2.2 mc_mb=64 innodb_mb=512 agent=1 memcached=1 mariadb=1 shell=0 dirty_free_mib=0
for w in $(</proc/cmdline); do
    case $w in
    epcopy.ip=*) ip=${w#*=} ;;
    epcopy.gw=*) gw=${w#*=} ;;
    epcopy.memcached_mb=*) mc_mb=${w#*=} ;;
    epcopy.innodb_mb=*) innodb_mb=${w#*=} ;;
    epcopy.agent=*) agent=${w#*=} ;;
    epcopy.memcached=*) memcached=${w#*=} ;;
    epcopy.mariadb=*) mariadb=${w#*=} ;;
    epcopy.shell=*) shell=${w#*=} ;;
    epcopy.dirty_free_mib=*) dirty_free_mib=${w#*=} ;;
    esac
done
uptime_s() { local u; read -r u _ </proc/uptime; printf '%s' "$u"; }
# sleep without a fork/exec: a read that times out on a pipe nobody writes to.
exec {snore_fd}<> <(:)
snore() { read -r -t "$1" -u "$snore_fd" _ || :; }

echo epcopy-bench >/proc/sys/kernel/hostname
# One exec of ip(8) for all of it.
{
    echo "link set lo up"
    echo "link set eth0 up"
    echo "addr add $ip dev eth0"
    [[ -z "$gw" || "$gw" == none ]] || echo "route add default via $gw dev eth0"
} | ip -force -batch -
echo "epcopy-bench: init up after $(uptime_s)s, eth0 $ip"

# Used-then-freed memory: a tmpfs of its own, filled with `yes` output (not zeros: QEMU sends a zero page
# as a marker, any other page in full) and unmounted, which returns every page to the buddy allocator.
if [[ $dirty_free_mib =~ ^[0-9]+$ ]] && ((dirty_free_mib > 0)); then
    t0=$(uptime_s)
    mkdir -p /run/epcopy-dirty
    if mount -t tmpfs -o "size=$((dirty_free_mib + 16))m" tmpfs /run/epcopy-dirty; then
        yes epcopy-dirty-free-memory | head -c "$((dirty_free_mib << 20))" >/run/epcopy-dirty/fill
        umount /run/epcopy-dirty
        echo "epcopy-bench: wrote and freed ${dirty_free_mib} MiB ($t0 s -> $(uptime_s) s)"
    fi
fi

# The agent serves the host on the virtio-serial port org.epcopy.agent.0. Its
# output reaches the console through the kernel log: a tty write can stall
# after a migration, and the agent must never block on a log line.
if [[ $agent != 0 ]]; then
    echo 7 >/proc/sys/kernel/printk
    echo on >/proc/sys/kernel/printk_devkmsg
    /usr/local/sbin/epcopy-agent 2>&1 | while IFS= read -r line; do
        echo "<5>$line" 2>/dev/null >/dev/kmsg || echo "$line"
    done &
fi

if [[ $memcached != 0 ]]; then
    memcached -u memcache -m "$mc_mb" -l 0.0.0.0 -p 11211 -c 1024 >/run/memcached.log 2>&1 &
    (
        for ((i = 0; i < 1200; i++)); do
            if { exec 3<>/dev/tcp/127.0.0.1/11211; } 2>/dev/null; then
                printf 'version\r\n' >&3
                if read -r -t 2 reply <&3 && [[ $reply == VERSION* ]]; then
                    exec 3>&-
                    echo "epcopy-bench: memcached up after $(uptime_s)s (${reply%$'\r'}, -m $mc_mb)"
                    exit 0
                fi
                exec 3>&-
            fi
            snore 0.05
        done
        echo "epcopy-bench: memcached did not answer"
    ) &
fi

if [[ $mariadb != 0 ]]; then
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    # The buffer pool starts empty: the benchmark's warm-up fills it and checks that it did (MariaDB
    # would otherwise reload a saved page list at start, in the background, while the benchmark runs).
    mariadbd --user=mysql --innodb-buffer-pool-size="${innodb_mb}M" --innodb-buffer-pool-load-at-startup=OFF \
        --innodb-buffer-pool-dump-at-shutdown=OFF >/run/mariadb.log 2>&1 &
    (
        for ((i = 0; i < 1200; i++)); do
            # The server accepts TCP connections once it is ready; its
            # handshake packet carries the version. (No mariadb-admin: an exec
            # per try would slow the start it is waiting for.)
            if { exec 3<>/dev/tcp/127.0.0.1/3306; } 2>/dev/null; then
                if LC_ALL=C read -r -t 5 -N 40 greeting <&3 && [[ $greeting == *MariaDB* ]]; then
                    exec 3>&-
                    echo "epcopy-bench: mariadb up after $(uptime_s)s (innodb buffer pool $innodb_mb MiB)"
                    exit 0
                fi
                exec 3>&-
            fi
            snore 0.1
        done
        echo "epcopy-bench: mariadb did not answer; last lines of /run/mariadb.log:"
        tail -n 5 /run/mariadb.log
    ) &
fi

if [[ $shell == 1 ]]; then
    (while true; do setsid -c bash -l </dev/console >/dev/console 2>&1; sleep 1; done) &
fi

# PID 1 must never exit; reap whatever ends.
while true; do
    wait -n 2>/dev/null || sleep 3600
done
