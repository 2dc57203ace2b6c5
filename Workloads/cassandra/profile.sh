#!/usr/bin/env bash
# The Cassandra workload profile for the migration benchmark (see README.md).
#
# Cassandra is not installable on epcopy's build machines (it is not in Debian,
# and Apache's apt repository and the Java 11 runtime it needs are out of
# reach), so on such a machine every command prints why and exits 77 ("skip").
# The commands are kept correct for hosts that have it:
#   profile.sh check                      is Cassandra usable here? (exit 0 / 77)
#   profile.sh show                       the settings and commands
#   profile.sh warmup TARGET_FILE         write CS_ROWS rows (cassandra-stress write)
#   profile.sh load   TARGET_FILE LOG [DURATION_S]   mixed read/write load, per-interval log
#
# TARGET_FILE holds one line HOST:PORT (the guest's CQL port 9042, forwarded
# by the source QEMU). cassandra-stress cannot follow a moving server, so the
# harness restarts `load` against the new target after the switch (as the
# MySQL driver does with sysbench).
#
# Settings (environment):
#   CS_ROWS 2000000 (cassandra-stress's default row: 5 columns of 34 bytes)
#   CS_THREADS 16, CS_RATIO "write=1,read=3", CS_INTERVAL 1s (cassandra-stress's
#   log interval; coarser than the harness's 250 ms), CS_DURATION 60
#   CS_STRESS   the cassandra-stress binary (default: first on PATH, or
#               /opt/cassandra/tools/bin/cassandra-stress)

CS_ROWS=${CS_ROWS:-2000000}
CS_THREADS=${CS_THREADS:-16}
CS_RATIO=${CS_RATIO:-write=1,read=3}
CS_INTERVAL=${CS_INTERVAL:-1s}
CS_DURATION=${CS_DURATION:-60}
CS_STRESS=${CS_STRESS:-$(command -v cassandra-stress 2>/dev/null || echo /opt/cassandra/tools/bin/cassandra-stress)}

cs_check() {
    if [[ ! -x $CS_STRESS ]]; then
        echo "cassandra: skipped: cassandra-stress not found (CS_STRESS=$CS_STRESS). Cassandra is not in Debian;" \
            "install it from https://cassandra.apache.org/ (with Java 11) into the host and the guest image to" \
            "run this profile." >&2
        return 77
    fi
    if ! command -v java >/dev/null; then
        echo "cassandra: skipped: cassandra-stress needs a Java runtime (java not on PATH)" >&2
        return 77
    fi
}

cs_target() {
    local t
    t=$(head -n1 "$1")
    [[ $t == *:* ]] || { echo "cassandra: $1 must hold HOST:PORT" >&2; return 2; }
    echo "$t"
}

cs_warmup() {
    local t
    cs_check || return
    t=$(cs_target "$1") || return
    "$CS_STRESS" write n="$CS_ROWS" cl=ONE -rate threads="$CS_THREADS" \
        -node "${t%:*}" -port native="${t##*:}" -log interval="$CS_INTERVAL"
}

cs_load() {
    local t
    cs_check || return
    t=$(cs_target "$1") || return
    "$CS_STRESS" mixed "ratio($CS_RATIO)" duration="${3:-$CS_DURATION}s" cl=ONE \
        -pop dist="UNIFORM(1..$CS_ROWS)" -rate threads="$CS_THREADS" \
        -node "${t%:*}" -port native="${t##*:}" -log interval="$CS_INTERVAL" file="$2"
}

cs_show() {
    local v
    for v in CS_ROWS CS_THREADS CS_RATIO CS_INTERVAL CS_DURATION CS_STRESS; do printf '%s=%s\n' "$v" "${!v}"; done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -uo pipefail
    usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
    cmd=${1:-show}
    shift || true
    case $cmd in
    check) cs_check ;;
    show) cs_show; cs_check ;;
    warmup) (($# == 1)) || usage; cs_warmup "$1" ;;
    load) (($# >= 2)) || usage; cs_load "$@" ;;
    *) usage ;;
    esac
fi
