#!/usr/bin/env bash
# Smoke test of the bench image (Workloads/images/out, built by build.sh):
# boots it under QEMU/TCG on a throwaway qcow2 overlay, waits for the
# "epcopy-bench: memcached up" and "... mariadb up" console lines, then talks to
# memcached and MariaDB through user-networking port forwards and prints the
# boot-to-ready times (host clock, from QEMU start). Cleans up after itself.
# Options (environment): EPCOPY_BOOT_TIMEOUT (s, default 180), EPCOPY_APPEND
# (extra kernel command line), EPCOPY_MEM (MiB, default 1024), KEEP_SERIAL=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
KERNEL="$REPO/Workloads/guest/out/vmlinux"
INITRD="$HERE/out/initrd.img"
IMAGE="$HERE/out/bench.img"
TIMEOUT=${EPCOPY_BOOT_TIMEOUT:-180}
MEM=${EPCOPY_MEM:-1024}
for f in "$KERNEL" "$INITRD" "$IMAGE"; do
    [[ -f "$f" ]] || { echo "boot: $f is missing (run Workloads/images/build.sh)" >&2; exit 2; }
done
if ! command -v mariadb >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mariadb-client >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mariadb-client >/dev/null; }
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MC_PORT=$(free_port)
DB_PORT=$(free_port)
while [[ "$DB_PORT" == "$MC_PORT" ]]; do DB_PORT=$(free_port); done

WORK=$(mktemp -d /tmp/epcopy-boot.XXXXXX)
OVERLAY="$WORK/bench.qcow2"
SERIAL="$WORK/serial.log"
AGENT_SOCK="$WORK/agent.sock"
QEMU_PID=
cleanup() {
    local rc=$?
    if [[ -n "$QEMU_PID" ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$QEMU_PID" 2>/dev/null || true
    fi
    if ((rc)) && [[ -f "$SERIAL" ]]; then
        echo "boot: failed (rc=$rc); last console lines:" >&2
        tail -n 30 "$SERIAL" >&2
    fi
    if [[ "${KEEP_SERIAL:-0}" == 1 && -f "$SERIAL" ]]; then
        cp "$SERIAL" /tmp/epcopy-boot-serial.log
        echo "boot: console log kept in /tmp/epcopy-boot-serial.log"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

qemu-img create -q -f qcow2 -F raw -b "$IMAGE" "$OVERLAY"
T0=$(date +%s.%N)
timeout --signal=KILL $((TIMEOUT + 30)) qemu-system-x86_64 \
    -machine q35 -m "$MEM" -smp 1 -accel tcg -nodefaults -display none -no-reboot \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 quiet root=/dev/vda rw epcopy.ip=10.0.2.15/24 epcopy.gw=10.0.2.2 ${EPCOPY_APPEND:-}" \
    -drive file="$OVERLAY",if=virtio,format=qcow2 \
    -netdev user,id=n0,hostfwd=tcp:127.0.0.1:$MC_PORT-:11211,hostfwd=tcp:127.0.0.1:$DB_PORT-:3306 \
    -device virtio-net-pci,netdev=n0 \
    -device virtio-serial-pci,max_ports=3 \
    -chardev socket,id=ch0,path="$AGENT_SOCK",server=on,wait=off \
    -device virtserialport,chardev=ch0,name=org.epcopy.agent.0 \
    -serial file:"$SERIAL" >"$WORK/qemu.log" 2>&1 &
QEMU_PID=$!

# Wait for both "up" lines; remember when each was first seen (host clock).
MC_T='' DB_T=''
while [[ -z "$MC_T" || -z "$DB_T" ]]; do
    now=$(date +%s.%N)
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then
        echo "boot: QEMU exited early:" >&2
        cat "$WORK/qemu.log" >&2
        exit 1
    fi
    if (($(awk -v a="$now" -v b="$T0" -v t="$TIMEOUT" 'BEGIN { print (a - b > t) }'))); then
        echo "boot: no 'up' lines within ${TIMEOUT}s" >&2
        exit 1
    fi
    if grep -q 'epcopy-bench: .* did not answer' "$SERIAL" 2>/dev/null; then
        echo "boot: a service did not come up" >&2
        exit 1
    fi
    [[ -n "$MC_T" ]] || ! grep -q 'epcopy-bench: memcached up' "$SERIAL" 2>/dev/null || MC_T=$now
    [[ -n "$DB_T" ]] || ! grep -q 'epcopy-bench: mariadb up' "$SERIAL" 2>/dev/null || DB_T=$now
    sleep 0.1
done
secs() { awk -v a="$1" -v b="$T0" 'BEGIN { printf "%.1f", a - b }'; }
grep -a 'epcopy-bench:' "$SERIAL" | tr -d '\r' | sed 's/^/guest: /'

# memcached through the forwarded port.
MC_REPLY=$(python3 - "$MC_PORT" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"set k 0 0 1\r\nx\r\nget k\r\n")
buf = b""
while not buf.endswith(b"END\r\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    buf += chunk
print(buf.decode().replace("\r\n", " | ").strip(" |"))
PY
)
[[ "$MC_REPLY" == "STORED | VALUE k 0 1 | x | END" ]] || { echo "boot: memcached answered: $MC_REPLY" >&2; exit 1; }
echo "boot: memcached ok via 127.0.0.1:$MC_PORT ($MC_REPLY)"

# MariaDB through the forwarded port, as sbtest.
DB_REPLY=$(mariadb -h 127.0.0.1 -P "$DB_PORT" -u sbtest -psbtest --connect-timeout=10 -N -B sbtest \
    -e 'select 1, version(), database()' 2>&1) || { echo "boot: mariadb: $DB_REPLY" >&2; exit 1; }
echo "boot: mariadb ok via 127.0.0.1:$DB_PORT ($(tr '\t' ' ' <<<"$DB_REPLY"))"

# The agent logs through /dev/kmsg, which reaches the console.
for _ in $(seq 50); do grep -q 'epcopy-agent: serving' "$SERIAL" && break; sleep 0.1; done
if line=$(grep -a -m1 'epcopy-agent: serving' "$SERIAL" | tr -d '\r'); then
    echo "boot: agent ok (${line#*] })"
else
    echo "boot: warning: no 'epcopy-agent: serving' line on the console" >&2
fi
echo "boot: QEMU start -> memcached up $(secs "$MC_T") s, -> mariadb up $(secs "$DB_T") s"
