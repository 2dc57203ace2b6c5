#!/usr/bin/env bash
# The MySQL (MariaDB) workload profile for the migration benchmark (see README.md).
#
# Source it from a harness (it defines variables and functions, changes no
# shell options), or run it:
#   profile.sh show                       the settings and the commands below
#   profile.sh kernel-args                -> epcopy.memcached=0 epcopy.innodb_mb=N (add to -append)
#   profile.sh warmup  TARGET_FILE        read the dataset into the buffer pool, print the time
#   profile.sh check   TARGET_FILE        buffer pool pages vs. dataset pages (fails below 90 %)
#   profile.sh load    TARGET_FILE CSV [DURATION_S]   sysbench oltp_read_write, one CSV row per interval
#   profile.sh neighbour cpu|membw CSV [DURATION_S]   the source host's noisy neighbour
#
# TARGET_FILE holds one line HOST:PORT (the guest's MariaDB, e.g. the source
# QEMU's hostfwd 127.0.0.1:PORT). The load driver re-reads it every 50 ms: at
# switch-over, write the destination's address into it (atomically: write a
# temp file, then mv) and sysbench is restarted there.
#
# The dataset is the image's (Workloads/images/build.sh prepares it with
# sysbench at build time and records it in Workloads/images/out/dataset.txt):
# database sbtest, tables sbtest1..TABLES of TABLE_SIZE rows.
# Settings (environment):
#   MY_DATASET_FILE   the image's dataset description       (../images/out/dataset.txt)
#   MY_TABLES, MY_TABLE_SIZE, MY_DATA_BYTES                 (from MY_DATASET_FILE)
#   MY_INNODB_MB      InnoDB buffer pool, MiB (epcopy.innodb_mb): the dataset
#                     plus 25 % for the pages the load adds, in 64 MiB steps
#   MY_THREADS 4 (sysbench threads = connections), MY_INTERVAL_MS 250,
#   MY_DURATION 60, MY_NEIGHBOUR_PROCS 2, MY_RAND_TYPE uniform (every row is
#   as likely: the whole buffer pool is the working set).
# Client tools on the host: sysbench (Debian's 1.0.20) and mariadb-client.

MY_PROFILE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MY_LOADGEN_DIR=$(cd "$MY_PROFILE_DIR/../loadgen" && pwd)
MY_PYTHON=${MY_PYTHON:-python3}
MY_DATASET_FILE=${MY_DATASET_FILE:-$MY_PROFILE_DIR/../images/out/dataset.txt}

my_dataset_value() {
    [[ -r "$MY_DATASET_FILE" ]] && sed -n "s/^$1=//p" "$MY_DATASET_FILE"
}
MY_TABLES=${MY_TABLES:-$(my_dataset_value tables)}
MY_TABLE_SIZE=${MY_TABLE_SIZE:-$(my_dataset_value table_size)}
MY_DATA_BYTES=${MY_DATA_BYTES:-$(my_dataset_value data_bytes)}
MY_INNODB_MB=${MY_INNODB_MB:-$(awk -v b="${MY_DATA_BYTES:-0}" \
    'BEGIN { m = int(b / 1048576 * 1.25); m = int((m + 63) / 64) * 64; print (m < 128 ? 128 : m) }')}
MY_THREADS=${MY_THREADS:-4}
MY_INTERVAL_MS=${MY_INTERVAL_MS:-250}
MY_DURATION=${MY_DURATION:-60}
MY_NEIGHBOUR_PROCS=${MY_NEIGHBOUR_PROCS:-2}
MY_RAND_TYPE=${MY_RAND_TYPE:-uniform}

my_need_dataset() {
    if [[ -z "$MY_TABLES" || -z "$MY_TABLE_SIZE" ]]; then
        echo "mysql profile: no dataset ($MY_DATASET_FILE missing;" \
            "run make images, or set MY_TABLES and MY_TABLE_SIZE)" >&2
        return 1
    fi
}

# Kernel command line words for the guest (epcopy-init reads them).
my_kernel_args() {
    printf 'epcopy.memcached=0 epcopy.innodb_mb=%s\n' "$MY_INNODB_MB"
}

# my_warmup TARGET_FILE: scan every table's clustered and secondary index once;
# prints "sysbench_load: warm-up read ... in X s" on stdout.
my_warmup() {
    my_need_dataset || return
    "$MY_PYTHON" "$MY_LOADGEN_DIR/sysbench_load.py" --target-file "$1" --tables "$MY_TABLES" \
        --table-size "$MY_TABLE_SIZE" --warmup --duration 0
}

# my_check TARGET_FILE: the buffer pool must hold >= 90 % of the dataset's pages.
my_check() {
    local hostport host port held pages
    hostport=$(<"$1")
    host=${hostport%:*} port=${hostport##*:}
    read -r held pages < <(mariadb -h "$host" -P "$port" -u sbtest -psbtest --connect-timeout=10 -N -B sbtest -e "
        SELECT (SELECT variable_value FROM information_schema.global_status
                WHERE variable_name = 'INNODB_BUFFER_POOL_PAGES_DATA'),
               (SELECT SUM(data_length + index_length) DIV @@innodb_page_size
                FROM information_schema.tables WHERE table_schema = 'sbtest')") || return
    echo "buffer pool: $held pages with data; dataset: $pages pages"
    ((held * 10 >= pages * 9))
}

# my_load TARGET_FILE CSV [DURATION_S]: sysbench oltp_read_write, one CSV row per
# interval (memcache_load.py's format); a one-line summary on stdout at the end.
my_load() {
    my_need_dataset || return
    "$MY_PYTHON" "$MY_LOADGEN_DIR/sysbench_load.py" --target-file "$1" --out "$2" \
        --duration "${3:-$MY_DURATION}" --threads "$MY_THREADS" --tables "$MY_TABLES" \
        --table-size "$MY_TABLE_SIZE" --rand-type "$MY_RAND_TYPE" --interval-ms "$MY_INTERVAL_MS"
}

# my_neighbour cpu|membw CSV [DURATION_S]: noisy neighbour on this host.
my_neighbour() {
    "$MY_PYTHON" "$MY_LOADGEN_DIR/neighbour.py" --kind "$1" --out "$2" \
        --duration "${3:-$MY_DURATION}" --procs "$MY_NEIGHBOUR_PROCS" --interval-ms "$MY_INTERVAL_MS"
}

my_show() {
    local v
    for v in MY_DATASET_FILE MY_TABLES MY_TABLE_SIZE MY_DATA_BYTES MY_INNODB_MB MY_THREADS MY_RAND_TYPE \
        MY_INTERVAL_MS MY_DURATION MY_NEIGHBOUR_PROCS; do
        printf '%s=%s\n' "$v" "${!v}"
    done
    echo "kernel args: $(my_kernel_args)"
    echo "warm-up:     $(declare -f my_warmup | sed -n '/MY_PYTHON/,/^}/p' | grep -v '^}' | tr -s ' \\\n' ' ')"
    echo "load:        $(declare -f my_load | sed -n '/MY_PYTHON/,/^}/p' | grep -v '^}' | tr -s ' \\\n' ' ')"
    echo "neighbour:   $(declare -f my_neighbour | sed -n '/MY_PYTHON/,/^}/p' | grep -v '^}' | tr -s ' \\\n' ' ')"
    my_need_dataset || true
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
    cmd=${1:-show}
    shift || true
    case $cmd in
    show) my_show ;;
    kernel-args) my_kernel_args ;;
    warmup) (($# == 1)) || usage; my_warmup "$1" ;;
    check) (($# == 1)) || usage; my_check "$1" ;;
    load) (($# >= 2)) || usage; my_load "$@" ;;
    neighbour) (($# >= 2)) || usage; my_neighbour "$@" ;;
    *) usage ;;
    esac
fi
