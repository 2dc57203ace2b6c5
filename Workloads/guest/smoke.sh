#!/usr/bin/env bash
# Boots the test guest once, the way epcopy runs it (RAM in a shared file under
# /dev/shm, epcopy-agent on the virtio-serial port org.epcopy.agent.0, memtest's
# lines on the port org.epcopy.log.0), and checks within 60 s that
# epcopy-memtest prints at least 3 OK lines with increasing iter, on the serial
# console and on the org.epcopy.log.0 port, and that the agent started
# (`epcopy-agent: ` lines on the console). Exit 0 on success.
# EPCOPY_AGENT defaults to the binary `make agent` builds.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE"
WANT=3
DEADLINE=60

export EPCOPY_AGENT=${EPCOPY_AGENT:-$HERE/../../.build/static/release/epcopy-agent}
"$HERE/build.sh"
if ! command -v qemu-system-x86_64 >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null; }
fi
command -v python3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null

SHM=/dev/shm/epcopy-smoke-$$
SOCK=/tmp/epcopy-smoke-$$.sock
AGENT_SOCK=/tmp/epcopy-smoke-$$.agent.sock
SERIAL=/tmp/epcopy-smoke-$$.serial.log
PORTLOG=/tmp/epcopy-smoke-$$.port.log
QEMULOG=/tmp/epcopy-smoke-$$.qemu.log
QEMU_PID=""
READER_PID=""
OK=0

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    set +e
    if [[ -n "$READER_PID" ]]; then kill "$READER_PID" 2>/dev/null; wait "$READER_PID" 2>/dev/null; fi
    if [[ -n "$QEMU_PID" ]]; then
        # $QEMU_PID is timeout(1), which passes the signal on to QEMU.
        kill "$QEMU_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$QEMU_PID" $(pgrep -P "$QEMU_PID") 2>/dev/null
        wait "$QEMU_PID" 2>/dev/null
    fi
    rm -f "$SHM" "$SOCK" "$AGENT_SOCK"
    if ((OK)); then
        rm -f "$SERIAL" "$PORTLOG" "$QEMULOG"
    else
        echo "smoke: logs kept: $SERIAL $PORTLOG $QEMULOG" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

: >"$SERIAL"
: >"$PORTLOG"
T0=$(date +%s.%N)
timeout 90 qemu-system-x86_64 -accel tcg -nodefaults -display none \
    -machine q35,memory-backend=mem0 -m 512M -smp 1 \
    -object memory-backend-file,id=mem0,size=512M,mem-path="$SHM",share=on \
    -kernel out/vmlinux -initrd out/initrd.img \
    -append "console=ttyS0 epcopy.memtest_mib=128 epcopy.seed=7" \
    -serial file:"$SERIAL" \
    -device virtio-serial-pci,max_ports=3 \
    -chardev socket,id=ch0,path="$AGENT_SOCK",server=on,wait=off \
    -device virtserialport,chardev=ch0,name=org.epcopy.agent.0 \
    -chardev socket,id=ch1,path="$SOCK",server=on,wait=off \
    -device virtserialport,chardev=ch1,name=org.epcopy.log.0 2>"$QEMULOG" &
QEMU_PID=$!

# Nobody talks to the agent here (its port stays unconnected, which it must
# tolerate). The host side of the log port: copy what the guest sends into $PORTLOG.
python3 -u - "$SOCK" "$PORTLOG" <<'EOF' &
import socket, sys, time
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(200):
    try:
        s.connect(path)
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("smoke: cannot connect to " + path)
with open(out, "ab", buffering=0) as f:
    while True:
        b = s.recv(4096)
        if not b:
            break
        f.write(b)
EOF
READER_PID=$!

# Prints the number of OK lines if the iters increase strictly, else -1; any
# CORRUPT line also gives -1.
count_ok() {
    tr -d '\r' <"$1" | awk '
        /epcopy-memtest iter=[0-9]+ CORRUPT/ { bad = 1 }
        match($0, /epcopy-memtest iter=[0-9]+ pages=[0-9]+ (churn=[0-9]+ )?OK/) {
            split(substr($0, RSTART, RLENGTH), f, /[= ]/)
            it = f[3] + 0
            if (n > 0 && it <= last) bad = 1
            last = it; n++
        }
        END { print (bad ? -1 : n + 0) }'
}

first_ok=""
result=""
while :; do
    now=$(date +%s.%N)
    el=$(awk -v a="$T0" -v b="$now" 'BEGIN { printf "%.1f", b - a }')
    s=$(count_ok "$SERIAL")
    p=$(count_ok "$PORTLOG")
    a=$(tr -d '\r' <"$SERIAL" | grep -ac 'epcopy-agent: ' || true)
    [[ -z "$first_ok" && "$s" -gt 0 ]] && first_ok=$el
    if [[ "$s" -lt 0 || "$p" -lt 0 ]]; then result="CORRUPT or non-increasing iter"; break; fi
    if [[ "$s" -ge $WANT && "$p" -ge $WANT && "$a" -gt 0 ]]; then OK=1; break; fi
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then result="qemu exited"; break; fi
    if awk -v e="$el" -v d="$DEADLINE" 'BEGIN { exit !(e >= d) }'; then result="timeout"; break; fi
    sleep 0.2
done

up=$(sed -n 's/.*epcopy-init: up after \([0-9.]*\)s.*/\1/p' "$SERIAL" | head -n 1)
if ((OK)); then
    echo "smoke: PASS: serial $s OK lines, log port $p OK lines, $a agent lines; first OK ${first_ok}s after qemu start (init up at guest uptime ${up:-?}s), done in ${el}s"
    grep -a 'epcopy-agent: ' "$SERIAL" | tr -d '\r' | head -n 2 | sed 's/^/  serial: /'
    grep -a 'epcopy-memtest' "$SERIAL" | tr -d '\r' | head -n 4 | sed 's/^/  serial: /'
    grep -a 'epcopy-memtest' "$PORTLOG" | head -n 2 | sed 's/^/  port:   /'
    exit 0
fi
echo "smoke: FAIL ($result after ${el}s): serial OK lines=$s, log port OK lines=$p, agent lines=$a" >&2
tail -n 15 "$SERIAL" | sed 's/^/  serial: /' >&2
tail -n 5 "$PORTLOG" | sed 's/^/  port:   /' >&2
sed 's/^/  qemu:   /' "$QEMULOG" >&2
exit 1
