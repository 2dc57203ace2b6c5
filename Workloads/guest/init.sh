#!/bin/sh
# /init of the epcopy test guest (busybox sh, PID 1). Installed by build.sh.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
if ! mount -t devtmpfs devtmpfs /dev 2>/dev/null; then
    mount -t tmpfs -o mode=0755 tmpfs /dev
    mknod -m 600 /dev/console c 5 1
    mknod -m 666 /dev/null c 1 3
fi
exec </dev/console >/dev/console 2>&1
mkdir -p /tmp /run
# Boot messages are useful; afterwards only errors, so they rarely split memtest lines.
echo 4 >/proc/sys/kernel/printk

# Modules in dependency order (written by build.sh).
while read -r ko; do
    [ -n "$ko" ] || continue
    insmod "/lib/modules/$ko" || echo "epcopy-init: insmod $ko failed"
done </lib/modules/load-order

# The ACPI power button (virsh shutdown, QMP system_powerdown) is an input device of the button driver: a
# press powers the guest off cleanly, so the host sees an orderly shutdown.
for dev in /sys/class/input/event*; do
    [ "$(cat "$dev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (head -c 1 "/dev/input/${dev##*/}" >/dev/null && echo "epcopy-init: power button: powering off" && sync && poweroff -f) &
done

cmdline=$(cat /proc/cmdline)
echo "epcopy-init: up after $(cut -d' ' -f1 /proc/uptime)s"

# epcopy.numa_check=1 (initrd-numa.img, a guest with two or more NUMA nodes): the engine's NUMA placement checked
# on this kernel, its lines on the console, then power off. Nothing else runs. epcopy.numa_check=unbound: the
# control run without the binding, which must fail.
case " $cmdline " in
*" epcopy.numa_check="*)
    args=""
    case " $cmdline " in *" epcopy.numa_check=unbound "*) args=--unbound ;; esac
    if [ -x /bin/epcopy-numa-check ]; then /bin/epcopy-numa-check $args; else echo "epcopy-numa-check: FAIL not in this initrd (boot initrd-numa.img)"; fi
    sync
    poweroff -f
    ;;
esac

# epcopy.agent_once=1: one page census before anything else runs, as one console
# line, so a host can read what the agent costs in a real guest.
case " $cmdline " in
*" epcopy.agent_once=1 "*)
    once=$(/bin/epcopy-agent --once --json 2>&1 | tr '\n' ' ')
    echo "epcopy-agent-once: ${once% }"
    ;;
esac

# The agent serves the host on the virtio-serial port org.epcopy.agent.0 (it
# waits for the port if it is not there yet). epcopy.agent=0 leaves it out.
# Its stdout/stderr reach the console through the kernel log, like memtest's
# lines: a tty write can stall after a migration (see memtest.c), and the agent
# must never block on a log line. Level 5 is shown once the console level is 7.
case " $cmdline " in
*" epcopy.agent=0 "*) echo "epcopy-init: agent disabled (epcopy.agent=0)" ;;
*)
    echo 7 >/proc/sys/kernel/printk
    echo on >/proc/sys/kernel/printk_devkmsg
    /bin/epcopy-agent 2>&1 | while IFS= read -r line; do
        echo "<5>$line" 2>/dev/null >/dev/kmsg || echo "$line"
    done &
    ;;
esac

/bin/epcopy-memtest &
memtest=$!

case " $cmdline " in
*" epcopy.shell=1 "*)
    # Interactive shell on the console, respawned if it exits.
    while true; do setsid cttyhack sh; sleep 1; done &
    ;;
esac

wait "$memtest"
echo "epcopy-init: epcopy-memtest exited rc=$?"
# PID 1 must never exit.
while true; do
    sleep 3600
done
