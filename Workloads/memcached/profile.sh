#!/usr/bin/env bash
# The memcached workload profile for the migration benchmark (see README.md).
#
# Source it from a harness (it defines variables and functions, changes no
# shell options), or run it:
#   profile.sh show                       the settings and the commands below
#   profile.sh kernel-args                -> epcopy.memcached_mb=N (add to -append)
#   profile.sh warmup  TARGET_FILE        fill memcached to MC_FILL_MB, print the time
#   profile.sh load    TARGET_FILE CSV [DURATION_S]   steady-state closed-loop load
#   profile.sh neighbour cpu|membw CSV [DURATION_S]   the source host's noisy neighbour
#
# TARGET_FILE holds one line HOST:PORT (the guest's memcached, e.g. the source
# QEMU's hostfwd 127.0.0.1:PORT). The load generator re-reads it every
# interval: at switch-over, write the destination's address into it
# (atomically: write a temp file, then mv) and all connections move.
#
# Settings (environment; defaults for `-m 1024 -smp 1`):
#   MC_GUEST_MB       guest RAM, MiB                                  (1024)
#   MC_FILL_FRACTION  part of guest RAM to fill with values           (0.2 -> 200 MiB)
#   MC_FILL_MB        values stored by the warm-up, MiB               (GUEST_MB * FRACTION)
#   MC_MEMCACHED_MB   memcached -m (epcopy.memcached_mb); must hold
#                     FILL_MB plus ~10 % item overhead (1 KiB values) (max(64, 2 * FILL_MB))
#   MC_CONNECTIONS 8, MC_GET_RATIO 0.9, MC_VALUE_SIZE 1024, MC_INTERVAL_MS 250,
#   MC_TIMEOUT_MS 1000 (a request slower than this counts as an error and its
#   connection is reopened), MC_DURATION 60, MC_NEIGHBOUR_PROCS 2.
# Keys: the warm-up stores k0..k(N-1), N = FILL_MB MiB / VALUE_SIZE; the load
# uses the same N keys (MC_KEYS overrides), so every get should hit unless
# memcached evicted (the CSV's misses column shows it).

MC_PROFILE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MC_LOADGEN_DIR=$(cd "$MC_PROFILE_DIR/../loadgen" && pwd)
MC_PYTHON=${MC_PYTHON:-python3}

MC_GUEST_MB=${MC_GUEST_MB:-1024}
MC_FILL_FRACTION=${MC_FILL_FRACTION:-0.2}
MC_FILL_MB=${MC_FILL_MB:-$(awk -v m="$MC_GUEST_MB" -v f="$MC_FILL_FRACTION" 'BEGIN { printf "%d", m * f + 0.5 }')}
MC_MEMCACHED_MB=${MC_MEMCACHED_MB:-$((MC_FILL_MB * 2 > 64 ? MC_FILL_MB * 2 : 64))}
MC_CONNECTIONS=${MC_CONNECTIONS:-8}
MC_GET_RATIO=${MC_GET_RATIO:-0.9}
MC_VALUE_SIZE=${MC_VALUE_SIZE:-1024}
MC_INTERVAL_MS=${MC_INTERVAL_MS:-250}
MC_TIMEOUT_MS=${MC_TIMEOUT_MS:-1000}
MC_DURATION=${MC_DURATION:-60}
MC_NEIGHBOUR_PROCS=${MC_NEIGHBOUR_PROCS:-2}
MC_KEYS=${MC_KEYS:-$(((MC_FILL_MB * 1048576 + MC_VALUE_SIZE - 1) / MC_VALUE_SIZE))}

# Kernel command line words for the guest (epcopy-init reads them).
mc_kernel_args() {
    printf 'epcopy.memcached_mb=%s\n' "$MC_MEMCACHED_MB"
}

# mc_warmup TARGET_FILE: store MC_FILL_MB MiB of values; prints
# "memcache_load: warm-up stored ... in X s ..." on stdout.
mc_warmup() {
    "$MC_PYTHON" "$MC_LOADGEN_DIR/memcache_load.py" --target-file "$1" \
        --connections "$MC_CONNECTIONS" --value-size "$MC_VALUE_SIZE" \
        --timeout-ms "$MC_TIMEOUT_MS" --warmup-mb "$MC_FILL_MB" --duration 0
}

# mc_load TARGET_FILE CSV [DURATION_S]: closed-loop load, one CSV row per
# interval; a one-line summary on stdout at the end.
mc_load() {
    "$MC_PYTHON" "$MC_LOADGEN_DIR/memcache_load.py" --target-file "$1" --out "$2" \
        --duration "${3:-$MC_DURATION}" --connections "$MC_CONNECTIONS" \
        --get-ratio "$MC_GET_RATIO" --keys "$MC_KEYS" --value-size "$MC_VALUE_SIZE" \
        --interval-ms "$MC_INTERVAL_MS" --timeout-ms "$MC_TIMEOUT_MS"
}

# mc_neighbour cpu|membw CSV [DURATION_S]: noisy neighbour on this host.
mc_neighbour() {
    "$MC_PYTHON" "$MC_LOADGEN_DIR/neighbour.py" --kind "$1" --out "$2" \
        --duration "${3:-$MC_DURATION}" --procs "$MC_NEIGHBOUR_PROCS" --interval-ms "$MC_INTERVAL_MS"
}

mc_show() {
    local v
    for v in MC_GUEST_MB MC_FILL_FRACTION MC_FILL_MB MC_MEMCACHED_MB MC_KEYS MC_CONNECTIONS \
        MC_GET_RATIO MC_VALUE_SIZE MC_INTERVAL_MS MC_TIMEOUT_MS MC_DURATION MC_NEIGHBOUR_PROCS; do
        printf '%s=%s\n' "$v" "${!v}"
    done
    echo "kernel args: $(mc_kernel_args)"
    echo "warm-up:     $(declare -f mc_warmup | sed -n '/MC_PYTHON/,/^}/p' | grep -v '^}' | tr -s ' \\\n' ' ')"
    echo "load:        $(declare -f mc_load | sed -n '/MC_PYTHON/,/^}/p' | grep -v '^}' | tr -s ' \\\n' ' ')"
    echo "neighbour:   $(declare -f mc_neighbour | sed -n '/MC_PYTHON/,/^}/p' | grep -v '^}' | tr -s ' \\\n' ' ')"
    if ((MC_MEMCACHED_MB * 10 < MC_FILL_MB * 11)); then
        echo "warning: memcached -m $MC_MEMCACHED_MB cannot hold $MC_FILL_MB MiB of values; expect evictions/misses" >&2
    fi
    if ((MC_MEMCACHED_MB + 256 > MC_GUEST_MB)); then
        echo "warning: memcached -m $MC_MEMCACHED_MB leaves < 256 MiB of a $MC_GUEST_MB MiB guest for the rest (MariaDB ~100 MiB)" >&2
    fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
    cmd=${1:-show}
    shift || true
    case $cmd in
    show) mc_show ;;
    kernel-args) mc_kernel_args ;;
    warmup) (($# == 1)) || usage; mc_warmup "$1" ;;
    load) (($# >= 2)) || usage; mc_load "$@" ;;
    neighbour) (($# >= 2)) || usage; mc_neighbour "$@" ;;
    *) usage ;;
    esac
fi
