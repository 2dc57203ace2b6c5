#!/usr/bin/env bash
# Builds the epcopy benchmark guest into Workloads/images/out/ (see README.md):
#   out/bench.img   raw ext4 disk: Debian bookworm (debootstrap minbase) with
#                   memcached, mariadb-server, iproute2, the epcopy agent at
#                   /usr/local/sbin/epcopy-agent and /sbin/epcopy-init as PID 1
#   out/initrd.img  busybox + virtio/ext4 modules; /init mounts /dev/vda and
#                   switch_roots to /sbin/epcopy-init
#   out/kernel.txt  which kernel package the initrd's modules come from (boot
#                   with Workloads/guest/out/vmlinux, built from the same package)
#   out/dataset.txt the sysbench dataset in the image's MariaDB (database sbtest:
#                   tables, rows per table, bytes), read by the MySQL benchmark
# Cached in out/.cache: the debootstrap tree (out/.cache/rootfs) is rebuilt only
# when its recipe (build_rootfs below, the package list, the mirror) changes;
# the dataset only when the tree or its size changes; a new init script or
# agent only re-runs mkfs.ext4 (seconds). A no-op run prints nothing.
# EPCOPY_AGENT: the static agent binary (default: the repo's
# .build/static/release/epcopy-agent). EPCOPY_IMAGE_MB: image size (1024).
# EPCOPY_SYSBENCH_TABLES / EPCOPY_SYSBENCH_TABLE_SIZE: the dataset (4 x 300000 rows).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
AGENT=${EPCOPY_AGENT:-$REPO/.build/static/release/epcopy-agent}
if [[ ! -f "$AGENT" || ! -x "$AGENT" ]]; then
    echo "images: EPCOPY_AGENT=$AGENT is not an executable file (run make agent first)" >&2
    exit 2
fi
AGENT=$(realpath "$AGENT")
GUEST="$REPO/Workloads/guest"
OUT="$HERE/out"
CACHE="$OUT/.cache"
LOG="$CACHE/build.log"
mkdir -p "$CACHE"
[[ ! -f "$LOG" || $(stat -c %s "$LOG") -lt 1048576 ]] || : >"$LOG"
exec 9>"$CACHE/lock"
flock 9

SUITE=bookworm
MIRROR=${EPCOPY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
GUEST_PKGS=(memcached mariadb-server iproute2)
IMAGE_MB=${EPCOPY_IMAGE_MB:-1024}
# Initrd modules; their dependencies are added automatically. ext4 and jbd2
# ask the crypto API for "crc32c", which nothing can modprobe in the initrd:
# load crc32c_generic first (crc32c-intel needs SSE4.2, which TCG's default CPU lacks).
WANT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4 virtio_net virtio_console virtio_balloon)
# sysbench (the host's) prepares the dataset against the chroot's mariadbd over loopback TCP.
BUILD_PKGS=(debootstrap busybox-static e2fsprogs xz-utils zstd cpio binutils sysbench)
SB_TABLES=${EPCOPY_SYSBENCH_TABLES:-4}
SB_TABLE_SIZE=${EPCOPY_SYSBENCH_TABLE_SIZE:-300000}

START=$SECONDS
BUILT=()
TMPDIRS=()
on_exit() {
    local rc=$? d
    for d in "${TMPDIRS[@]}"; do rm -rf "$d"; done
    if ((rc)); then
        echo "images: build failed (rc=$rc); last lines of $LOG:" >&2
        tail -n 25 "$LOG" >&2
    fi
}
trap on_exit EXIT

# log, hash_of, hash_str, key_matches, key_store, mktmp, apt_update_once, need_pkgs
source "$HERE/../lib/build-common.sh"

# Run a command chrooted in $1 with /proc, /sys, /dev mounted in a private
# mount namespace: the mounts vanish with the command, even on failure.
in_chroot() {
    local root=$1
    shift
    unshare --mount --propagation private --fork -- /bin/sh -ec '
        r=$1; shift
        mount -t proc proc "$r/proc"
        mount -t sysfs sysfs "$r/sys"
        mount --rbind /dev "$r/dev"
        mount -t tmpfs tmpfs "$r/run"
        mount -t tmpfs tmpfs "$r/tmp"
        exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive "$@"' in_chroot "$root" "$@"
}

# ---- rootfs: debootstrap + packages + MariaDB datadir --------------------------
# The cache key includes this function's text: edit it and the tree is rebuilt.
build_rootfs() {
    local r="$CACHE/rootfs.new"
    rm -rf "$r"
    mkdir -p "$CACHE/debs"
    log "debootstrap --variant=minbase $SUITE $MIRROR"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$r" "$MIRROR" >>"$LOG" 2>&1
    # Packages: no daemon may start in the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$r/etc/resolv.conf"
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$r/etc/apt/sources.list"
    cp -a "$CACHE/debs/." "$r/var/cache/apt/archives/" 2>/dev/null || true
    log "apt-get install ${GUEST_PKGS[*]} (chroot)"
    in_chroot "$r" sh -ec "apt-get update -qq; apt-get install -y -qq --no-install-recommends ${GUEST_PKGS[*]}" >>"$LOG" 2>&1
    # Keep the downloaded packages for the next rebuild of the tree.
    cp -n "$r"/var/cache/apt/archives/*.deb "$CACHE/debs/" 2>/dev/null || true

    # MariaDB: listen on every address, no DNS lookups; a datadir prepared now
    # (mariadb-install-db), with database sbtest and user sbtest/sbtest from any host.
    cat >"$r/etc/mysql/mariadb.conf.d/99-epcopy.cnf" <<'CNF'
[mysqld]
bind-address = 0.0.0.0
skip-name-resolve
CNF
    log "mariadb: datadir, sbtest"
    in_chroot "$r" /bin/bash -ec '
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --skip-test-db >/dev/null
        install -d -o mysql -g mysql /run/mysqld
        mariadbd --user=mysql --skip-networking >/tmp/mariadbd.log 2>&1 &
        for i in $(seq 300); do mariadb-admin --silent ping >/dev/null 2>&1 && break; sleep 0.1; done
        mariadb -e "CREATE DATABASE IF NOT EXISTS sbtest;
                    CREATE USER IF NOT EXISTS '\''sbtest'\''@'\''%'\'' IDENTIFIED BY '\''sbtest'\'';
                    GRANT ALL PRIVILEGES ON sbtest.* TO '\''sbtest'\''@'\''%'\'';
                    FLUSH PRIVILEGES;"
        mariadb-admin shutdown
        wait
    ' >>"$LOG" 2>&1

    # Small and quiet: no package caches, docs or man pages; no services.
    rm -f "$r/usr/sbin/policy-rc.d" "$r/etc/resolv.conf"
    rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/* \
        "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/log/*.log
    echo epcopy-bench >"$r/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tepcopy-bench\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
    printf 'nameserver 10.0.2.3\n' >"$r/etc/resolv.conf"
    mkdir -p "$r/usr/local/sbin"

    rm -rf "$CACHE/rootfs.old"
    [[ -d "$CACHE/rootfs" ]] && mv "$CACHE/rootfs" "$CACHE/rootfs.old"
    mv "$r" "$CACHE/rootfs"
    rm -rf "$CACHE/rootfs.old"
}

# ---- the sysbench dataset, prepared in place in the rootfs's MariaDB datadir -----------
# sysbench oltp_read_write's tables sbtest1..N, as `sysbench prepare` makes them, so the benchmark only
# has to read them into the buffer pool (preparing them in the guest under TCG takes ~8 k rows/s).
# mariadbd runs in the chroot listening on a free loopback port; the host's sysbench fills it.
build_dataset() {
    local r="$CACHE/rootfs" port pid rc=0 sock=/var/lib/mysql/epcopy-build.sock
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rm -f "$OUT/dataset.txt" "$r/var/lib/mysql/ib_buffer_pool"
    log "dataset: sysbench prepare ${SB_TABLES} x ${SB_TABLE_SIZE} rows (mariadbd on 127.0.0.1:$port)"
    in_chroot "$r" /bin/sh -ec "install -d -o mysql -g mysql /run/mysqld
        exec mariadbd --user=mysql --bind-address=127.0.0.1 --port=$port --socket=$sock \
            --innodb-buffer-pool-size=512M --innodb-flush-log-at-trx-commit=2 \
            --innodb-buffer-pool-dump-at-shutdown=OFF --innodb-buffer-pool-load-at-startup=OFF" >>"$LOG" 2>&1 &
    pid=$!
    sql() { in_chroot "$r" mariadb --socket="$sock" -N -B -e "$1"; }
    for _ in $(seq 300); do sql 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
    {
        sql "DROP DATABASE IF EXISTS sbtest; CREATE DATABASE sbtest;" &&
        sysbench oltp_read_write --mysql-host=127.0.0.1 --mysql-port="$port" --mysql-user=sbtest \
            --mysql-password=sbtest --mysql-db=sbtest --tables="$SB_TABLES" --table-size="$SB_TABLE_SIZE" \
            --threads="$SB_TABLES" --rand-seed=1 prepare &&
        sql "ANALYZE TABLE $(seq -s, -f 'sbtest.sbtest%.0f' 1 "$SB_TABLES")" &&
        sql "SELECT CONCAT('data_bytes=', SUM(data_length + index_length)) FROM information_schema.tables
             WHERE table_schema = 'sbtest'" >"$CACHE/dataset.bytes"
    } >>"$LOG" 2>&1 || rc=$?
    sql 'shutdown' >>"$LOG" 2>&1 || kill "$pid" 2>/dev/null || true
    wait "$pid" || true
    rm -f "$r/var/lib/mysql/ib_buffer_pool" "$r/var/lib/mysql/epcopy-build.sock"
    ((rc == 0)) || return "$rc"
    {
        echo "tables=$SB_TABLES"
        echo "table_size=$SB_TABLE_SIZE"
        cat "$CACHE/dataset.bytes"
        echo "sysbench=$(sysbench --version | awk '{ print $2 }')"
    } >"$OUT/.dataset.txt.tmp"
    mv -f "$OUT/.dataset.txt.tmp" "$OUT/dataset.txt"
}

# ---- the image: rootfs + init + agent -> mkfs.ext4 -d ------------------------------
build_image() {
    local r="$CACHE/rootfs"
    install -m 755 "$HERE/epcopy-init.sh" "$r/sbin/epcopy-init"
    # Without debug info and symbols: 11 MB -> 7 MB.
    strip -o "$r/usr/local/sbin/epcopy-agent" "$AGENT" 2>>"$LOG"
    chmod 755 "$r/usr/local/sbin/epcopy-agent"
    rm -f "$OUT/.bench.img.tmp"
    truncate -s "${IMAGE_MB}M" "$OUT/.bench.img.tmp"
    log "mkfs.ext4 -d rootfs (${IMAGE_MB} MiB)"
    # No lazy init (the guest would zero inode tables in the background, dirtying
    # pages during a benchmark); a fixed UUID keeps the image reproducible.
    mkfs.ext4 -q -F -L epcopy-bench -U 6c2f3a7e-5e1b-4b0c-9d4e-0e0c0b0e0c01 \
        -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
        -d "$r" "$OUT/.bench.img.tmp" >>"$LOG" 2>&1
    mv -f "$OUT/.bench.img.tmp" "$OUT/bench.img"
}

# ---- the initrd: busybox + modules from the guest's kernel package ----------------
mod_depends() {
    case $1 in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}

build_modules() {
    local deb=$1 x mroot ko name m
    mktmp x
    log "dpkg -x $(basename "$deb") (modules)"
    dpkg -x "$deb" "$x"
    mroot=$(compgen -G "$x/lib/modules/*" | head -n 1)
    declare -A path=() seen=()
    local order=()
    while IFS= read -r ko; do
        name=${ko##*/}
        name=${name%%.ko*}
        path[${name//-/_}]=$ko
    done < <(find "$mroot/kernel" -name '*.ko*')
    visit() {
        local m=${1//-/_} d
        [[ -n "${seen[$m]:-}" ]] && return 0
        seen[$m]=1
        [[ -n "${path[$m]:-}" ]] || { echo "images: module $m not found in $(basename "$deb")" >&2; return 1; }
        for d in $(mod_depends "${path[$m]}"); do visit "$d"; done
        order+=("$m")
    }
    for m in "${WANT_MODULES[@]}"; do visit "$m"; done
    local mods="$x/modules"
    mkdir -p "$mods"
    for m in "${order[@]}"; do
        ko=${path[$m]}
        case $ko in
        *.ko.xz) xz -dc "$ko" >"$mods/$m.ko" ;;
        *.ko.zst) zstd -dcq "$ko" >"$mods/$m.ko" ;;
        *.ko.gz) gzip -dc "$ko" >"$mods/$m.ko" ;;
        *) cp "$ko" "$mods/$m.ko" ;;
        esac
        echo "$m.ko" >>"$mods/load-order"
    done
    log "modules: ${order[*]}"
    {
        echo "package=$(dpkg-deb -f "$deb" Package)"
        echo "version=$(dpkg-deb -f "$deb" Version)"
        echo "release=$(basename "$mroot")"
        echo "modules=${order[*]}"
        echo "vmlinux=$GUEST/out/vmlinux"
    } >"$x/kernel.txt"
    rm -rf "$CACHE/modules.old"
    [[ -d "$CACHE/modules" ]] && mv "$CACHE/modules" "$CACHE/modules.old"
    mv "$mods" "$CACHE/modules"
    rm -rf "$CACHE/modules.old"
    mv -f "$x/kernel.txt" "$OUT/kernel.txt"
}

build_initrd() {
    local r a
    mktmp r
    chmod 755 "$r"
    mkdir -p "$r"/{bin,dev,proc,sys,newroot,lib/modules}
    cp /bin/busybox "$r/bin/busybox"
    for a in $("$r/bin/busybox" --list); do
        [[ -e "$r/bin/$a" ]] || ln -s busybox "$r/bin/$a"
    done
    install -m 755 "$HERE/initrd-init.sh" "$r/init"
    cp "$CACHE/modules/"* "$r/lib/modules/"
    mknod -m 600 "$r/dev/console" c 5 1 2>/dev/null || true
    find "$r" -exec touch -h -d @0 {} +
    (cd "$r" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$OUT/.initrd.img.tmp"
    mv -f "$OUT/.initrd.img.tmp" "$OUT/initrd.img"
}

# ---- main -------------------------------------------------------------------
need_pkgs "${BUILD_PKGS[@]}"

# The kernel (out/vmlinux) and its .deb come from Workloads/guest/build.sh
# (cached there; silent when nothing changes). Its .deb cache is only read here.
EPCOPY_AGENT="$AGENT" "$GUEST/build.sh"
KERNEL_PKG=$(sed -n 's/^package=//p' "$GUEST/out/kernel.txt")
DEB=$(compgen -G "$GUEST/out/.cache/deb/${KERNEL_PKG}_*.deb" | head -n 1 || true)

MOD_KEY=$(hash_str "$(basename "${DEB:-none}")" "${WANT_MODULES[*]}" "$(declare -f mod_depends build_modules)")
if ! key_matches modules "$MOD_KEY" || [[ ! -f "$CACHE/modules/load-order" || ! -f "$OUT/kernel.txt" ]]; then
    [[ -n "$DEB" ]] || { echo "images: no $KERNEL_PKG .deb in $GUEST/out/.cache/deb" >&2; exit 1; }
    build_modules "$DEB"
    key_store modules "$MOD_KEY"
fi

INITRD_KEY=$(hash_str "$(hash_of "$HERE/initrd-init.sh" "$CACHE/modules/"*)" \
    "$(dpkg-query -W -f='${Version}' busybox-static)" "$(declare -f build_initrd)")
if ! key_matches initrd "$INITRD_KEY" || [[ ! -f "$OUT/initrd.img" ]]; then
    build_initrd
    key_store initrd "$INITRD_KEY"
    BUILT+=(initrd.img)
fi

ROOTFS_KEY=$(hash_str "$SUITE" "$MIRROR" "${GUEST_PKGS[*]}" "$(declare -f build_rootfs in_chroot)")
if ! key_matches rootfs "$ROOTFS_KEY" || [[ ! -d "$CACHE/rootfs/var/lib/mysql/sbtest" ]]; then
    rm -f "$CACHE/image.key" "$CACHE/dataset.key"
    build_rootfs
    key_store rootfs "$ROOTFS_KEY"
    BUILT+=(rootfs)
fi

DATASET_KEY=$(hash_str "$ROOTFS_KEY" "$SB_TABLES" "$SB_TABLE_SIZE" "$(dpkg-query -W -f='${Version}' sysbench)" \
    "$(declare -f build_dataset)")
if ! key_matches dataset "$DATASET_KEY" || [[ ! -f "$OUT/dataset.txt" ]] ||
    [[ ! -f "$CACHE/rootfs/var/lib/mysql/sbtest/sbtest$SB_TABLES.ibd" ]]; then
    rm -f "$CACHE/image.key" "$CACHE/dataset.key"
    build_dataset
    key_store dataset "$DATASET_KEY"
    BUILT+=(dataset)
fi

IMAGE_KEY=$(hash_str "$DATASET_KEY" "$(hash_of "$HERE/epcopy-init.sh" "$AGENT")" "$IMAGE_MB" \
    "$(dpkg-query -W -f='${Version}' e2fsprogs)" "$(declare -f build_image)")
if ! key_matches image "$IMAGE_KEY" || [[ ! -f "$OUT/bench.img" ]]; then
    build_image
    key_store image "$IMAGE_KEY"
    BUILT+=(bench.img)
fi

if ((${#BUILT[@]})); then
    sizes=$(cd "$OUT" && { du -h --apparent-size bench.img initrd.img; du -h bench.img; } |
        awk 'NR == 1 { printf "bench.img %s", $1 } NR == 2 { printf ", initrd.img %s", $1 } NR == 3 { printf ", bench.img allocated %s", $1 }')
    echo "images: built ${BUILT[*]} in $((SECONDS - START))s ($sizes)"
fi
